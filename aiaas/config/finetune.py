"""``kind: finetune`` — fine-tune a registered causal LM (LoRA or full) on a chat data set.

The base model is a registry reference (``smollm2@production``); the data set is one prepared
as tokenized Parquet splits (``input_ids``, ``labels``, ``attention_mask``; ``prompt`` and
``target`` on the test split). Validated without Ray or torch; the GPU path (FSDP, bf16) is
chosen here and refused where it cannot run.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

from pydantic import (
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationInfo,
    field_validator,
)

from aiaas import errors, model_ref
from aiaas.config.base import ConfigModel, Name
from aiaas.config.train import ScalingSpec

if TYPE_CHECKING:
    from ray import train as ray_train

_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")


#: What a fine-tuning run reports at each eval step (what a finetune search can compare).
STEP_METRICS = ("eval_loss", "train_loss")


class LoraSpec(ConfigModel):
    """The low-rank adapter peft adds beside the chosen linear layers (``method: lora``)."""

    rank: PositiveInt = Field(8, le=256, description="rank r of each adapter's A and B matrices")
    alpha: PositiveInt = Field(16, description="scaling numerator: updates scale by alpha/rank")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="names of the linear layers to adapt (the last part of their module path, "
        "e.g. q_proj); checked against the base model before the job starts",
    )

    @field_validator("target_modules")
    @classmethod
    def _module_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _MODULE.match(name):
                raise ValueError(
                    f"'{name}' is not a module name; use names such as q_proj or self_attn.q_proj"
                )
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} listed more than once; list each once")
        return value


class OptimizerSpec(ConfigModel):
    """The optimizer of the trainable weights (the adapter's, or all for ``method: full``)."""

    name: Literal["adamw", "sgd"] = Field("adamw", description="torch optimizer")
    lr: PositiveFloat = Field(1e-3, le=1.0, description="peak learning rate")
    weight_decay: NonNegativeFloat = Field(0.0, description="decoupled weight decay (adamw)")
    momentum: NonNegativeFloat = Field(0.9, description="sgd only")
    max_grad_norm: PositiveFloat | None = Field(
        1.0, description="clip the gradient norm of each optimizer step; null: no clipping"
    )


class ScheduleSpec(ConfigModel):
    """How the learning rate moves per optimizer step: linear warm-up, then decay."""

    name: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="decay after warm-up: cosine, linear, or none (constant)"
    )
    warmup_steps: NonNegativeInt = Field(0, description="optimizer steps of linear warm-up")
    min_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="the decayed learning rate's floor, as a share of lr"
    )


class FinetuneScaling(ScalingSpec):
    """Ray Train workers and how they share the model."""

    resources_per_worker: dict[str, NonNegativeFloat] = Field(
        default_factory=lambda: {"CPU": 1.0},
        description="resources each worker reserves (Ray scheduling slots, not cores)",
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every worker holds the whole model; fsdp: the model is sharded over "
        "the workers' GPUs (needs use_gpu: true)",
    )
    torch_threads: PositiveInt | None = Field(
        None,
        description="torch intra-op threads per worker; default: the worker's CPUs (at least 1)",
    )

    @field_validator("resources_per_worker")
    @classmethod
    def _gpus_need_use_gpu(cls, value: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        if value.get("GPU") and not info.data.get("use_gpu"):
            raise ValueError(
                "asks for GPUs but scaling.use_gpu is false; set use_gpu: true or drop GPU "
                "from resources_per_worker"
            )
        return value

    @field_validator("strategy")
    @classmethod
    def _fsdp_needs_gpus(cls, value: str, info: ValidationInfo) -> str:
        if value == "fsdp" and not info.data.get("use_gpu"):
            raise ValueError(
                "fsdp shards the model over GPUs and needs scaling.use_gpu: true (Ray Train runs "
                "FSDP on CUDA only); use strategy: ddp on CPUs"
            )
        return value

    def threads(self) -> int:
        """The torch threads a worker runs with."""
        return self.torch_threads or max(1, int(self.resources_per_worker.get("CPU", 1)))


class FinetuneCheckpoints(ConfigModel):
    """How often the trainable weights, the optimizer state and the step are checkpointed."""

    every_steps: PositiveInt = Field(
        50, description="optimizer steps between checkpoints (the last step is always one)"
    )
    num_to_keep: PositiveInt | None = Field(2, description="checkpoints kept; null keeps all")


class FinetuneGate(ConfigModel):
    """What the fine-tuned model must reach to be registered."""

    eval_loss_below_base: bool = Field(
        True,
        description="the validation loss (target tokens only) must be below the base model's",
    )
    min_exact_match: float = Field(
        ge=0,
        le=1,
        description="share of test prompts whose greedy answer the skill's exact_match accepts",
    )
    test_rows: PositiveInt = Field(
        32, description="test prompts answered for the exact-match score (the first N rows)"
    )
    max_new_tokens: PositiveInt = Field(64, le=4096, description="tokens generated per answer")


class FinetuneRegistration(ConfigModel):
    """Register the result as a new version of ``model`` when the gate holds."""

    model: Name = Field(
        description="registered model the version is added to, e.g. 'smollm2-skill'; a LoRA "
        "run registers its adapter only (format hf-lora-adapter), a full run a whole model"
    )
    gate: FinetuneGate = Field(description="registration gate")


class FinetuneConfig(ConfigModel):
    """A fine-tuning run of a registered causal LM on a prepared chat data set."""

    kind: Literal["finetune"] = Field(description="always 'finetune'")
    name: Name = Field(
        description="run name; a run restarted under the same name resumes from its latest "
        "checkpoint"
    )
    base_model: str = Field(
        description="the causal LM to start from: NAME:VERSION or NAME@ALIAS "
        "(e.g. smollm2@production); the version it names is recorded in the lineage"
    )
    dataset: Name = Field(description="a chat data set prepared with 'aiaas data prepare'")
    method: Literal["lora", "full"] = Field(
        "lora", description="lora: train a low-rank adapter only; full: every weight"
    )
    lora: LoraSpec | None = Field(
        None, description="the adapter (method: lora; default: rank 8 on q/k/v/o_proj)"
    )
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec, description="optimizer")
    schedule: ScheduleSpec = Field(
        default_factory=ScheduleSpec, description="learning-rate schedule per optimizer step"
    )
    batch_size: PositiveInt = Field(8, description="sequences per micro-batch on each worker")
    gradient_accumulation_steps: PositiveInt = Field(
        1, description="micro-batches per optimizer step"
    )
    max_seq_len: int = Field(
        512,
        ge=8,
        le=32768,
        description="longest sequence in tokens; the data set must be tokenized to at most this",
    )
    epochs: PositiveInt | None = Field(None, description="passes over the train split")
    max_steps: PositiveInt | None = Field(
        None, description="optimizer steps in all (instead of epochs)"
    )
    eval_every_steps: PositiveInt | None = Field(
        None,
        description="optimizer steps between validation passes; null: at the end of each epoch "
        "(the last step is always evaluated)",
    )
    seed: NonNegativeInt = Field(0, description="seed of the adapter's init and the shuffling")
    scaling: FinetuneScaling = Field(
        default_factory=FinetuneScaling, description="workers and hardware"
    )
    mixed_precision: Literal["bf16"] | None = Field(
        None,
        description="bf16: compute in bfloat16 on GPUs (autocast; FSDP also shards in bf16); "
        "null: float32",
    )
    checkpoint: FinetuneCheckpoints = Field(
        default_factory=FinetuneCheckpoints, description="checkpoints"
    )
    max_failures: int = Field(
        2, ge=-1, description="worker-group restarts after a failure (-1: unlimited)"
    )
    registration: FinetuneRegistration | None = Field(
        None, description="gate and registration after training"
    )

    @field_validator("base_model")
    @classmethod
    def _reference(cls, value: str) -> str:
        try:
            model_ref.parse_ref(value, needs_version=True)
        except errors.ConfigError as exc:
            raise ValueError(
                f"'{value}' names no version; write NAME:VERSION or NAME@ALIAS "
                "(e.g. smollm2@production)"
            ) from exc
        return value

    @field_validator("lora")
    @classmethod
    def _lora_only_with_lora(cls, value: LoraSpec | None, info: ValidationInfo) -> LoraSpec | None:
        if value is not None and info.data.get("method") == "full":
            raise ValueError(
                "applies to method: lora only; drop the lora section or set method: lora"
            )
        return value

    @field_validator("max_steps")
    @classmethod
    def _one_length(cls, value: int | None, info: ValidationInfo) -> int | None:
        epochs = info.data.get("epochs")
        if value is not None and epochs is not None:
            raise ValueError("set either epochs or max_steps, not both")
        if value is None and epochs is None and "epochs" in info.data:
            raise ValueError("set epochs or max_steps: how long the run trains")
        schedule = info.data.get("schedule")
        if value is not None and schedule is not None and schedule.warmup_steps >= value:
            raise ValueError(
                f"schedule.warmup_steps ({schedule.warmup_steps}) must be below max_steps "
                f"({value}); shorten the warm-up"
            )
        return value

    @field_validator("mixed_precision")
    @classmethod
    def _bf16_needs_gpus(cls, value: str | None, info: ValidationInfo) -> str | None:
        scaling = info.data.get("scaling")
        if value == "bf16" and scaling is not None and not scaling.use_gpu:
            raise ValueError(
                "bf16 is the GPU path and needs scaling.use_gpu: true; on CPUs leave "
                "mixed_precision unset (float32)"
            )
        return value

    @property
    def adapter(self) -> LoraSpec:
        """The LoRA adapter (the defaults when the config has no lora section)."""
        return self.lora or LoraSpec()

    @property
    def base(self) -> model_ref.ModelRef:
        """The base model reference."""
        return model_ref.parse_ref(self.base_model, needs_version=True)

    def failure_config(self) -> ray_train.FailureConfig:
        """The Ray Train FailureConfig."""
        from ray import train

        return train.FailureConfig(max_failures=self.max_failures)

    def checkpoint_config(self) -> ray_train.CheckpointConfig:
        """The Ray Train CheckpointConfig: the latest ``num_to_keep`` checkpoints."""
        from ray import train

        return train.CheckpointConfig(num_to_keep=self.checkpoint.num_to_keep)
