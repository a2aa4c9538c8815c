"""The weights of a fine-tuning run: the model a worker trains, and its checkpoints.

A checkpoint directory holds the trainable weights and where training stood::

    adapter/            method lora: peft's adapter_config.json + adapter_model.safetensors
    model/              method full: the whole model (config.json, model.safetensors)
    trainer_state.pt    step, epoch, the base model's validation loss, optimizer and schedule
    figures.json        what the step reported (losses, throughput): what the gate reads

``trainer_state.pt`` holds tensors, numbers and containers only and is read with
``torch.load(weights_only=True)``: a checkpoint is data, never code. Weights and optimizer state
are gathered with ``torch.distributed.checkpoint``'s state-dict functions, keyed by parameter
name whatever wraps the model (DDP, FSDP, nothing), so a run can resume on another worker count.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiaas import adapters, errors
from aiaas.config.finetune import FinetuneConfig
from jobs import finetune_plan

ADAPTER = "adapter"
MODEL = "model"
STATE = "trainer_state.pt"
FIGURES = "figures.json"


@dataclass
class TrainerState:
    """Where a run stood at a checkpoint."""

    step: int
    epoch: int
    base_eval_loss: float
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]

    def save(self, path: Path) -> None:
        import torch

        torch.save(self.__dict__, path)

    @classmethod
    def load(cls, path: Path) -> TrainerState:
        import torch

        return cls(**torch.load(path, weights_only=True, map_location="cpu"))


def build(config: FinetuneConfig, base_directory: Path) -> Any:
    """The base model in float32, with a fresh LoRA adapter for ``method: lora``.

    Raises:
        ConfigError: A LoRA target names no module of the model.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_directory, dtype=torch.float32)
    model.config.use_cache = False  # training: no key/value cache
    if config.method == "full":
        return model
    import peft

    check_targets(config, model)
    spec = config.adapter
    lora = peft.LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, lora)


def check_targets(config: FinetuneConfig, model: Any) -> None:
    """Every LoRA target names a module of the model (one built on the meta device will do).

    Raises:
        ConfigError: Targets that name none, with the linear layers the model has.
    """
    if config.method != "lora":
        return
    missing = finetune_plan.unmatched_targets(
        (name for name, _ in model.named_modules()), config.adapter.target_modules
    )
    if missing:
        raise errors.ConfigError(
            f"lora.target_modules: {', '.join(missing)} name no module of {type(model).__name__}",
            f"Use linear layers it has, e.g. {', '.join(linear_names(model)[:8])}.",
        )


def skeleton(base_directory: Path) -> Any:
    """The base model's modules without weights (on the meta device): instant, for checks."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base_directory))


def linear_names(model: Any) -> list[str]:
    """The distinct last names of the model's linear layers (what LoRA can target)."""
    from torch import nn

    found: list[str] = []
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and last not in found:
            found.append(last)
    return found


def trainable_names(model: Any) -> set[str]:
    """Names of the weights the optimizer changes (the adapter's, or all)."""
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def optimizer(config: FinetuneConfig, model: Any) -> Any:
    """The optimizer over the trainable weights of the (prepared) model."""
    import torch

    spec = config.optimizer
    params = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if spec.name == "sgd":
        return torch.optim.SGD(
            params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
        )
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)


@dataclass(frozen=True)
class Gathered:
    """Full (unsharded) trainable weights and optimizer state, on the CPU of rank 0."""

    model: dict[str, Any]
    optimizer: dict[str, Any]


def gather(
    model: Any, optimizer: Any, plan: finetune_plan.ParallelPlan, trainable: set[str]
) -> Gathered:
    """The trainable weights and the optimizer state by parameter name. Every rank calls it
    (under FSDP it gathers shards); rank 0 gets the whole state, the others may get none."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    weights = get_model_state_dict(
        model,
        options=StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True),
    )
    state = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    # A weight tied to a frozen one (the output layer to the embeddings) can come along: keep
    # exactly what is trained.
    return Gathered({k: v for k, v in weights.items() if k in trainable}, state)


def load_optimizer(
    model: Any, optimizer: Any, state: dict[str, Any], plan: finetune_plan.ParallelPlan
) -> None:
    """Load a gathered optimizer state into the optimizer of the prepared model (sharding it
    again under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=plan.sharded)
    )


def save(
    raw: Any,
    config: FinetuneConfig,
    weights: dict[str, Any],
    state: TrainerState,
    figures: dict[str, Any],
    directory: Path,
    base: str,
) -> None:
    """Write a checkpoint: the trainable weights (the adapter alone for LoRA), the state and
    the step's figures.

    Args:
        raw: The model as built (not wrapped for DDP or FSDP): it knows how to save itself.
        weights: :attr:`Gathered.model`.
        base: The base version, ``NAME:VERSION``, recorded in the adapter's config.
    """
    import json

    if config.method == "lora":
        raw.peft_config["default"].base_model_name_or_path = base
        raw.save_pretrained(
            str(directory / ADAPTER), state_dict=weights, save_embedding_layers=False
        )
        # peft writes a model card beside the adapter; the registry records what it would say.
        (directory / ADAPTER / "README.md").unlink(missing_ok=True)
    else:
        raw.save_pretrained(str(directory / MODEL), state_dict=weights, safe_serialization=True)
    state.save(directory / STATE)
    (directory / FIGURES).write_text(json.dumps(figures, indent=2) + "\n")


def read_figures(directory: Path) -> dict[str, Any]:
    """The figures reported with a checkpoint."""
    import json

    found: dict[str, Any] = json.loads((directory / FIGURES).read_text())
    return found


def restore(
    config: FinetuneConfig, base_directory: Path, directory: Path
) -> tuple[Any, TrainerState]:
    """The model with a checkpoint's weights, and where the run stood.

    Raises:
        JobError: The checkpoint's adapter does not fit the config's model.
    """
    import torch
    from transformers import AutoModelForCausalLM

    state = TrainerState.load(directory / STATE)
    if config.method == "full":
        model = AutoModelForCausalLM.from_pretrained(directory / MODEL, dtype=torch.float32)
        model.config.use_cache = False
        return model, state
    import peft
    from safetensors.torch import load_file

    model = build(config, base_directory)
    loaded: Any = peft.set_peft_model_state_dict(
        model, load_file(str(directory / ADAPTER / adapters.WEIGHTS_FILE))
    )
    if loaded.unexpected_keys:
        raise errors.JobError(
            f"the checkpoint in {directory} holds adapter weights this config's model has no "
            f"place for ({loaded.unexpected_keys[0]}, ...)",
            "The lora section changed since the run started: start a run under a new name.",
        )
    return model, state


def load_trained(config: FinetuneConfig, base_directory: Path, directory: Path) -> Any:
    """The fine-tuned model of a checkpoint for inference: on the CPU, eval mode, the adapter
    merged into the base weights."""
    import torch
    from transformers import AutoModelForCausalLM

    if config.method == "lora":
        return adapters.load(base_directory, directory / ADAPTER)
    return AutoModelForCausalLM.from_pretrained(directory / MODEL, dtype=torch.float32).eval()
