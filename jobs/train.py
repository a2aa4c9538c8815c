"""The training job: ``python -m jobs.train CONFIG`` on the cluster (submitted through Ray Jobs).

Ray Data streams the prepared Parquet splits to the workers of a ``TorchTrainer`` (DDP over gloo
on CPU, NCCL with ``use_gpu``); each epoch reports train/validation metrics with a checkpoint;
a failed worker group restarts from the latest checkpoint (``max_failures``), and so does a run
restarted under the same name. The driver then evaluates the best checkpoint on the test split
and registers it in MLflow when the gate passes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from aiaas import datasets, errors, placement, registration, registry
from aiaas.config import loader
from aiaas.config.train import TrainConfig
from aiaas.storage import Storage
from jobs import entrypoint, evaluation, records

PROGRESS = "aiaas-progress"
READ_TASK_CPUS = 0.25
#: Per-epoch metrics kept in a run's history (job record, MLflow).
HISTORY_KEYS = (
    "epoch",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "samples_per_s",
)


def train_loop(loop: dict[str, Any]) -> None:
    """One Ray Train worker: the DDP training loop."""
    import ray.train
    import ray.train.torch
    import torch
    from torch import nn

    from aiaas import models

    config = TrainConfig.model_validate(loop["config"])
    schema = datasets.DatasetSchema.model_validate(loop["schema"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # Small models on a few cores run faster single-threaded than fighting over threads.
    torch.set_num_threads(max(1, int(config.scaling.resources_per_worker.get("CPU", 1))))
    torch.manual_seed(config.seed)
    device = ray.train.torch.get_device()
    model = models.build(
        config.model, len(schema.features), schema.num_classes, schema.feature_shape
    )
    optimizer = _optimizer(config, model)
    scheduler = _scheduler(config, optimizer)
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            # Tensors, numbers and containers only: a checkpoint is data, never code.
            state = torch.load(Path(directory) / "state.pt", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"] + 1
        if rank == 0:
            print(f"{PROGRESS} {json.dumps({'resumed_from_epoch': state['epoch']})}", flush=True)
    model = ray.train.torch.prepare_model(model)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    features, label = schema.features, schema.label
    # A split is either a Ray Dataset (streamed, or read into memory from its shard) or, when
    # a worker's share fits in memory, a Parquet path each worker reads its share of directly.
    direct: dict[str, str] = loop.get("parquet", {})
    train_shard: Any = None if "train" in direct else ray.train.get_dataset_shard("train")
    val_shard: Any = None if "validation" in direct else ray.train.get_dataset_shard("validation")

    def tensors(batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.column_stack([batch[name] for name in features]).astype(np.float32, copy=False)
        # Arrow hands out read-only label arrays, which torch will not wrap: copy the labels.
        return torch.from_numpy(x), torch.from_numpy(np.array(batch[label], dtype=np.int64))

    loading = time.perf_counter()
    limit = int(config.shard_memory_limit)
    train_rows, val_rows = (
        _ShardInMemory.read_share(direct[split], rank, world, tensors)
        if split in direct
        else _ShardInMemory.load(shard, tensors, limit)
        for split, shard in (("train", train_shard), ("validation", val_shard))
    )
    if rank == 0:
        where = "in memory" if train_rows is not None else "streamed by Ray Data"
        event = {"shard": where, "load_s": round(time.perf_counter() - loading, 3)}
        print(f"{PROGRESS} {json.dumps(event)}", flush=True)

    def train_batches(epoch: int) -> Any:
        if train_rows is not None:
            return train_rows.shuffled(config.batch_size, config.seed + epoch)
        streamed = train_shard.iter_batches(
            batch_size=config.batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=config.batch_size * 16,
            local_shuffle_seed=config.seed + epoch,
        )
        return (tensors(batch) for batch in streamed)

    def val_batches() -> Any:
        if val_rows is not None:
            return val_rows.in_order(1024)
        streamed = val_shard.iter_batches(batch_size=1024, batch_format="numpy")
        return (tensors(batch) for batch in streamed)

    gauges = _TrainGauges(config) if rank == 0 else None
    report_seconds = 0.0
    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        model.train()
        # Running sums in place: a tiny model's step is ~1 ms, so per-batch bookkeeping shows.
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        rows = 0
        waited = 0.0
        batches = iter(train_batches(epoch))
        if rank == 0 and epoch == start_epoch:
            _phase("first_step")
        while True:
            fetch = time.perf_counter()
            batch = next(batches, None)
            waited += time.perf_counter() - fetch
            if batch is None:
                break
            x, y = batch[0].to(device), batch[1].to(device)
            optimizer.zero_grad()
            logits = model(x)
            loss = loss_fn(logits, y)
            (loss / len(y)).backward()
            optimizer.step()
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y).sum()
            rows += len(y)
        scheduler.step()
        totals = torch.stack([loss_sum, correct.float(), torch.tensor(float(rows), device=device)])
        train_seconds = time.perf_counter() - started
        model.eval()
        val = torch.zeros(3, device=device)
        with torch.no_grad():
            for x_cpu, y_cpu in val_batches():
                x, y = x_cpu.to(device), y_cpu.to(device)
                logits = model(x)
                val += _counts(loss_fn(logits, y), logits, y)
        if world > 1:
            torch.distributed.all_reduce(totals)
            torch.distributed.all_reduce(val)
        metrics = {
            "epoch": epoch,
            "train_loss": float(totals[0] / totals[2]),
            "train_accuracy": float(totals[1] / totals[2]),
            "val_loss": float(val[0] / max(float(val[2]), 1.0)),
            "val_accuracy": float(val[1] / max(float(val[2]), 1.0)),
            "samples_per_s": float(totals[2]) / train_seconds,
            "lr": float(scheduler.get_last_lr()[0]),
            # Where an epoch's time goes: waiting for data, validation, the previous report.
            "data_wait_s": round(waited, 3),
            "epoch_s": round(time.perf_counter() - started, 3),
            "previous_report_s": round(report_seconds, 3),
            "peak_rss_mb": _peak_rss_mb(),
        }
        reported = time.perf_counter()
        if rank == 0:
            print(f"{PROGRESS} {json.dumps(metrics)}", flush=True)
            # Uploaded to storage in the background (Ray deletes the local copy after), so the
            # next epoch starts while the checkpoint is persisted. A worker that dies before
            # the upload ends loses that checkpoint only; the previous one stays.
            directory = tempfile.mkdtemp(prefix="aiaas-ckpt-")
            torch.save(
                {
                    "epoch": epoch,
                    "model": _unwrap(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                },
                Path(directory) / "state.pt",
            )
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(directory),
                checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                delete_local_checkpoint_after_upload=True,
            )
        else:
            ray.train.report(metrics)
        report_seconds = time.perf_counter() - reported
        if gauges is not None:
            gauges.record(metrics, report_seconds)


class _ShardInMemory:
    """A worker's whole shard as two tensors, reshuffled every epoch like a plain PyTorch loop.

    Streaming every epoch through Ray Data costs about a millisecond of iterator work per small
    batch; a shard that fits in memory is read once, in large batches, instead.
    """

    def __init__(self, x: Any, y: Any) -> None:
        self.x, self.y = x, y

    @classmethod
    def load(cls, shard: Any, tensors: Any, limit_bytes: int) -> _ShardInMemory | None:
        """The shard in memory, or None when it is larger than ``limit_bytes`` (then read no
        further than the limit)."""
        import torch

        if limit_bytes <= 0:
            return None
        xs, ys, size = [], [], 0
        for batch in shard.iter_batches(batch_size=8192, batch_format="numpy"):
            x, y = tensors(batch)
            size += x.element_size() * x.nelement() + y.element_size() * y.nelement()
            if size > limit_bytes:
                return None
            xs.append(x)
            ys.append(y)
        if not xs:
            return cls(torch.zeros((0, 0)), torch.zeros(0, dtype=torch.long))
        return cls(torch.cat(xs), torch.cat(ys))

    @classmethod
    def read_share(cls, path: str, rank: int, world: int, tensors: Any) -> _ShardInMemory:
        """Rows ``[rank * n, (rank + 1) * n)`` of a Parquet split, ``n`` the same for every
        worker (DDP needs equal steps; at most ``world - 1`` rows are left out), reading only
        the files that hold them."""
        import pyarrow.dataset
        import torch

        fragments = sorted(
            pyarrow.dataset.dataset(path, format="parquet").get_fragments(),
            key=lambda fragment: fragment.path,
        )
        counts = [fragment.count_rows() for fragment in fragments]
        share = sum(counts) // world
        start, end = rank * share, (rank + 1) * share
        # Filled file by file: the peak is the share as tensors plus one file, not the share
        # as an Arrow table plus its float64 copy.
        x_all = y_all = None
        offset = filled = 0
        for fragment, count in zip(fragments, counts, strict=True):
            if offset < end and offset + count > start:
                first = max(start, offset)
                table = fragment.to_table().slice(first - offset, min(end, offset + count) - first)
                x, y = tensors({name: table[name].to_numpy() for name in table.column_names})
                if x_all is None:
                    x_all = torch.empty((share, *x.shape[1:]), dtype=x.dtype)
                    y_all = torch.empty(share, dtype=y.dtype)
                x_all[filled : filled + len(y)] = x
                y_all[filled : filled + len(y)] = y  # type: ignore[index]
                filled += len(y)
            offset += count
        if x_all is None or y_all is None:
            return cls(torch.zeros((0, 0)), torch.zeros(0, dtype=torch.long))
        return cls(x_all, y_all)

    def shuffled(self, batch_size: int, seed: int) -> Any:
        import torch

        order = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(seed))
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            yield self.x[index], self.y[index]

    def in_order(self, batch_size: int) -> Any:
        for start in range(0, len(self.y), batch_size):
            yield self.x[start : start + batch_size], self.y[start : start + batch_size]


class _TrainGauges:
    """The epoch's figures as Prometheus metrics (rank 0 only: the metrics are global)."""

    def __init__(self, config: TrainConfig) -> None:
        from aiaas import metrics

        registered = config.registration.model_name if config.registration else config.model.name
        self.tags = {"run": config.name, "model": registered}
        self.samples = metrics.TRAIN_SAMPLES_PER_S.create()
        self.epoch = metrics.TRAIN_EPOCH.create()
        self.loss = metrics.TRAIN_LOSS.create()
        self.accuracy = metrics.TRAIN_ACCURACY.create()
        self.checkpoint = metrics.TRAIN_CHECKPOINT_SECONDS.create()

    def record(self, figures: dict[str, float], checkpoint_seconds: float) -> None:
        self.samples.set(figures["samples_per_s"], tags=self.tags)
        self.epoch.set(figures["epoch"], tags=self.tags)
        for split in ("train", "val"):
            tags = {**self.tags, "split": "validation" if split == "val" else split}
            self.loss.set(figures[f"{split}_loss"], tags=tags)
            self.accuracy.set(figures[f"{split}_accuracy"], tags=tags)
        self.checkpoint.observe(checkpoint_seconds, tags=self.tags)


def _counts(loss: Any, logits: Any, y: Any) -> Any:
    """Loss sum, correct predictions and rows of a batch, as one tensor to all-reduce."""
    import torch

    return torch.stack(
        [loss, (logits.argmax(1) == y).sum().float(), torch.tensor(float(len(y)), device=y.device)]
    )


def run(config: TrainConfig, config_path: Path) -> dict[str, Any]:
    """Train, evaluate on the test split and register; returns the outcome for the job record.

    Raises:
        AiaasError: A bad input (missing data set, model that does not fit, unplaceable workers)
            or a failed registration gate.
    """
    import ray.train

    storage, schema = prepare(config, config_path)
    direct = direct_splits(config, storage, schema)
    splits = read_splits(config, storage, skip=direct)
    trainer = build_trainer(config, schema, splits, storage, run_name=config.name, direct=direct)
    started = time.perf_counter()
    _phase("fit_started")
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
    train_seconds = time.perf_counter() - started
    _phase("fit_done")
    best = result.get_best_checkpoint(config.checkpoint.score_metric, config.checkpoint.score_order)
    if best is None:
        raise errors.JobError(f"run '{config.name}' finished without a checkpoint")
    outcome = evaluate_and_register(
        config,
        config_path,
        schema,
        storage,
        best,
        _history(result),
        {"run": config.name, "train_seconds": round(train_seconds, 2)},
    )
    _phase("registered")
    return outcome


def _phase(name: str) -> None:
    """A wall-clock mark in the job log: where a job's start-up and wrap-up time goes, and the
    process's peak memory so far."""
    event = {"phase": name, "at": round(time.time(), 3), "peak_rss_mb": _peak_rss_mb()}
    print(f"{PROGRESS} {json.dumps(event)}", flush=True)


def _peak_rss_mb() -> float:
    import resource

    # ru_maxrss is in KiB on Linux.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def prepare(config: TrainConfig, config_path: Path) -> tuple[Storage, datasets.DatasetSchema]:
    """Check the data set and the model, join the cluster and check the workers fit on it."""
    import ray
    import ray.data

    storage = _storage()
    schema = datasets.load_schema(storage, config.dataset)
    _check_model_fits(config, schema)
    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    unplaceable = placement.problem(
        nodes,
        config.scaling.worker_resources(),
        config.scaling.num_workers,
    )
    if unplaceable:
        raise errors.ConfigError(
            f"{config_path}: scaling: {unplaceable}",
            "Lower scaling.num_workers or scaling.resources_per_worker, or add nodes.",
        )
    ray.data.DataContext.get_current().enable_progress_bars = False
    return storage, schema


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
        train_loop,
        train_loop_config={
            "config": config.loop_config(),
            "schema": schema.model_dump(mode="json"),
            "parquet": direct or {},
        },
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


def evaluate_and_register(
    config: TrainConfig,
    config_path: Path,
    schema: datasets.DatasetSchema,
    storage: Storage,
    best: Any,
    history: list[dict[str, float]],
    outcome: dict[str, Any],
    lineage_extra: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint on the test split; log the run and register it if the gate holds.

    Raises:
        entrypoint.GateFailed: The gate does not hold; nothing is registered.
    """
    model = evaluation.load_model(config, schema, best)
    test = evaluation.evaluate(model, storage, config, schema)
    outcome = {
        **outcome,
        "test": test,
        "epochs_run": len(history),
        "history": history,
        "checkpoint": best.path,
    }
    print(f"{PROGRESS} {json.dumps({'test': test})}", flush=True)
    if config.registration is None:
        return outcome
    lineage = {**_lineage(config, config_path, schema), **(lineage_extra or {})}
    run_id = registration.log_run(
        experiment=config.name,
        run_name=lineage["job_id"],
        params=_flatten(config.model_dump(mode="json")),
        history=history,
        metrics=test,
        tags=lineage,
    )
    broken = config.registration.failures(test)
    if broken:
        outcome["gate"] = "failed: " + "; ".join(broken)
        raise entrypoint.GateFailed(
            f"registration gate failed: {'; '.join(broken)}; nothing was registered",
            outcome,
        )
    lineage["checkpoint"] = best.path
    already = [
        version
        for version in registry.versions(config.registration.model_name)
        # One registered before artifacts carried digests cannot be served: register anew.
        if version.ready
        and version.artifact_sha256
        and version.lineage.get("checkpoint") == best.path
    ]
    if already:
        # A finished run started again resumes at its end: same weights, no second version.
        outcome["registered"] = {
            "model": config.registration.model_name,
            "version": already[0].version,
            "already": True,
        }
        outcome["gate"] = "passed"
        return outcome
    example = evaluation.test_head(storage, config.dataset, schema)
    registered = registration.register_torch_model(
        run_id, config.registration.model_name, model, example, lineage
    )
    outcome["registered"] = {"model": registered.name, "version": registered.version}
    outcome["gate"] = "passed"
    return outcome


def main(argv: list[str]) -> int:
    """Entry point of ``python -m jobs.train CONFIG``."""
    if len(argv) != 1:
        print("usage: python -m jobs.train CONFIG", file=sys.stderr)
        return 2
    config_path = Path(argv[0])
    _phase("driver_started")
    code, outcome = entrypoint.run_job(
        "train", config_path, lambda: run(loader.load(config_path, TrainConfig), config_path)
    )
    registered = (outcome or {}).get("registered")
    if outcome and registered:
        verb = "Already registered as" if registered.get("already") else "Registered"
        print(
            f"{verb} {registered['model']} version {registered['version']} "
            f"(test accuracy {outcome['test']['accuracy']:.4f})"
        )
    return code


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


def _storage() -> Storage:
    root = os.environ.get("AIAAS_STORAGE_ROOT")
    if not root:
        raise errors.ClusterError(
            "AIAAS_STORAGE_ROOT is not set on this node",
            "Run the job on a cluster started with 'aiaas cluster up' (it sets the storage root).",
        )
    return Storage(root)


def _check_model_fits(config: TrainConfig, schema: datasets.DatasetSchema) -> None:
    from aiaas import models

    models.build(config.model, len(schema.features), schema.num_classes, schema.feature_shape)


def _optimizer(config: TrainConfig, model: Any) -> Any:
    import torch

    spec = config.optimizer
    if spec.name == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
        )
    factory = torch.optim.AdamW if spec.name == "adamw" else torch.optim.Adam
    return factory(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)


def _scheduler(config: TrainConfig, optimizer: Any) -> Any:
    import torch

    spec = config.schedule
    if spec.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    if spec.name == "step":
        return torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=spec.step_size, gamma=spec.gamma
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _unwrap(model: Any) -> Any:
    return model.module if hasattr(model, "module") else model


def _history(result: Any) -> list[dict[str, float]]:
    frame = result.metrics_dataframe
    if frame is None or frame.empty:
        return []
    keep = [c for c in HISTORY_KEYS if c in frame.columns]
    rows = frame[keep].drop_duplicates(subset="epoch", keep="last").to_dict("records")
    return [{key: float(value) for key, value in row.items()} for row in rows]


def _lineage(
    config: TrainConfig, config_path: Path, schema: datasets.DatasetSchema
) -> dict[str, str]:
    return {
        "job_id": records.current_job_id(),
        "ray_job_id": _ray_job_id(),
        "dataset": schema.name,
        "dataset_fingerprint": schema.fingerprint,
        "config_path": str(config_path),
        "config_hash": records.config_hash(config.model_dump(mode="json")),
        "git_commit": records.git_commit(),
        "run": config.name,
    }


def _ray_job_id() -> str:
    import ray

    return str(ray.get_runtime_context().get_job_id())


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
