"""Preparing data sets: splits, schema, fingerprint, and the checks on bad rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aiaas import datasets, errors, models
from aiaas.config.dataset import DatasetConfig
from aiaas.config.train import ModelSpec
from aiaas.storage import Storage


def _config(**source: object) -> DatasetConfig:
    return DatasetConfig.model_validate({"kind": "dataset", "name": "t", "source": source})


def test_generated_table_is_split_and_fingerprinted(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    config = DatasetConfig.model_validate(
        {
            "kind": "dataset",
            "name": "g",
            "rows_per_file": 300,
            "source": {"type": "generated", "rows": 1000, "features": 8, "classes": 3},
        }
    )
    schema = datasets.prepare(config, storage)
    assert schema.rows == {"train": 700, "validation": 150, "test": 150}
    assert len(list((tmp_path / "datasets/g/train").glob("part-*.parquet"))) == 3
    again = datasets.prepare(config, storage)
    assert again.fingerprint == schema.fingerprint  # same rows, same fingerprint
    assert datasets.load_schema(storage, "g").features == [f"f{i}" for i in range(8)]


def test_csv_with_nan_is_refused(tmp_path: Path) -> None:
    frame = pd.DataFrame({"a": [1.0, np.nan, 3.0, 4.0], "b": [1, 2, 3, 4], "label": [0, 1, 0, 1]})
    frame.to_csv(tmp_path / "x.csv", index=False)
    with pytest.raises(errors.ConfigError) as caught:
        datasets.prepare(_config(type="file", path=str(tmp_path / "x.csv")), Storage(str(tmp_path)))
    assert str(caught.value).startswith("the data has missing or NaN values in a (1 rows)")


def test_missing_label_column(tmp_path: Path) -> None:
    pd.DataFrame({"a": [1.0, 2.0], "y": [0, 1]}).to_parquet(tmp_path / "x.parquet")
    with pytest.raises(errors.ConfigError) as caught:
        datasets.prepare(
            _config(type="file", path=str(tmp_path / "x.parquet")), Storage(str(tmp_path))
        )
    assert str(caught.value).startswith("label column 'label' is not in the data (a, y)")


def test_unprepared_data_set_says_how_to_prepare(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigError) as caught:
        datasets.load_schema(Storage(str(tmp_path)), "digits")
    assert str(caught.value) == (
        f"data set 'digits' is not prepared under {tmp_path}\n"
        "Prepare it first: aiaas data prepare configs/data/digits.yaml"
    )


def test_cnn_needs_image_features() -> None:
    with pytest.raises(errors.ConfigError) as caught:
        models.build(ModelSpec(name="cnn"), num_features=20, num_classes=2, shape=None)
    assert "model 'cnn' needs image-shaped features, but the data set has 20 features" in str(
        caught.value
    )
    assert models.build(ModelSpec(name="cnn"), 64, 10, [1, 8, 8]) is not None


def test_directory_of_csv_files_with_text_labels(tmp_path: Path) -> None:
    source = tmp_path / "csvs"
    source.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        pd.DataFrame(
            {"x1": rng.normal(size=50), "x2": rng.normal(size=50), "label": ["cat", "dog"] * 25}
        ).to_csv(source / f"part{index}.csv", index=False)
    schema = datasets.prepare(_config(type="file", path=str(source)), Storage(str(tmp_path)))
    assert schema.class_names == ["cat", "dog"] and schema.num_classes == 2
    assert sum(schema.rows.values()) == 100
    train = pd.read_parquet(tmp_path / "datasets/t/train")
    assert set(train["label"]) == {0, 1} and train["x1"].dtype == np.float32
