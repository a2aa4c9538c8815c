"""``kind: train`` — one distributed training run: data, model, optimizer, scaling, registration.

Validated without Ray; ``scaling_config()`` and friends convert to Ray Train objects lazily.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    ByteSize,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from aiaas.config.base import ConfigModel, Name

if TYPE_CHECKING:
    from ray import train as ray_train

#: Metrics measured on the test split, which a registration gate may test.
GATE_METRICS = ("accuracy", "loss")
#: Metrics reported every epoch, which checkpoints may be ranked by.
EPOCH_METRICS = ("val_accuracy", "val_loss", "train_loss", "train_accuracy")
_CONDITION = re.compile(r"^\s*(>=|<=|>|<)\s*([-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)\s*$")


class ModelSpec(ConfigModel):
    """Which network of the zoo, and its size."""

    name: Literal["mlp", "cnn"] = Field(description="'mlp' for any table, 'cnn' for image data")
    hidden_sizes: list[PositiveInt] = Field(
        default_factory=lambda: [128, 64], description="mlp: width of each hidden layer"
    )
    channels: list[PositiveInt] = Field(
        default_factory=lambda: [16, 32], description="cnn: channels of each conv block"
    )
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout probability")


class OptimizerSpec(ConfigModel):
    """The optimizer and its learning rate."""

    name: Literal["adam", "adamw", "sgd"] = Field("adam", description="torch optimizer")
    lr: PositiveFloat = Field(1e-3, description="learning rate")
    weight_decay: NonNegativeFloat = Field(0.0, description="L2 penalty")
    momentum: NonNegativeFloat = Field(0.9, description="sgd only")


class ScheduleSpec(ConfigModel):
    """How the learning rate changes per epoch."""

    name: Literal["constant", "cosine", "step"] = Field("constant", description="schedule")
    step_size: PositiveInt = Field(10, description="step: epochs between decays")
    gamma: PositiveFloat = Field(0.1, description="step: decay factor")


class ScalingSpec(ConfigModel):
    """How many Ray Train workers, on what hardware."""

    num_workers: PositiveInt = Field(1, description="Ray Train workers (DDP ranks)")
    use_gpu: bool = Field(False, description="one GPU per worker and NCCL instead of gloo")
    resources_per_worker: dict[str, NonNegativeFloat] = Field(
        default_factory=lambda: {"CPU": 0.5},
        description="resources each worker reserves; fractional CPUs let training and a Serve "
        "replica share a small cluster",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="placement group strategy of the workers"
    )

    def worker_resources(self) -> dict[str, float]:
        """What one worker reserves, with the GPU ``use_gpu`` implies."""
        resources = dict(self.resources_per_worker)
        if self.use_gpu:
            resources.setdefault("GPU", 1)
        return resources

    def scaling_config(self) -> ray_train.ScalingConfig:
        """The Ray Train ScalingConfig."""
        from ray import train

        return train.ScalingConfig(
            num_workers=self.num_workers,
            use_gpu=self.use_gpu,
            resources_per_worker=self.worker_resources(),
            placement_strategy=self.placement_strategy,
        )


class CheckpointSpec(ConfigModel):
    """Which checkpoints to keep."""

    num_to_keep: PositiveInt | None = Field(2, description="checkpoints kept; null keeps all")
    score_metric: Literal["val_accuracy", "val_loss", "train_loss", "train_accuracy"] = Field(
        "val_accuracy", description="epoch metric that ranks checkpoints"
    )
    score_order: Literal["max", "min"] = Field("max", description="whether higher is better")

    def checkpoint_config(self) -> ray_train.CheckpointConfig:
        """The Ray Train CheckpointConfig."""
        from ray import train

        return train.CheckpointConfig(
            num_to_keep=self.num_to_keep,
            checkpoint_score_attribute=self.score_metric,
            checkpoint_score_order=self.score_order,
        )


class RegisterSpec(ConfigModel):
    """Register the trained model in the registry when every gate condition holds."""

    model_name: Name = Field(description="registered model name, e.g. 'digits-mlp'")
    gate: dict[str, str] = Field(
        default_factory=dict,
        description="test-split metric → condition, e.g. {accuracy: '>= 0.95'}",
    )

    @field_validator("gate")
    @classmethod
    def _conditions_parse(cls, value: dict[str, str]) -> dict[str, str]:
        for metric, condition in value.items():
            if metric not in GATE_METRICS:
                raise ValueError(
                    f"'{metric}' is not a test metric; use one of {', '.join(GATE_METRICS)}"
                )
            if not _CONDITION.match(str(condition)):
                raise ValueError(
                    f"condition '{condition}' for '{metric}' must be an operator and a number, "
                    "e.g. '>= 0.95'"
                )
        return value

    def failures(self, metrics: dict[str, float]) -> list[str]:
        """The gate conditions the metrics break, as readable sentences."""
        broken = []
        for metric, condition in self.gate.items():
            match = _CONDITION.match(condition)
            assert match is not None  # checked by the validator
            operator, threshold = match.group(1), float(match.group(2))
            value = metrics[metric]
            holds = {
                ">=": value >= threshold,
                "<=": value <= threshold,
                ">": value > threshold,
                "<": value < threshold,
            }[operator]
            if not holds:
                broken.append(f"test {metric} {value:.4f} is not {operator} {threshold:g}")
        return broken


class TrainConfig(ConfigModel):
    """A training run of a zoo model on a prepared data set with Ray Train."""

    kind: Literal["train"] = Field(description="always 'train'")
    name: Name = Field(
        description="run name; a run restarted under the same name resumes from its latest "
        "checkpoint"
    )
    dataset: Name = Field(description="name of a data set prepared with 'aiaas data prepare'")
    model: ModelSpec = Field(description="the network")
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec, description="optimizer")
    schedule: ScheduleSpec = Field(
        default_factory=ScheduleSpec, description="learning-rate schedule"
    )
    epochs: PositiveInt = Field(description="passes over the training split")
    batch_size: PositiveInt = Field(64, description="rows per step on each worker")
    seed: NonNegativeInt = Field(0, description="seed of weights and shuffling")
    cache_data: bool = Field(
        True,
        description="read the splits into Ray's object store once instead of every epoch; "
        "turn off for data larger than the cluster's object stores",
    )
    shard_memory_limit: ByteSize = Field(
        ByteSize(1 << 30),
        description="a worker's shard up to this size is read once into its memory and "
        "shuffled there every epoch, as a plain PyTorch loop does; a larger one streams from "
        "Ray Data every epoch through a local shuffle buffer. 0: always stream",
    )
    scaling: ScalingSpec = Field(default_factory=ScalingSpec, description="workers and hardware")
    checkpoint: CheckpointSpec = Field(
        default_factory=CheckpointSpec, description="checkpoints kept"
    )
    max_failures: int = Field(
        2, ge=-1, description="worker-group restarts after a failure (-1: unlimited)"
    )
    registration: RegisterSpec | None = Field(None, description="registration after training")

    @model_validator(mode="after")
    def _gpu_resources(self) -> TrainConfig:
        if not self.scaling.use_gpu and self.scaling.resources_per_worker.get("GPU"):
            raise ValueError(
                "scaling.resources_per_worker asks for GPUs but scaling.use_gpu is false; "
                "set use_gpu: true or drop GPU from resources_per_worker"
            )
        return self

    def failure_config(self) -> ray_train.FailureConfig:
        """The Ray Train FailureConfig."""
        from ray import train

        return train.FailureConfig(max_failures=self.max_failures)

    def loop_config(self) -> dict[str, Any]:
        """What each worker's loop needs, as plain data (shipped to the workers)."""
        return self.model_dump(mode="json")
