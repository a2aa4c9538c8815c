"""Evaluating a trained checkpoint on the test split, on the driver after training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from aiaas import datasets
from aiaas.config.train import TrainConfig
from aiaas.storage import Storage
from jobs import outcomes


def load_model(config: TrainConfig, schema: datasets.DatasetSchema, checkpoint: Any) -> Any:
    """The zoo model of the config with the checkpoint's weights, on the CPU, in eval mode."""
    import torch

    from aiaas import models

    with checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / "state.pt", weights_only=True, map_location="cpu")
    model = models.build(
        config.model, len(schema.features), schema.num_classes, schema.feature_shape
    )
    model.load_state_dict(state["model"])
    return model.eval()


def _test_dataset(storage: Storage, dataset: str) -> Any:
    import pyarrow.dataset as pads
    from pyarrow import fs as pafs

    path = datasets.split_path(storage, dataset, "test")
    filesystem, base = (
        pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
    )
    return pads.dataset(base, filesystem=filesystem, format="parquet")


def _arrays(table: Any, schema: datasets.DatasetSchema) -> tuple[np.ndarray, np.ndarray]:
    x = np.column_stack([table[name].to_numpy() for name in schema.features]).astype(np.float32)
    return x, table[schema.label].to_numpy()


def test_split(
    storage: Storage, dataset: str, schema: datasets.DatasetSchema
) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of a prepared data set's whole test split."""
    return _arrays(_test_dataset(storage, dataset).to_table(), schema)


def test_head(
    storage: Storage, dataset: str, schema: datasets.DatasetSchema, rows: int = 8
) -> np.ndarray:
    """The first rows' features of the test split (a signature's input example)."""
    return _arrays(_test_dataset(storage, dataset).head(rows), schema)[0]


def evaluate(
    model: Any, storage: Storage, config: TrainConfig, schema: datasets.DatasetSchema
) -> outcomes.TestMetrics:
    """Accuracy and mean cross-entropy loss on the test split, read in record batches so the
    driver's memory does not grow with the data set."""
    import pyarrow
    import torch

    loss_sum, correct, rows = 0.0, 0, 0
    for batch in _test_dataset(storage, config.dataset).to_batches(batch_size=16384):
        x, y = _arrays(pyarrow.Table.from_batches([batch]), schema)
        with torch.no_grad():
            logits = model(torch.from_numpy(x))
            loss = torch.nn.functional.cross_entropy(
                logits, torch.from_numpy(y).long(), reduction="sum"
            )
        loss_sum += float(loss)
        correct += int((logits.argmax(1).numpy() == y).sum())
        rows += len(y)
    return outcomes.TestMetrics(
        accuracy=round(correct / max(rows, 1), 6), loss=round(loss_sum / max(rows, 1), 6), rows=rows
    )
