"""The training driver: what runs in a job's driver process around the workers.

It checks the data set and the model, joins the cluster and checks the workers fit on it, reads
the splits, builds the ``TorchTrainer`` (scaling, checkpoints, failures; a run restarted under
the same name resumes from its latest checkpoint) and fits it. Train and tune (one trainer per
trial) both build theirs here; the workers run :func:`jobs.train_loop.train_loop`. Fine-tuning
builds its own (:mod:`jobs.finetune_trainer`) and shares the cluster check and the fit.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from aiaas import datasets, errors, placement, progress
from aiaas.config.finetune import FinetuneConfig
from aiaas.config.train import ScalingSpec, TrainConfig
from aiaas.storage import Storage
from jobs import entrypoint, outcomes, train_loop

READ_TASK_CPUS = 0.25


def prepare(config: TrainConfig, config_path: Path) -> tuple[Storage, datasets.DatasetSchema]:
    """Check the data set and the model, join the cluster and check the workers fit on it."""
    storage = entrypoint.storage()
    schema = datasets.load_schema(storage, config.dataset)
    _check_model_fits(config, schema)
    join_cluster(config.scaling, config_path)
    return storage, schema


def join_cluster(scaling: ScalingSpec, config_path: Path) -> None:
    """Join the job's cluster and check the run's workers can be placed on it.

    Raises:
        ConfigError: The workers can never be placed on the cluster's nodes.
    """
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    unplaceable = placement.problem(nodes, scaling.worker_resources(), scaling.num_workers)
    if unplaceable:
        raise errors.ConfigError(
            f"{config_path}: scaling: {unplaceable}",
            "Lower scaling.num_workers or scaling.resources_per_worker, or add nodes.",
        )
    ray.data.DataContext.get_current().enable_progress_bars = False


def build_trainer(
    config: TrainConfig,
    schema: datasets.DatasetSchema,
    splits: dict[str, Any],
    storage: Storage,
    run_name: str,
    callbacks: list[Any] | None = None,
    direct: dict[str, str] | None = None,
) -> Any:
    """The TorchTrainer of a train config (a tune trial builds one per trial); ``direct``:
    splits the workers read from Parquet themselves (see :func:`direct_splits`)."""
    from ray.train import RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_loop.train_loop,
        train_loop_config=train_loop.LoopArgs(
            config=config, dataset_schema=schema, parquet=direct or {}
        ).loop_config(),
        scaling_config=config.scaling.scaling_config(),
        torch_config=TorchConfig(backend="nccl" if config.scaling.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage.path("runs"),
            checkpoint_config=config.checkpoint.checkpoint_config(),
            failure_config=config.failure_config(),
            callbacks=callbacks or None,
        ),
        datasets=splits,
    )


def read_splits(
    config: TrainConfig, storage: Storage, skip: dict[str, str] | None = None
) -> dict[str, Any]:
    """The train and validation splits (less those in ``skip``) as Ray Datasets, read into the
    object store once when ``cache_data`` is on (a tune search shares them across its trials)."""
    import pyarrow
    import ray.data

    splits: dict[str, Any] = {}
    for split in ("train", "validation"):
        if split in (skip or {}):
            continue
        try:
            dataset = ray.data.read_parquet(
                datasets.split_path(storage, config.dataset, split),
                # Small read tasks: when a node is lost, Ray re-runs them to rebuild the cached
                # blocks while the training workers still hold most CPUs.
                ray_remote_args={"num_cpus": READ_TASK_CPUS},
            )
            # Read once into the object store: every epoch then splits cached blocks instead
            # of scheduling new read tasks, which costs seconds per epoch on a small cluster.
            splits[split] = dataset.materialize() if config.cache_data else dataset
        except (pyarrow.ArrowException, OSError) as exc:
            raise _unreadable(config, split, exc) from None
    return splits


def direct_splits(
    config: TrainConfig, storage: Storage, schema: datasets.DatasetSchema
) -> dict[str, str]:
    """The splits whose per-worker share fits in ``shard_memory_limit``: each worker reads its
    share of the Parquet files itself, once, which skips Ray Data's start-up (a split
    coordinator and read tasks, seconds on a small cluster) for data that needs no streaming."""
    import pyarrow
    import pyarrow.dataset

    direct = {}
    for split in ("train", "validation"):
        if _shard_bytes(schema, split, config) > int(config.shard_memory_limit):
            continue
        path = datasets.split_path(storage, config.dataset, split)
        try:
            pyarrow.dataset.dataset(path, format="parquet").schema  # noqa: B018 - readable?
        except (pyarrow.ArrowException, OSError) as exc:
            raise _unreadable(config, split, exc) from None
        direct[split] = path
    return direct


def _unreadable(config: TrainConfig, split: str, exc: Exception) -> errors.ConfigError:
    return errors.ConfigError(
        f"the {split} split of data set '{config.dataset}' cannot be read: "
        f"{str(exc).strip().splitlines()[-1][:300]}",
        f"Prepare it again: aiaas data prepare configs/data/{config.dataset}.yaml",
    )


def _shard_bytes(schema: datasets.DatasetSchema, split: str, config: TrainConfig) -> float:
    """A worker's share of a split as float32 features and int64 labels."""
    row = 4 * len(schema.features) + 8
    return schema.rows.get(split, 0) * row / config.scaling.num_workers


def _check_model_fits(config: TrainConfig, schema: datasets.DatasetSchema) -> None:
    from aiaas import models

    models.build(config.model, len(schema.features), schema.num_classes, schema.feature_shape)


def fit(config: TrainConfig | FinetuneConfig, trainer: Any) -> tuple[Any, float]:
    """Fit a run's trainer; returns Ray Train's result and the seconds the fit took.

    Raises:
        JobError: The run failed after its restarts.
    """
    import ray.train

    started = time.perf_counter()
    progress.phase("fit_started")
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        # Wrapped at our boundary: the job record and `aiaas jobs status` get the cause.
        raise errors.JobError(
            f"training run '{config.name}' failed after {config.max_failures} restart(s): "
            f"{str(exc).strip().splitlines()[-1][:500]}",
            "See the worker errors with 'aiaas jobs logs ID'; a restart under the same name "
            "resumes from the latest checkpoint.",
        ) from exc
    seconds = time.perf_counter() - started
    progress.phase("fit_done")
    return result, seconds


def best_checkpoint(config: TrainConfig, result: Any) -> Any:
    """The run's best checkpoint by the config's score."""
    best = result.get_best_checkpoint(config.checkpoint.score_metric, config.checkpoint.score_order)
    if best is None:
        raise errors.JobError(f"run '{config.name}' finished without a checkpoint")
    return best


def history(result: Any) -> list[outcomes.EpochMetrics]:
    """A fitted run's per-epoch metrics, the last report of each epoch."""
    frame = result.metrics_dataframe
    if frame is None or frame.empty:
        return []
    keep = [c for c in outcomes.HISTORY_KEYS if c in frame.columns]
    rows = frame[keep].drop_duplicates(subset="epoch", keep="last").to_dict("records")
    return [history_row(row) for row in rows]


def history_row(row: dict[str, Any]) -> outcomes.EpochMetrics:
    """One reported row (Ray Train's metrics, a Tune dataframe row) as an epoch of history."""
    return outcomes.EpochMetrics.model_validate(
        {key: float(value) for key, value in row.items() if key in outcomes.HISTORY_KEYS}
    )
