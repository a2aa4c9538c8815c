"""What a fine-tuning run will do, worked out from its config before any weight moves.

Pure functions of the config (and the train split's row count): how many optimizer steps, when
to evaluate and checkpoint, the learning rate of each step, and the parallel path — DDP or FSDP,
float32 or bfloat16 — with the ``prepare_model`` arguments and the autocast it implies. The
driver (:mod:`jobs.finetune_trainer`) and the workers (:mod:`jobs.finetune_loop`) both use them,
so they agree on every step without talking.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from aiaas import errors
from aiaas.config.finetune import FinetuneConfig, ScheduleSpec


class StepPlan(BaseModel):
    """How a run's optimizer steps fall into epochs (shipped to the workers as JSON)."""

    model_config = ConfigDict(frozen=True)

    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: int
    eval_every_steps: int | None
    checkpoint_every_steps: int

    def evaluates(self, step: int) -> bool:
        """Whether the validation split is evaluated after optimizer step ``step`` (1-based)."""
        if step >= self.total_steps:
            return True
        every = self.eval_every_steps or self.steps_per_epoch
        return step % every == 0

    def checkpoints(self, step: int) -> bool:
        """Whether a checkpoint is saved after optimizer step ``step`` (the last one always)."""
        return step >= self.total_steps or step % self.checkpoint_every_steps == 0

    def epoch_of(self, step: int) -> int:
        """The (0-based) epoch that optimizer step ``step + 1`` belongs to."""
        return step // self.steps_per_epoch


def step_plan(config: FinetuneConfig, train_rows: int) -> StepPlan:
    """The steps of a run over a train split of ``train_rows`` rows.

    Every worker takes the same number of micro-batches per epoch (its equal share of the rows,
    whole batches only), so DDP and FSDP ranks stay in step.

    Raises:
        ConfigError: The split is too small for one optimizer step.
    """
    workers = config.scaling.num_workers
    per_step = config.batch_size * config.gradient_accumulation_steps
    steps_per_epoch = (train_rows // workers // config.batch_size) // (
        config.gradient_accumulation_steps
    )
    if steps_per_epoch == 0:
        raise errors.ConfigError(
            f"the train split of '{config.dataset}' has {train_rows} rows, too few for one "
            f"optimizer step of batch_size × gradient_accumulation_steps × num_workers = "
            f"{per_step * workers} rows",
            "Lower batch_size, gradient_accumulation_steps or scaling.num_workers, or prepare "
            "more rows.",
        )
    total = config.max_steps or (config.epochs or 1) * steps_per_epoch
    return StepPlan(
        micro_batches_per_epoch=steps_per_epoch * config.gradient_accumulation_steps,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        epochs=math.ceil(total / steps_per_epoch),
        eval_every_steps=config.eval_every_steps,
        checkpoint_every_steps=config.checkpoint.every_steps,
    )


def lr_factor(step: int, total_steps: int, schedule: ScheduleSpec) -> float:
    """The learning rate of the optimizer step after ``step`` finished ones, as a share of lr.

    Linear warm-up over ``warmup_steps`` (never 0: the first step already learns), then cosine
    or linear decay towards ``min_lr_ratio``, reached when the last step is done (so the last
    step still learns), or constant.
    """
    warmup = schedule.warmup_steps
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule.name == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    floor = schedule.min_lr_ratio
    if schedule.name == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return floor + (1 - floor) * (1 - progress)


@dataclass(frozen=True)
class ParallelPlan:
    """How the workers share the model and in which precision they compute."""

    #: ``parallel_strategy`` of ``ray.train.torch.prepare_model``.
    strategy: Literal["ddp", "fsdp"]
    #: FSDP over more than one worker: state dicts are gathered from shards (a collective).
    sharded: bool
    #: torch.distributed backend of the TorchConfig.
    backend: Literal["nccl", "gloo"]
    device_type: Literal["cuda", "cpu"]
    #: The autocast dtype of forward passes, None for float32.
    autocast_dtype: Literal["bfloat16"] | None
    #: FSDP's parameter dtype for compute (its MixedPrecision), None for float32.
    fsdp_param_dtype: Literal["bfloat16"] | None


def parallel_plan(config: FinetuneConfig) -> ParallelPlan:
    """The parallel path a config selects: FSDP and bf16 on GPUs, DDP in float32 on CPUs.

    The config schema already refuses FSDP or bf16 without ``use_gpu``.
    """
    scaling = config.scaling
    bf16 = config.mixed_precision == "bf16" and scaling.use_gpu
    fsdp = scaling.strategy == "fsdp"
    return ParallelPlan(
        strategy=scaling.strategy,
        sharded=fsdp and scaling.num_workers > 1,
        backend="nccl" if scaling.use_gpu else "gloo",
        device_type="cuda" if scaling.use_gpu else "cpu",
        autocast_dtype="bfloat16" if bf16 else None,
        fsdp_param_dtype="bfloat16" if bf16 and fsdp else None,
    )


def prepare_kwargs(plan: ParallelPlan, model: Any) -> dict[str, Any]:
    """The keyword arguments of ``ray.train.torch.prepare_model(model, **kwargs)``.

    FSDP wraps each transformer block (the classes the model names in ``_no_split_modules``),
    keeps the original parameters (``use_orig_params``: a LoRA model mixes frozen and trainable
    weights in one block), and with bf16 computes in bfloat16 while reducing gradients in float32.
    """
    if plan.strategy == "ddp":
        return {"parallel_strategy": "ddp"}
    import torch
    from torch.distributed.fsdp import MixedPrecision
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    options: dict[str, Any] = {
        "use_orig_params": True,
        "auto_wrap_policy": ModuleWrapPolicy(block_classes(model)),
        "limit_all_gathers": True,
    }
    if plan.fsdp_param_dtype == "bfloat16":
        options["mixed_precision"] = MixedPrecision(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.bfloat16
        )
    return {"parallel_strategy": "fsdp", "parallel_strategy_kwargs": options}


def block_classes(model: Any) -> set[type]:
    """The module classes a Hugging Face model says not to split (its transformer blocks)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return {type(module) for module in model.modules() if type(module).__name__ in names}


def autocast(plan: ParallelPlan) -> contextlib.AbstractContextManager[Any]:
    """The context forward passes run in: bf16 autocast on the GPU path, else nothing."""
    if plan.autocast_dtype is None:
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device_type=plan.device_type, dtype=getattr(torch, plan.autocast_dtype))


def unmatched_targets(module_names: Iterable[str], targets: list[str]) -> list[str]:
    """The LoRA target modules that name no module of the model (peft matches a target by the
    end of a module's dotted path)."""
    names = list(module_names)
    return [
        target
        for target in targets
        if not any(name == target or name.endswith(f".{target}") for name in names)
    ]
