"""An MLflow registry of its own for a test module: SQLite and artifacts in a temp dir."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest


@contextlib.contextmanager
def local_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Point MLflow at a fresh registry while the block runs; yields its tracking URI."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(root)  # MLflow's default artifact root (./mlruns) lands here
        yield uri
