"""Artifacts load as MLflow loads them, without importing MLflow where the format allows."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aiaas import artifacts
from aiaas.config.train import ModelSpec
from tests import support

ROWS = np.random.default_rng(0).random((5, 64), dtype=np.float32)


def _saved(tmp_path: Path, method: str) -> tuple[Path, object]:
    """A digits MLP in ``method``'s form, saved by MLflow's pytorch flavor as aiaas logs it."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    from aiaas import models

    torch.manual_seed(0)
    module = models.build(ModelSpec(name="mlp", hidden_sizes=[32]), 64, 10, None).eval()
    if method != "torch":
        module = artifacts.convert(module, method, ROWS)
    with torch.no_grad():
        expected = module(torch.from_numpy(ROWS)).numpy()
    path = tmp_path / method
    mlflow.pytorch.save_model(
        module,
        str(path),
        signature=infer_signature(ROWS, expected),
        pip_requirements=["torch"],
        serialization_format="pickle",
    )
    return path, expected


@pytest.mark.parametrize("method", ["torch", "dynamic-int8", "torchscript"])
def test_torch_formats_load_as_mlflow_loads_them(tmp_path: Path, method: str) -> None:
    import mlflow

    path, expected = _saved(tmp_path, method)
    described = artifacts._described(str(path))
    ours = artifacts.TorchPredictor(artifacts._torch_module(str(path), described), method)
    theirs = artifacts.TorchPredictor(mlflow.pytorch.load_model(str(path)), method)
    np.testing.assert_allclose(ours.predict(ROWS), theirs.predict(ROWS), rtol=1e-6)
    np.testing.assert_allclose(ours.predict(ROWS), expected, rtol=1e-5, atol=1e-6)
    assert artifacts._input_shape(described) == (64,)


def test_a_cached_torch_version_loads_without_importing_mlflow(tmp_path: Path) -> None:
    path, _ = _saved(tmp_path, "torch")
    # Where load() finds a downloaded copy of probe:1 (run r1), so nothing is downloaded.
    cache = tmp_path / "cache"
    cache.mkdir()
    path.rename(cache / f"probe-1-{hashlib.sha256(b'r1|models:/m-1').hexdigest()[:12]}")
    probe = (
        "import sys, numpy as np\n"
        "from aiaas import artifacts, registry\n"
        "v = registry.Version(name='probe', version='1', run_id='r1', created=0.0,"
        " source='models:/m-1')\n"
        "p = artifacts.load(v)\n"
        "print(p.input_shape, p.predict(np.zeros((2, 64), np.float32)).shape,"
        " 'mlflow' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        env={**support.env(), "AIAAS_MODEL_CACHE": str(cache)},
        cwd=support.REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["(64,)", "(2,", "10)", "False"]
