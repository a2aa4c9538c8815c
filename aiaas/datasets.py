"""Prepared data sets: train/validation/test Parquet splits plus a schema with a fingerprint.

Tables (features and a label) are prepared here; chat sources (conversations tokenized for a
language model) by :mod:`aiaas.chat_datasets`, in the same layout.

Layout under the storage root::

    datasets/<name>/schema.json
    datasets/<name>/<split>/part-00000.parquet ...
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel

from aiaas import errors
from aiaas.config.dataset import (
    ChatSource,
    DatasetConfig,
    DigitsSource,
    FileSource,
    GeneratedSource,
)
from aiaas.storage import Storage

if TYPE_CHECKING:
    import pandas as pd
    from pyarrow import fs as pafs

    from aiaas.chat_datasets import ChatDatasetSchema

SPLITS = ("train", "validation", "test")


class DatasetSchema(BaseModel):
    """What a training job needs to know about a prepared table data set."""

    kind: Literal["table"] = "table"  # schemas written before chat data sets have no kind
    name: str
    features: list[str]
    label: str
    num_classes: int
    class_names: list[str]
    feature_shape: list[int] | None = None  # e.g. [1, 8, 8] when the features are an image
    rows: dict[str, int]
    fingerprint: str
    source: str
    prepared_at: float


def schema_path(name: str) -> str:
    """Where a data set's schema lives, relative to the storage root."""
    return f"datasets/{name}/schema.json"


def split_path(storage: Storage, name: str, split: str) -> str:
    """The directory of one split, as a path or URI Ray Data can read."""
    return storage.path("datasets", name, split)


def load_schema(storage: Storage, name: str) -> DatasetSchema:
    """The schema of a prepared table data set (chat ones: :mod:`aiaas.chat_datasets`).

    Raises:
        ConfigError: The data set was never prepared under this storage root, or it is a chat
            data set.
    """
    text = read_schema_text(storage, name)
    if json.loads(text).get("kind", "table") != "table":
        raise errors.ConfigError(
            f"data set '{name}' is a chat data set (token ids of conversations), not a table",
            "Train configs need a table data set; fine-tune a language model on it with: "
            "aiaas finetune CONFIG",
        )
    return DatasetSchema.model_validate_json(text)


def read_schema_text(storage: Storage, name: str) -> str:
    """The schema file of a prepared data set of any kind.

    Raises:
        ConfigError: The data set was never prepared under this storage root.
    """
    text = storage.read_text(schema_path(name))
    if text is None:
        raise errors.ConfigError(
            f"data set '{name}' is not prepared under {storage.root}",
            f"Prepare it first: aiaas data prepare configs/data/{name}.yaml",
        )
    return text


def prepare(config: DatasetConfig, storage: Storage) -> DatasetSchema | ChatDatasetSchema:
    """Read or generate the rows, check them, split them and write Parquet and the schema.

    Chat sources are tokenized by :func:`aiaas.chat_datasets.prepare`.

    Raises:
        ConfigError: The source is missing or its rows do not fit (no label, NaN, text features;
            for chat sources, bad JSONL lines or conversations longer than max_seq_len).
    """
    if isinstance(config.source, ChatSource):
        from aiaas import chat_datasets

        return chat_datasets.prepare(config, storage)
    frame, class_names, shape = _rows(config)
    label = config.label
    if label not in frame.columns:
        raise errors.ConfigError(
            f"label column '{label}' is not in the data ({', '.join(map(str, frame.columns[:10]))}"
            f"{' ...' if len(frame.columns) > 10 else ''})",
            "Set 'label' in the dataset config to one of the columns.",
        )
    features = [str(column) for column in frame.columns if column != label]
    _check_rows(frame, features, label)
    if not class_names:
        labels = frame[label]
        class_names = [str(value) for value in sorted(labels.unique())]
        frame[label] = labels.map({value: i for i, value in enumerate(sorted(labels.unique()))})
    frame[features] = frame[features].astype("float32")
    frame[label] = frame[label].astype("int64")
    order = np.random.default_rng(config.seed).permutation(len(frame))
    frame = frame.iloc[order].reset_index(drop=True)
    cut_train, cut_val = split_counts(len(frame), config)
    parts = {
        "train": frame.iloc[:cut_train],
        "validation": frame.iloc[cut_train:cut_val],
        "test": frame.iloc[cut_val:],
    }
    digest = hashlib.sha256()
    for split in SPLITS:
        _write_split(storage, config, split, parts[split], digest)
    schema = DatasetSchema(
        name=config.name,
        features=features,
        label=label,
        num_classes=len(class_names),
        class_names=class_names,
        feature_shape=shape,
        rows={split: len(part) for split, part in parts.items()},
        fingerprint=digest.hexdigest()[:32],
        source=config.source.type,
        prepared_at=time.time(),
    )
    storage.write_text(schema_path(config.name), schema.model_dump_json(indent=2))
    return schema


def split_counts(total: int, config: DatasetConfig) -> tuple[int, int]:
    """Where the train and validation splits end in ``total`` shuffled rows.

    Raises:
        ConfigError: A split would be empty.
    """
    cut_train = int(total * config.splits.train)
    cut_val = cut_train + int(total * config.splits.validation)
    for split, count in zip(SPLITS, (cut_train, cut_val - cut_train, total - cut_val), strict=True):
        if count == 0:
            raise errors.ConfigError(
                f"the {split} split of '{config.name}' is empty ({total} rows in all)",
                "Use more rows or larger split fractions.",
            )
    return cut_train, cut_val


def fresh_split(storage: Storage, name: str, split: str) -> tuple[pafs.FileSystem, str]:
    """An empty directory for one split's Parquet files, and the filesystem it is on."""
    from pyarrow import fs as pafs

    directory = split_path(storage, name, split)
    filesystem, base = (
        pafs.FileSystem.from_uri(directory)
        if "://" in directory
        else (pafs.LocalFileSystem(), directory)
    )
    # Replace the split whole: a re-prepare must not mix old and new files.
    if filesystem.get_file_info(base).type != pafs.FileType.NotFound:
        filesystem.delete_dir(base)
    filesystem.create_dir(base, recursive=True)
    return filesystem, base


def _rows(config: DatasetConfig) -> tuple[pd.DataFrame, list[str], list[int] | None]:
    import pandas as pd

    source = config.source
    if isinstance(source, DigitsSource):
        from sklearn.datasets import load_digits

        digits = load_digits()
        frame = pd.DataFrame(digits.data, columns=[f"pixel_{i}" for i in range(64)])
        frame[config.label] = digits.target
        return frame, [str(i) for i in range(10)], [1, 8, 8]
    if isinstance(source, GeneratedSource):
        from sklearn.datasets import make_classification

        informative = source.informative or max(2, source.features // 2)
        x, y = make_classification(
            n_samples=source.rows,
            n_features=source.features,
            n_informative=informative,
            n_redundant=0,
            n_classes=source.classes,
            n_clusters_per_class=1,
            random_state=config.seed,
        )
        frame = pd.DataFrame(x.astype("float32"), columns=[f"f{i}" for i in range(source.features)])
        frame[config.label] = y
        return frame, [str(i) for i in range(source.classes)], None
    assert isinstance(source, FileSource)  # chat sources never reach here (see prepare)
    return _read_files(source), [], None


def _read_files(source: FileSource) -> pd.DataFrame:
    import pandas as pd

    path = Path(source.path).expanduser()
    if not path.exists():
        raise errors.ConfigError(
            f"source.path '{source.path}' does not exist",
            "Point source.path at a file or directory.",
        )
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    fmt = source.format
    chosen = [
        p
        for p in files
        if (fmt is None and p.suffix in (".csv", ".parquet"))
        or (fmt is not None and p.suffix == f".{fmt}")
    ]
    if not chosen:
        raise errors.ConfigError(
            f"no .csv or .parquet files at '{source.path}'",
            "Point source.path at CSV/Parquet data or set source.format.",
        )
    frames = [pd.read_csv(p) if p.suffix == ".csv" else pd.read_parquet(p) for p in chosen]
    return pd.concat(frames, ignore_index=True)


def _check_rows(frame: pd.DataFrame, features: list[str], label: str) -> None:
    if not features:
        raise errors.ConfigError("the data has no feature columns besides the label")
    non_numeric = [c for c in features if not np.issubdtype(frame[c].dtype, np.number)]
    if non_numeric:
        raise errors.ConfigError(
            f"feature column(s) {', '.join(non_numeric[:5])} are not numeric",
            "Encode them as numbers before preparing, or drop them from the file.",
        )
    missing = frame[[*features, label]].isna().sum()
    bad = missing[missing > 0]
    if not bad.empty:
        where = ", ".join(f"{column} ({count} rows)" for column, count in bad.items())
        raise errors.ConfigError(
            f"the data has missing or NaN values in {where}",
            "Fill or drop those rows before preparing: training on NaN gives NaN weights.",
        )
    values = frame[features].to_numpy(dtype="float64")
    if not np.isfinite(values).all():
        raise errors.ConfigError(
            "the data has infinite feature values", "Clip or drop those rows before preparing."
        )


def _write_split(
    storage: Storage, config: DatasetConfig, split: str, part: pd.DataFrame, digest: hashlib._Hash
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    filesystem, base = fresh_split(storage, config.name, split)
    for index, start in enumerate(range(0, len(part), config.rows_per_file)):
        chunk = part.iloc[start : start + config.rows_per_file]
        table = pa.Table.from_pandas(chunk, preserve_index=False)
        pq.write_table(table, f"{base}/part-{index:05d}.parquet", filesystem=filesystem)
        digest.update(split.encode())
        digest.update(chunk.to_numpy(dtype="float64").tobytes())
    digest.update(json.dumps(list(part.columns)).encode())
