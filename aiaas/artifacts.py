"""Model artifacts in every format aiaas registers, and the conversions between them.

One interface for all formats — ``Predictor.predict(features) -> logits`` on float32 numpy arrays —
so the optimize stage measures parent and child alike and the model server loads whatever a
version holds.

Loading never unpickles Python objects, and opens nothing of a local copy before every file of it
matches the manifest whose digest registration recorded (:mod:`aiaas.artifact_digests`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from aiaas import artifact_digests, errors, model_files, registry, settings

if TYPE_CHECKING:
    from torch import nn


class Predictor(Protocol):
    """Logits for a batch of feature rows."""

    format: str
    #: One row's shape from the registered signature, e.g. ``(64,)``; None when unrecorded.
    input_shape: tuple[int, ...] | None

    def predict(self, features: np.ndarray) -> np.ndarray: ...


class TorchPredictor:
    """An eager, dynamically quantized or TorchScript module, run without autograd."""

    def __init__(self, module: Any, model_format: str) -> None:
        import torch

        self.module = module.eval()
        self.format = model_format
        self.input_shape: tuple[int, ...] | None = None
        self._torch = torch

    def predict(self, features: np.ndarray) -> np.ndarray:
        # torch wants writable memory; a read-only view (e.g. from Arrow) is copied once.
        rows = features if features.flags.writeable else features.copy()
        with self._torch.inference_mode():
            return np.asarray(self.module(self._torch.from_numpy(rows)).numpy())


class OnnxPredictor:
    """An ONNX graph run by onnxruntime on the CPU."""

    format = "onnx"
    input_shape: tuple[int, ...] | None = None

    def __init__(self, path: str, threads: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            path, options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input_name: features})[0])


def load(version: registry.Version, threads: int = 1) -> Predictor:
    """Download a version's artifact, verify it, and load it for inference on the CPU.

    Raises:
        StorageError: The artifact is missing, differs from what was registered, or cannot be
            loaded (named with the version).
    """
    if version.format == "sentence-transformers":
        raise errors.ConfigError(
            f"{version.name}:{version.version} is an embedding model, not a classifier",
            "Serve it with serve_apps.embeddings (configs/serve/embeddings.yaml).",
        )
    local = verified_copy(version)
    try:
        described = _described(local)
        predictor: Predictor
        if version.format == "onnx":
            # No torch here: importing it is a second of a new replica's start.
            predictor = OnnxPredictor(str(local / "model.onnx"), threads)
        else:
            import torch

            torch.set_num_threads(threads)
            predictor = TorchPredictor(_torch_module(version, local), version.format)
        predictor.input_shape = _input_shape(described)
        return predictor
    except errors.AiaasError:
        raise
    except Exception as exc:  # torch, safetensors and onnxruntime each raise their own types
        cause = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else repr(exc)
        raise errors.StorageError(
            f"{version.name}:{version.version} ({version.format}) cannot be loaded: {cause}",
            "Register the model again, or roll back to a version that loads.",
        ) from exc


def verified_copy(version: registry.Version) -> Path:
    """The version's artifact on local disk, downloaded once per machine and version, and
    checked file by file against the digest recorded at registration on every call.

    Raises:
        StorageError: The version has no recorded digest, the cache directory is not private,
            the download fails, or the copy differs from what was registered.
    """
    label = f"{version.name}:{version.version}"
    if not version.artifact_sha256:
        raise errors.StorageError(
            f"{label} was registered without an artifact digest ({registry.ARTIFACT_DIGEST_TAG}), "
            "so its files cannot be checked and it is not loaded",
            "Register it again with this aiaas (train, optimize or import again), then promote "
            "the new version.",
        )
    root = artifact_digests.private_root(Path(settings.current().model_cache))
    # The run id makes the key unique across registries that reuse names and numbers.
    key = hashlib.sha256(f"{version.run_id}|{version.source}".encode()).hexdigest()[:12]
    cache = root / f"{version.name}-{version.version}-{key}"
    if not cache.exists():
        _download(version, cache)
    artifact_digests.verify(cache, version.artifact_sha256, label)
    return cache


def _download(version: registry.Version, cache: Path) -> None:
    import mlflow

    # mkdtemp makes the staging directory 0700: nobody else sees a half-written copy.
    staging = tempfile.mkdtemp(prefix=".download-", dir=cache.parent)
    try:
        mlflow.artifacts.download_artifacts(
            artifact_uri=version.uri, tracking_uri=registry.tracking_uri(), dst_path=staging
        )
    except Exception as exc:  # MLflow raises its own types and the store's
        shutil.rmtree(staging, ignore_errors=True)
        cause = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else repr(exc)
        raise errors.StorageError(
            f"{version.name}:{version.version} cannot be downloaded: {cause}",
            "Check that the registry is reachable (aiaas cluster status), or roll back to a "
            "version that loads.",
        ) from exc
    # MLflow's client writes this note (model name and version) into every copy it downloads
    # from models:/; it was never registered, so it is not in the manifest.
    (Path(staging) / "registered_model_meta").unlink(missing_ok=True)
    try:
        # Atomic: replicas loading the same version at once never read a half-written copy.
        os.rename(staging, cache)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another replica got there first


def _described(local: Path) -> dict[str, Any]:
    """The artifact's MLmodel file: its flavors and signature."""
    import yaml

    found = yaml.safe_load((local / "MLmodel").read_text())
    return found if isinstance(found, dict) else {}


def _torch_module(version: registry.Version, local: Path) -> Any:
    """The module of a torch-format artifact, rebuilt from its weights (see model_files).

    Raises:
        StorageError: The artifact is not one aiaas wrote for this format.
    """
    record = local / model_files.RECORD
    if not record.is_file():
        raise errors.StorageError(
            f"{version.name}:{version.version} ({version.format}) has no {model_files.RECORD}, "
            "so there are no weights aiaas can load without unpickling",
            "Register the model again with this aiaas, then promote the new version.",
        )
    found = model_files.Record.model_validate_json(record.read_text()).format
    if found != version.format:
        raise errors.StorageError(
            f"{version.name}:{version.version} is registered as '{version.format}' but its "
            f"artifact holds a '{found}' model",
            "Register the model again, or roll back to a version that loads.",
        )
    return model_files.load(local)


def _input_shape(described: dict[str, Any]) -> tuple[int, ...] | None:
    """One row's shape from the signature MLflow recorded (a JSON list of tensor specs)."""
    signature = described.get("signature") or {}
    inputs = json.loads(signature["inputs"]) if signature.get("inputs") else []
    if len(inputs) != 1 or "tensor-spec" not in inputs[0]:
        return None
    return tuple(int(size) for size in inputs[0]["tensor-spec"]["shape"][1:])


def method_problem(method: str, model: nn.Module | None, model_format: str) -> str | None:
    """Why an optimize method does not apply to a model, or None when it does."""
    from torch import nn

    if model_format != "torch" or model is None:
        return (
            f"{method} converts an eager PyTorch model, but this version is '{model_format}'; "
            "optimize the version it was made from (see 'parent' in aiaas models show)"
        )
    if method == "dynamic-int8" and not any(isinstance(m, nn.Linear) for m in model.modules()):
        return "dynamic-int8 quantizes Linear layers and this model has none"
    return None


def convert(module: nn.Module, method: str, example: np.ndarray) -> Any:
    """The optimized form of an eager module: a module for torch formats, an ONNX file path."""
    import torch

    module = module.eval()
    sample = torch.from_numpy(example)
    if method == "dynamic-int8":
        return model_files.quantize_dynamic(module)
    if method == "torchscript":
        with torch.no_grad():
            return torch.jit.freeze(torch.jit.trace(module, sample))
    if method == "onnx":
        path = os.path.join(tempfile.mkdtemp(prefix="aiaas-onnx-"), "model.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (sample,),
                path,
                input_names=["features"],
                output_names=["logits"],
                dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                dynamo=True,
                verbose=False,
            )
        return path
    raise errors.ConfigError(
        f"unknown optimize method '{method}'", "Use dynamic-int8, torchscript or onnx."
    )


class Embedder:
    """A sentence-transformers model: texts in, embedding rows out, with real token counts."""

    format = "sentence-transformers"

    def __init__(self, model: Any) -> None:
        self.model = model
        self.dimension = int(model.get_embedding_dimension() or 0)
        self.max_tokens = int(model.max_seq_length)

    def token_counts(self, texts: list[str]) -> list[int]:
        """Tokens per text as the model's tokenizer counts them (special tokens included)."""
        encoded = self.model.tokenizer(texts, add_special_tokens=True, truncation=False)
        return [len(ids) for ids in encoded["input_ids"]]

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Embeddings of the texts (inputs longer than the model's limit are truncated)."""
        return np.asarray(
            self.model.encode(texts, batch_size=batch_size, convert_to_numpy=True),
            dtype=np.float32,
        )


#: Where MLflow's sentence-transformers flavor keeps the model, relative to the artifact.
EMBEDDER_DATA = "model.sentence_transformer"
#: Files that torch or pickle would read as pickles; an embedding artifact holds none.
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")


def embedder_problem(directory: Path) -> str | None:
    """Why a sentence-transformers directory is not pure data, or None when it is.

    Its weights must be safetensors, and each module one of sentence-transformers' own (a
    module's class is imported by the name modules.json gives).
    """
    pickled = sorted(
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.suffix.lower() in PICKLED_SUFFIXES
    )
    if pickled:
        return f"the model holds pickled files ({', '.join(pickled[:3])})"
    if not any(directory.rglob("*.safetensors")):
        return "the model has no safetensors weights"
    modules = directory / "modules.json"
    listed = json.loads(modules.read_text()) if modules.is_file() else []
    foreign = [
        m.get("type", "")
        for m in listed
        if not str(m.get("type", "")).startswith("sentence_transformers.")
    ]
    if foreign:
        return f"modules.json names modules from outside sentence-transformers ({foreign[0]})"
    return None


def load_embedder(version: registry.Version, threads: int = 1) -> Embedder:
    """Download a sentence-transformers version, verify it, and load it on the CPU.

    Raises:
        ConfigError: The version is not an embedding model. StorageError: it cannot be loaded.
    """
    if version.format != "sentence-transformers":
        raise errors.ConfigError(
            f"{version.name}:{version.version} is a '{version.format}' model, not an embedding "
            "model",
            "Serve it with serve_apps.model_server, or import an embedding model with "
            "'aiaas models import'.",
        )
    local = verified_copy(version)
    label = f"{version.name}:{version.version} (sentence-transformers)"
    problem = embedder_problem(local / EMBEDDER_DATA)
    if problem:
        raise errors.StorageError(
            f"{label} cannot be loaded: {problem}",
            "Import the model again with this aiaas, then promote the new version.",
        )
    import torch
    from sentence_transformers import SentenceTransformer

    # Everything a model needs is in its artifact: never ask the Hugging Face hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Not MLflow's loader: it turns trust_remote_code on, and may read pickled weights.
            model = SentenceTransformer(
                str(local / EMBEDDER_DATA),
                device="cpu",
                local_files_only=True,
                trust_remote_code=False,
                model_kwargs={"use_safetensors": True},
            )
    except Exception as exc:  # transformers and torch each raise their own types
        cause = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else repr(exc)
        raise errors.StorageError(
            f"{label} cannot be loaded: {cause}",
            "Import the model again, or roll back to a version that loads.",
        ) from exc
    return Embedder(model)
