"""Checks that run before a job is submitted, so bad input fails in seconds, not minutes."""

from __future__ import annotations

from pathlib import Path

from aiaas import datasets, errors, models, placement, registry
from aiaas.config import loader
from aiaas.config.cluster import ClusterConfig
from aiaas.config.finetune import FinetuneConfig
from aiaas.config.train import ScalingSpec, TrainConfig
from aiaas.config.tune import TuneConfig, apply
from aiaas.dashboard import Dashboard
from aiaas.storage import Storage
from jobs import finetune_data, finetune_plan, finetune_trainer


def check_train(config: TrainConfig, config_path: Path, cluster: ClusterConfig) -> None:
    """The data set exists, the model fits it, and the workers can be placed on the cluster.

    Raises:
        ConfigError: What is wrong and how to fix it.
    """
    schema = datasets.load_schema(Storage(cluster.storage_root), config.dataset)
    models.build(config.model, len(schema.features), schema.num_classes, schema.feature_shape)
    _check_placement(config.scaling, config_path, cluster)


def check_finetune(
    config: FinetuneConfig, config_path: Path, cluster: ClusterConfig, uri: str
) -> tuple[registry.Version, finetune_plan.StepPlan]:
    """The base model is a causal LM in the registry at ``uri``, the chat data set fits the
    config, and the workers can be placed; returns the base version and the step plan.

    Raises:
        ConfigError: What is wrong and how to fix it.
    """
    base = finetune_trainer.resolve_base(config, uri)
    data = finetune_data.describe(Storage(cluster.storage_root), config.dataset, config.max_seq_len)
    steps = finetune_plan.step_plan(config, data.rows["train"])
    _check_placement(config.scaling, config_path, cluster)
    return base, steps


def _check_placement(scaling: ScalingSpec, config_path: Path, cluster: ClusterConfig) -> None:
    nodes = _alive_node_resources(cluster)
    if nodes is None:
        return  # the submission itself reports an unreachable cluster
    problem = placement.problem(nodes, scaling.worker_resources(), scaling.num_workers)
    if problem:
        raise errors.ConfigError(
            f"{config_path}: scaling: {problem}",
            "Lower scaling.num_workers or scaling.resources_per_worker, or add nodes.",
        )


def check_tune(
    config: TuneConfig, config_path: Path, cluster: ClusterConfig, uri: str | None = None
) -> TrainConfig | FinetuneConfig:
    """The searched config loads, every end of every range makes a valid config of its kind,
    and a trial fits the cluster (for a finetune search: its base model is in the registry at
    ``uri`` and its data set fits); returns the searched config.

    Raises:
        ConfigError: What is wrong and how to fix it.
    """
    field = "finetune" if config.finetune is not None else "train"
    searched_path = Path(config.searched)
    if not searched_path.is_file():
        raise errors.ConfigError(
            f"{config_path}: {field}: {config.searched} does not exist",
            f"Name a {field} config relative to the project root, e.g. "
            + (
                "configs/finetune/smollm2_iso_dates_lora_quick.yaml."
                if field == "finetune"
                else "configs/train/digits_mlp.yaml."
            ),
        )
    if field == "finetune":
        searched = loader.load(searched_path, FinetuneConfig)
        _check_ends(config, config_path, searched)
        check_finetune(searched, config_path, cluster, uri or "")
        return searched
    base = loader.load(searched_path, TrainConfig)
    _check_ends(config, config_path, base)
    trial = base
    if config.scaling is not None:
        trial = base.model_copy(update={"scaling": config.scaling})
    check_train(trial, config_path, cluster)
    return base


def _check_ends(config: TuneConfig, config_path: Path, base: TrainConfig | FinetuneConfig) -> None:
    """Every end of every range, set alone, still makes a valid config."""
    from pydantic import ValidationError

    data = base.model_dump(mode="json")
    for path, domain in config.search_space.items():
        for value in domain.values():
            try:
                type(base).model_validate(apply(data, {path: value}))
            except ValidationError as exc:
                reason = exc.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
                raise errors.ConfigError(
                    f"{config_path}: search_space.{path}: {value!r} is not a valid value for "
                    f"{config.searched}: {reason}",
                    "Narrow the range or list to values the searched config accepts.",
                ) from None


def _alive_node_resources(cluster: ClusterConfig) -> list[dict[str, float]] | None:
    try:
        with Dashboard(cluster.dashboard_url(), cluster.auth_mode) as dashboard:
            if not dashboard.reachable():
                return None
            # A refused token is an error to show, not a check to skip: nodes() raises it.
            entries = dashboard.nodes()
    except (KeyError, ValueError):
        return None
    return [entry["resources_total"] for entry in entries if entry["state"] == "ALIVE"]
