"""``kind: tune`` — a hyperparameter search over a train or finetune config with Ray Tune.

The search space names fields of the searched config by dotted path (``optimizer.lr``,
``model.hidden_sizes``, ``lora.rank``); each trial is that config with the trial's values, run
by the same loop as ``jobs.train`` or ``jobs.finetune``. Validated without Ray; ``domain()`` and
``scheduler()`` convert to Tune objects lazily.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, PositiveInt, ValidationInfo, field_validator, model_validator

from aiaas.config.base import ConfigModel, Name
from aiaas.config.finetune import STEP_METRICS, FinetuneConfig
from aiaas.config.train import EPOCH_METRICS, RegisterSpec, ScalingSpec, TrainConfig

_RANGES = ("uniform", "loguniform", "randint")
_LISTS = ("choice", "grid")


class Domain(ConfigModel):
    """Exactly one way to draw a value: a range (uniform, loguniform, randint) or a list
    (choice: sampled; grid: every value, each ``num_samples`` times)."""

    uniform: list[float] | None = Field(None, description="[low, high): a float")
    loguniform: list[float] | None = Field(None, description="[low, high): a float, log scale")
    randint: list[int] | None = Field(None, description="[low, high): an integer")
    choice: list[Any] | None = Field(None, description="one of these values")
    grid: list[Any] | None = Field(None, description="every one of these values")

    @model_validator(mode="after")
    def _one_way(self) -> Domain:
        given = [name for name in (*_RANGES, *_LISTS) if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of uniform, loguniform, randint, choice, grid "
                f"(got {', '.join(given) or 'none'})"
            )
        name = given[0]
        values = getattr(self, name)
        if name in _LISTS:
            if not values:
                raise ValueError(f"{name} needs at least one value")
            return self
        if len(values) != 2:
            raise ValueError(f"{name} needs [low, high], got {values}")
        low, high = values
        if not low < high:
            raise ValueError(f"{name} range [{low}, {high}] is empty or inverted; use low < high")
        if name == "loguniform" and low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {low}")
        return self

    @property
    def kind(self) -> str:
        return next(name for name in (*_RANGES, *_LISTS) if getattr(self, name) is not None)

    def values(self) -> list[Any]:
        """Values that show the range: both ends (or every listed value)."""
        data = getattr(self, self.kind)
        if self.kind in _LISTS:
            return list(data)
        low, high = data
        if self.kind == "randint":
            return [low, high - 1]
        return [low, high * (1 - 1e-9)]

    def domain(self) -> Any:
        """The Ray Tune search-space object."""
        from ray import tune

        data = getattr(self, self.kind)
        if self.kind == "choice":
            return tune.choice(data)
        if self.kind == "grid":
            return tune.grid_search(data)
        return getattr(tune, self.kind)(*data)


class SchedulerSpec(ConfigModel):
    """Early stopping of weak trials, measured in epochs."""

    name: Literal["asha", "median", "none"] = Field(
        "asha", description="asha (async successive halving), median stopping, or none"
    )
    grace_period: PositiveInt = Field(2, description="epochs every trial runs before a stop")
    reduction_factor: float = Field(2.0, gt=1, description="asha: keep 1/factor per rung")


class TuneConfig(ConfigModel):
    """A search over a train or finetune config's hyperparameters; the best trial can be
    registered."""

    kind: Literal["tune"] = Field(description="always 'tune'")
    name: Name = Field(description="tune run name; --resume continues the run of this name")
    train: str | None = Field(
        None, description="the train config searched, e.g. configs/train/digits_mlp.yaml"
    )
    finetune: str | None = Field(
        None,
        description="or the finetune config searched, e.g. "
        "configs/finetune/smollm2_iso_dates_lora_quick.yaml",
    )
    search_space: dict[str, Domain] = Field(
        min_length=1, description="dotted field of the searched config → how to draw it"
    )
    metric: str = Field(
        "val_accuracy",
        description="metric trials are compared by (a finetune search: eval_loss by default)",
    )
    mode: Literal["max", "min"] = Field(
        "max", description="whether the metric is maximised (a finetune search: min by default)"
    )
    num_samples: PositiveInt = Field(8, description="trials (with grid: repeats of the grid)")
    max_concurrent_trials: PositiveInt = Field(2, description="trials running at once")
    seed: int | None = Field(
        None, ge=0, description="seeds the sampling: the same seed draws the same trial values"
    )
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec, description="early stopping")
    scaling: ScalingSpec | None = Field(
        None,
        description="workers and resources of each trial of a train search (default: the "
        "train config's; a finetune search takes the finetune config's)",
    )
    registration: RegisterSpec | None = Field(
        None,
        description="registration of the best trial of a train search (default: the train "
        "config's; a finetune search registers as its finetune config says)",
    )

    @model_validator(mode="before")
    @classmethod
    def _finetune_defaults(cls, data: Any) -> Any:
        # A fine-tune reports losses, not accuracy: without a metric, compare validation loss.
        if isinstance(data, dict) and data.get("finetune") is not None and "metric" not in data:
            data = {**data, "metric": "eval_loss", "mode": data.get("mode", "min")}
        return data

    @field_validator("search_space")
    @classmethod
    def _known_fields(cls, value: dict[str, Domain], info: ValidationInfo) -> dict[str, Domain]:
        searched = FinetuneConfig if info.data.get("finetune") is not None else TrainConfig
        for path in value:
            problem = _field_problem(path, searched)
            if problem:
                raise ValueError(problem)
        return value

    @field_validator("metric")
    @classmethod
    def _reported(cls, value: str, info: ValidationInfo) -> str:
        finetune = info.data.get("finetune") is not None
        reported = STEP_METRICS if finetune else EPOCH_METRICS
        if value not in reported:
            job = "fine-tuning" if finetune else "training"
            raise ValueError(
                f"the {job} job never reports '{value}'; use one of {', '.join(reported)}"
            )
        return value

    @field_validator("scaling", "registration")
    @classmethod
    def _train_search_only(cls, value: Any, info: ValidationInfo) -> Any:
        finetune = info.data.get("finetune")
        if value is not None and finetune is not None:
            raise ValueError(
                f"a finetune search takes {info.field_name} from its finetune config; set it "
                f"there ({finetune}) and drop it here"
            )
        return value

    @model_validator(mode="after")
    def _one_searched_config(self) -> TuneConfig:
        if (self.train is None) == (self.finetune is None):
            raise ValueError("name the searched config: exactly one of train or finetune")
        return self

    @property
    def searched(self) -> str:
        """The path of the searched config."""
        found = self.train or self.finetune
        assert found is not None
        return found

    def trial_count(self) -> int:
        grids = [len(d.grid or []) for d in self.search_space.values() if d.kind == "grid"]
        return self.num_samples * math.prod(grids)

    def param_space(self) -> dict[str, Any]:
        """Tune's param_space: one flat key per dotted path."""
        return {path: domain.domain() for path, domain in self.search_space.items()}


#: Fields that say what a run is, not how it learns: no search may set them.
_NOT_HYPERPARAMETERS = (
    "kind",
    "name",
    "dataset",
    "registration",
    "scaling",
    "base_model",
    "method",
    "checkpoint",
    "max_failures",
)


def _field_problem(path: str, searched: type[ConfigModel]) -> str | None:
    """Why a dotted path names no field of the searched config a search may set, or None."""
    model: Any = searched
    parts = path.split(".")
    for index, part in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            import difflib

            known = sorted(fields) if fields else []
            close = difflib.get_close_matches(part, known, n=1)
            label = "finetune" if searched is FinetuneConfig else "train"
            where = ".".join(parts[:index]) or f"the {label} config"
            guess = f"; did you mean '{close[0]}'?" if close else ""
            return f"'{path}': {where} has no field '{part}'{guess}"
        annotation = fields[part].annotation
        model = _config_model(annotation)
    if parts[0] in _NOT_HYPERPARAMETERS:
        return (
            f"'{path}' is not a hyperparameter; search the optimizer, schedule, batch or model "
            "fields (a finetune config's lora fields too)"
        )
    return None


def _config_model(annotation: Any) -> type | None:
    """The config model of a field (``LoraSpec | None`` → ``LoraSpec``), or None."""
    if isinstance(annotation, type):
        return annotation
    inner = [a for a in getattr(annotation, "__args__", ()) if isinstance(a, type)]
    models = [a for a in inner if hasattr(a, "model_fields")]
    return models[0] if models else None


def apply(train: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The train config (as data) with the trial's values set at their dotted paths."""
    import copy

    result = copy.deepcopy(train)
    for path, value in params.items():
        target = result
        *parents, leaf = path.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    return result
