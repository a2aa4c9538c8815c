"""LoRA adapters as registry versions: the adapter's files only, with lineage to its base.

A fine-tuning job (``jobs.finetune``) registers the low-rank adapter it trained as a version of
a model of its own, format ``hf-lora-adapter``: peft's ``adapter_config.json`` and
``adapter_model.safetensors`` (the A and B matrices, a few MB), never a copy of the base
weights. The version's ``parent`` tag names the exact base version (``smollm2:3``), so
``aiaas models show`` walks from the adapter to the base it needs; loading one means loading
that base and applying the adapter (:func:`load`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from aiaas import errors, registration, registry

#: The format tag of an adapter version.
FORMAT = "hf-lora-adapter"
#: Where an adapter version keeps its files, relative to the artifact.
DATA = "adapter"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
#: Every file an adapter directory holds.
FILES = (CONFIG_FILE, WEIGHTS_FILE)


def problem(directory: Path) -> str | None:
    """Why a directory is not a LoRA adapter of aiaas's kind (its files only, LoRA weights
    only), or None.

    The weights are checked by tensor name, without loading them: every one must belong to a
    ``lora_A``/``lora_B`` matrix, so no base weight travels with an adapter.
    """
    from safetensors import safe_open

    present = sorted(path.name for path in directory.iterdir())
    if present != sorted(FILES):
        return f"holds {', '.join(present) or 'nothing'} instead of {', '.join(sorted(FILES))}"
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except ValueError:
        return f"{CONFIG_FILE} is not JSON"
    if str(config.get("peft_type", "")).upper() != "LORA":
        return f"{CONFIG_FILE} describes a '{config.get('peft_type')}' adapter, not LoRA"
    with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as weights:
        names = list(weights.keys())
    if not names:
        return f"{WEIGHTS_FILE} holds no tensors"
    foreign = [name for name in names if ".lora_A." not in name and ".lora_B." not in name]
    if foreign:
        return f"{WEIGHTS_FILE} holds {len(foreign)} tensors that are no LoRA matrix ({foreign[0]})"
    return None


def register(
    run_id: str,
    model_name: str,
    adapter_directory: Path,
    base: registry.Version,
    tags: dict[str, str],
) -> registration.Registered:
    """Log an adapter directory's files and register them as a new version of ``model_name``.

    Args:
        tags: Lineage; ``parent`` (the base version) is added here.

    Raises:
        ConfigError: The directory is not a LoRA adapter (see :func:`problem`).
    """
    import peft

    found = problem(adapter_directory)
    if found:
        raise errors.ConfigError(
            f"{adapter_directory}: not a LoRA adapter ({found}), so it was not registered",
            "Register what peft's save_pretrained wrote for a LoRA model.",
        )
    parent = f"{base.name}:{base.version}"

    def save(directory: Path, mlflow_model: Any) -> None:
        (directory / DATA).mkdir(parents=True, exist_ok=True)
        for name in FILES:
            shutil.copyfile(adapter_directory / name, directory / DATA / name)
        mlflow_model.add_flavor(
            "aiaas", format=FORMAT, data=DATA, base_model=parent, peft_version=peft.__version__
        )
        mlflow_model.save(str(directory / "MLmodel"))

    registry.client()  # points MLflow's fluent API at the registry
    number, manifest = registration.log_sealed(
        run_id, model_name, registration.Sealed("aiaas.lora_adapter", save)
    )
    return registration.finish(
        model_name, number, run_id, {**tags, "parent": parent}, FORMAT, manifest
    )


def local_directory(version: registry.Version) -> Path:
    """The adapter version's files on this machine, checked against its manifest."""
    from aiaas import artifacts

    if version.format != FORMAT:
        raise errors.ConfigError(
            f"{version.name}:{version.version} is a '{version.format}' model, not a LoRA adapter",
            "Name an adapter version registered by 'aiaas finetune'.",
        )
    return artifacts.verified_copy(version) / DATA


def trained_on(adapter_directory: Path) -> str:
    """The base version an adapter's files say it was trained on (``smollm2:1``), from the
    artifact's MLmodel: a replica that loads from a pin has no registry tags to ask; "" when
    the artifact does not say."""
    import yaml

    try:
        mlmodel = yaml.safe_load((adapter_directory.parent / "MLmodel").read_text())
    except (OSError, yaml.YAMLError):
        return ""
    flavor = (mlmodel or {}).get("flavors", {}).get("aiaas", {})
    return str(flavor.get("base_model") or "")


def load(base_directory: Path, adapter_directory: Path, *, merge: bool = True) -> Any:
    """The base model (a Hugging Face directory) with the adapter applied, on the CPU, in eval
    mode; merged into the base weights unless ``merge`` is false (then a peft model)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_directory, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(model, str(adapter_directory))
    return (adapted.merge_and_unload() if merge else adapted).eval()
