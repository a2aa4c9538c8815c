"""Evaluating a trained checkpoint on the test split, on the driver after training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from aiaas import datasets
from aiaas.config.train import TrainConfig
from aiaas.storage import Storage


def load_model(config: TrainConfig, schema: datasets.DatasetSchema, checkpoint: Any) -> Any:
    """The zoo model of the config with the checkpoint's weights, on the CPU, in eval mode."""
    import torch

    from aiaas import models

    with checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / "state.pt", weights_only=False, map_location="cpu")
    model = models.build(
        config.model, len(schema.features), schema.num_classes, schema.feature_shape
    )
    model.load_state_dict(state["model"])
    return model.eval()


def test_split(
    storage: Storage, dataset: str, schema: datasets.DatasetSchema
) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of a prepared data set's test split."""
    import pyarrow.dataset as pads
    from pyarrow import fs as pafs

    path = datasets.split_path(storage, dataset, "test")
    filesystem, base = (
        pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
    )
    table = pads.dataset(base, filesystem=filesystem, format="parquet").to_table()
    x = np.column_stack([table[name].to_numpy() for name in schema.features]).astype(np.float32)
    return x, table[schema.label].to_numpy()


def evaluate(
    model: Any, storage: Storage, config: TrainConfig, schema: datasets.DatasetSchema
) -> dict[str, float]:
    """Accuracy and mean cross-entropy loss on the test split."""
    import torch

    x, y = test_split(storage, config.dataset, schema)
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y).long())
    accuracy = float((logits.argmax(1).numpy() == y).mean())
    return {"accuracy": round(accuracy, 6), "loss": round(float(loss), 6), "rows": len(y)}
