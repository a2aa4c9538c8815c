"""Every format registers as data and loads to the registered outputs, after its files are checked.

One local MLflow (sqlite, artifacts in a temp dir) per module; each test loads into its own cache.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aiaas import artifact_digests, artifacts, errors, registration, registry
from aiaas.config.train import ModelSpec
from tests import support
from tests.unit import pickle_bomb

ROWS = np.random.default_rng(0).random((5, 64), dtype=np.float32)
TORCH_FORMATS = ["torch", "dynamic-int8", "torchscript"]
HINT = (
    "The damaged copy was removed, so the next load downloads the artifact again; if this error "
    "comes back, the registry's copy is damaged: register the model again."
)


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Versions of every format in a local registry, with the outputs each must give."""
    import mlflow
    import torch

    from aiaas import models

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(root)  # MLflow's default artifact root (./mlruns) lands here
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("unit")
        with mlflow.start_run() as run:
            pass
        torch.manual_seed(0)
        mlp = models.build(ModelSpec(name="mlp", hidden_sizes=[32]), 64, 10, None).eval()
        cnn = models.build(ModelSpec(name="cnn", channels=[4]), 64, 10, None).eval()
        found: dict[str, Any] = {"uri": uri}
        for name, module, method in [
            *[("mlp", mlp, method) for method in [*TORCH_FORMATS, "onnx"]],
            ("cnn", cnn, "torch"),
            ("cnn", cnn, "dynamic-int8"),
        ]:
            converted = module if method == "torch" else artifacts.convert(module, method, ROWS)
            if method == "onnx":
                done = registration.register_onnx_model(
                    run.info.run_id, f"{name}-onnx", str(converted), module, ROWS, {"job_id": "t"}
                )
            else:
                done = registration.register_torch_model(
                    run.info.run_id, f"{name}-{method}", converted, ROWS, {"job_id": "t"}, method
                )
                with torch.no_grad():
                    found[f"{name}-{method}:expected"] = converted(torch.from_numpy(ROWS)).numpy()
            found[f"{name}-{method}"] = registry.resolve(registry.parse_ref(done.name))
        found["mlp-onnx:expected"] = found["mlp-torch:expected"]
        yield found


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registered: dict[str, Any]) -> Path:
    """A fresh model cache of this test, with the module's registry to download from."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["uri"])
    monkeypatch.setenv("AIAAS_MODEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _copy_of(cache: Path, version: registry.Version) -> Path:
    (found,) = cache.glob(f"{version.name}-{version.version}-*")
    return found


@pytest.mark.parametrize(
    "name",
    [
        "mlp-torch",
        "mlp-dynamic-int8",
        "mlp-torchscript",
        "mlp-onnx",
        "cnn-torch",
        "cnn-dynamic-int8",
    ],
)
def test_each_format_registers_as_data_and_loads_to_its_outputs(
    cache: Path, registered: dict[str, Any], name: str
) -> None:
    version: registry.Version = registered[name]
    assert len(version.artifact_sha256) == 64
    # The pin a deployment records carries the digest, so a replica checks without the registry.
    assert registry.Version.from_pin(version.pin()).artifact_sha256 == version.artifact_sha256
    predictor = artifacts.load(version)
    assert predictor.input_shape == (64,)
    np.testing.assert_allclose(
        predictor.predict(ROWS), registered[f"{name}:expected"], rtol=1e-5, atol=1e-5
    )
    copy = _copy_of(cache, version)
    files = {p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()}
    assert artifact_digests.MANIFEST in files
    # No pickled module anywhere: MLflow's pytorch flavor (data/model.pth) is not used.
    assert not any(file.endswith((".pth", ".pkl")) for file in files)
    weights = {
        "torch": "data/weights.safetensors",
        "dynamic-int8": "data/state.pt",
        "torchscript": "data/model.pt",
        "onnx": "model.onnx",
    }[version.format]
    assert weights in files
    # Loading again checks the existing copy and loads it again.
    assert artifacts.load(version).predict(ROWS).shape == (5, 10)


def test_the_optimize_job_converts_a_loaded_parent(cache: Path, registered: dict[str, Any]) -> None:
    """The rebuilt module is a zoo network again: int8 of it equals int8 of the original."""
    parent = artifacts.load(registered["mlp-torch"])
    module: Any = getattr(parent, "module", None)
    assert artifacts.method_problem("dynamic-int8", module, "torch") is None
    child = artifacts.TorchPredictor(artifacts.convert(module, "dynamic-int8", ROWS[:2]), "x")
    np.testing.assert_allclose(
        child.predict(ROWS), registered["mlp-dynamic-int8:expected"], rtol=1e-6
    )


@pytest.mark.parametrize("name", ["mlp-torch", "mlp-onnx"])
def test_a_cached_version_loads_from_its_pin_without_mlflow(
    cache: Path, registered: dict[str, Any], name: str
) -> None:
    version = registered[name]
    artifacts.load(version)  # downloads into the cache
    probe = (
        "import json, sys, numpy as np\n"
        "from aiaas import artifacts, registry\n"
        "v = registry.Version.from_pin(json.loads(sys.argv[1]))\n"
        "p = artifacts.load(v)\n"
        "print(p.input_shape, p.predict(np.zeros((2, 64), np.float32)).shape,"
        " 'mlflow' in sys.modules, 'torch' in sys.modules)\n"
    )
    import json

    env = {**support.env(), "AIAAS_MODEL_CACHE": str(cache)}
    env.pop("MLFLOW_TRACKING_URI", None)  # no registry to ask
    done = subprocess.run(
        [sys.executable, "-c", probe, json.dumps(version.pin())],
        env=env,
        cwd=support.REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # ONNX versions never import torch either (a second of a new replica's start).
    torch_imported = "True" if version.format != "onnx" else "False"
    assert done.stdout.split() == ["(64,)", "(2,", "10)", "False", torch_imported]


def test_a_tampered_cache_file_is_refused_removed_and_downloaded_again(
    cache: Path, registered: dict[str, Any]
) -> None:
    version = registered["mlp-torch"]
    artifacts.load(version)
    copy = _copy_of(cache, version)
    weights = copy / "data" / "weights.safetensors"
    body = bytearray(weights.read_bytes())
    body[-1] ^= 0xFF  # one bit of one weight
    weights.write_bytes(bytes(body))
    with pytest.raises(errors.StorageError) as refused:
        artifacts.load(version)
    assert refused.value.message == (
        f"mlp-torch:1: file 'data/weights.safetensors' does not match the SHA-256 recorded at "
        f"registration (cached copy in {copy}); nothing of it was loaded"
    )
    assert refused.value.hint == HINT
    assert not copy.exists()
    np.testing.assert_allclose(
        artifacts.load(version).predict(ROWS), registered["mlp-torch:expected"], rtol=1e-6
    )


def test_a_planted_pickle_never_runs(
    cache: Path, tmp_path: Path, registered: dict[str, Any]
) -> None:
    import torch

    marker = tmp_path / "pickle-ran"
    planted = pickle.dumps(pickle_bomb.Marker(marker))
    version = registered["mlp-torch"]

    # Beside the weights, where MLflow's pytorch flavor keeps its pickled module.
    artifacts.load(version)
    copy = _copy_of(cache, version)
    (copy / "data" / "model.pth").write_bytes(planted)
    with pytest.raises(
        errors.StorageError, match=re.escape("file 'data/model.pth' is not part of the ")
    ):
        artifacts.load(version)

    # Instead of the weights, with a manifest rewritten to match: the recorded digest differs.
    artifacts.load(version)
    copy = _copy_of(cache, version)
    (copy / "data" / "weights.safetensors").write_bytes(planted)
    artifact_digests.write_manifest(copy)
    with pytest.raises(
        errors.StorageError, match=re.escape("aiaas_manifest.json does not match the SHA")
    ):
        artifacts.load(version)

    # Even an artifact whose digest is what the version records never has a pickle unpickled:
    # a module pickle is not read at all, and int8 state only by weights_only's unpickler.
    for model_format, file in [("torch", "data/model.pth"), ("dynamic-int8", "data/state.pt")]:
        genuine = registered[f"mlp-{model_format}"]
        artifacts.load(genuine)
        key = hashlib.sha256(f"f|{model_format}".encode()).hexdigest()[:12]
        forged = cache / f"forged-1-{key}"  # where load() looks for run f, source model_format
        shutil.copytree(_copy_of(cache, genuine), forged)
        (forged / artifact_digests.MANIFEST).unlink()
        if model_format == "torch":
            (forged / "data" / "weights.safetensors").unlink()
            (forged / file).write_bytes(planted)
        else:
            torch.save(pickle_bomb.Marker(marker), forged / file)
        trusted = registry.Version(
            name="forged",
            version="1",
            run_id="f",
            created=0.0,
            tags={
                registry.FORMAT_TAG: model_format,
                registry.ARTIFACT_DIGEST_TAG: artifact_digests.write_manifest(forged),
            },
            source=model_format,
        )
        with pytest.raises(errors.StorageError, match=r"forged:1 \(.*\) cannot be loaded"):
            artifacts.load(trusted)
    assert not marker.exists()


def test_a_version_without_a_digest_is_refused(cache: Path) -> None:
    older = registry.Version(
        name="digits", version="2", run_id="r", created=0.0, tags={registry.FORMAT_TAG: "torch"}
    )
    with pytest.raises(errors.StorageError) as refused:
        artifacts.load(older)
    assert str(refused.value) == (
        "digits:2 was registered without an artifact digest (aiaas.artifact_sha256), so its "
        "files cannot be checked and it is not loaded\n"
        "Register it again with this aiaas (train, optimize or import again), then promote the "
        "new version."
    )
    assert not cache.exists() or not any(cache.iterdir())


def test_a_pin_without_a_digest_sends_the_replica_to_the_registry() -> None:
    pin = {"model": "m", "version": "1", "run_id": "r", "source": "s", "format": "onnx"}
    with pytest.raises(KeyError):
        registry.Version.from_pin(pin)


def test_a_module_outside_the_zoo_is_not_registered() -> None:
    from torch import nn

    from aiaas import model_files

    with pytest.raises(errors.ConfigError, match="cannot register a Linear: aiaas stores"):
        model_files.network_of(nn.Linear(4, 2))
