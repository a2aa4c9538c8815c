"""``kind: optimize`` — make a registered version cheaper to serve, with accuracy/latency gates."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from aiaas import errors, model_ref
from aiaas.config.base import ConfigModel, Name

METHODS = ("dynamic-int8", "torchscript", "onnx")


class OptimizeGate(ConfigModel):
    """What the optimized version must keep to be registered."""

    max_accuracy_drop: NonNegativeFloat = Field(
        0.5, description="largest test-accuracy drop allowed, in percentage points"
    )
    max_latency_ratio: PositiveFloat | None = Field(
        None,
        description="largest p50 single-request latency allowed, as a multiple of the parent's "
        "(e.g. 1.0: no slower); unset: reported, not gated",
    )


class LatencySpec(ConfigModel):
    """How parent and optimized version are timed (alternating, in one process)."""

    single_requests: PositiveInt = Field(300, description="one-row calls per round and model")
    batch_size: PositiveInt = Field(64, description="rows per call of the batched measurement")
    batches: PositiveInt = Field(50, description="batched calls per round and model")
    rounds: PositiveInt = Field(3, description="alternating rounds; medians are reported")
    threads: PositiveInt = Field(1, description="intra-op threads, as a serving replica uses")


class OptimizeConfig(ConfigModel):
    """Optimize one registered version and register the result as a new version."""

    kind: Literal["optimize"] = Field(description="always 'optimize'")
    name: Name = Field(description="job name (default: <model>-v<version>-<method>)")
    model: str = Field(description="the parent: NAME:VERSION or NAME@ALIAS")
    method: Literal["dynamic-int8", "torchscript", "onnx"] = Field(
        description="dynamic-int8 (Linear layers to int8), torchscript (traced, frozen) or onnx"
    )
    register_as: Name | None = Field(
        None, description="registered model to add the version to (default: the parent's)"
    )
    gate: OptimizeGate = Field(default_factory=OptimizeGate, description="registration gate")
    latency: LatencySpec = Field(default_factory=LatencySpec, description="latency measurement")

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("name") and data.get("model"):
            ref = str(data["model"]).replace(":", "-v").replace("@", "-")
            data = {**data, "name": f"{ref}-{data.get('method', 'optimize')}"[:40].strip("-")}
        return data

    @field_validator("model")
    @classmethod
    def _reference(cls, value: str) -> str:
        try:
            model_ref.parse_ref(value, needs_version=True)
        except errors.ConfigError as exc:
            raise ValueError(f"{exc.message}; {exc.hint}") from None
        return value

    @property
    def parent(self) -> model_ref.ModelRef:
        return model_ref.parse_ref(self.model, needs_version=True)
