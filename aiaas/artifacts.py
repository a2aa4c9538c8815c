"""Model artifacts in every format aiaas registers, and the conversions between them.

One interface for all formats — ``Predictor.predict(features) -> logits`` on float32 numpy arrays —
so the optimize stage measures parent and child alike and the model server loads whatever a
version holds.
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

from aiaas import errors, registry

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
    """Download a version's artifact and load it for inference on the CPU.

    Raises:
        StorageError: The artifact is missing or cannot be loaded (named with the version).
    """
    if version.format == "sentence-transformers":
        raise errors.ConfigError(
            f"{version.name}:{version.version} is an embedding model, not a classifier",
            "Serve it with serve_apps.embeddings (configs/serve/embeddings.yaml).",
        )
    try:
        local = _local_copy(version)
        described = _described(local)
        predictor: Predictor
        if version.format == "onnx":
            # No torch here: importing it is a second of a new replica's start.
            predictor = OnnxPredictor(str(Path(local) / "model.onnx"), threads)
        else:
            import torch

            torch.set_num_threads(threads)
            predictor = TorchPredictor(_torch_module(local, described), version.format)
        predictor.input_shape = _input_shape(described)
        return predictor
    except Exception as exc:  # MLflow, torch and onnxruntime each raise their own types
        cause = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else repr(exc)
        raise errors.StorageError(
            f"{version.name}:{version.version} ({version.format}) cannot be loaded: {cause}",
            "Register the model again, or roll back to a version that loads.",
        ) from exc


def _local_copy(version: registry.Version) -> str:
    """The version's artifact on local disk, downloaded once per machine and version."""
    root = os.environ.get("AIAAS_MODEL_CACHE") or f"{tempfile.gettempdir()}/aiaas-models"
    # The run id makes the key unique across registries that reuse names and numbers.
    key = hashlib.sha256(f"{version.run_id}|{version.source}".encode()).hexdigest()[:12]
    cache = Path(root) / f"{version.name}-{version.version}-{key}"
    if (cache / "MLmodel").exists():
        return str(cache)
    import mlflow

    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".download-", dir=cache.parent)
    mlflow.artifacts.download_artifacts(
        artifact_uri=version.uri, tracking_uri=registry.tracking_uri(), dst_path=staging
    )
    try:
        # Atomic: replicas loading the same version at once never read a half-written copy.
        os.rename(staging, cache)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another replica got there first
    return str(cache)


def _described(local: str) -> dict[str, Any]:
    """The artifact's MLmodel file: its flavors and signature."""
    import yaml

    found = yaml.safe_load((Path(local) / "MLmodel").read_text())
    return found if isinstance(found, dict) else {}


def _torch_module(local: str, described: dict[str, Any]) -> Any:
    """The module MLflow's pytorch flavor saved.

    The flavor's file (a pickled module, or a TorchScript archive that ``torch.load`` hands to
    ``torch.jit.load``) is read as MLflow reads it, without importing MLflow: that import is
    ~0.6 s of every new replica's start, ~1 s on a loaded machine. Anything else, or pickle
    turned off by ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``, goes through MLflow.
    """
    import torch

    flavor = (described.get("flavors") or {}).get("pytorch") or {}
    saved = Path(local) / str(flavor.get("model_data", "data")) / "model.pth"
    pickle_allowed = os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true").lower() in (
        "true",
        "1",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes on quantized storage and TorchScript
        if saved.is_file() and not flavor.get("code") and pickle_allowed:
            return torch.load(saved, map_location="cpu", weights_only=False)
        import mlflow

        return mlflow.pytorch.load_model(local, map_location="cpu")


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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.ao.quantization.quantize_dynamic(
                module, {torch.nn.Linear}, dtype=torch.qint8
            )
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


def load_embedder(version: registry.Version, threads: int = 1) -> Embedder:
    """Download a sentence-transformers version and load it on the CPU.

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
    import mlflow
    import torch

    # Everything a model needs is in its artifact: never ask the Hugging Face hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(threads)
    try:
        local = _local_copy(version)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = mlflow.sentence_transformers.load_model(local)
    except Exception as exc:  # MLflow, transformers and torch each raise their own types
        cause = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else repr(exc)
        raise errors.StorageError(
            f"{version.name}:{version.version} (sentence-transformers) cannot be loaded: {cause}",
            "Import the model again, or roll back to a version that loads.",
        ) from exc
    return Embedder(model)
