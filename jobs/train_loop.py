"""The training loop: what runs in each Ray Train worker of a ``TorchTrainer``.

Each worker reads its share of the train and validation splits (a Ray Data shard, or straight
from Parquet when it fits in memory), runs the DDP epoch loop, and reports each epoch's metrics
to Ray Train; rank 0 prints them as progress events, saves the checkpoint and sets the gauges.
The driver that starts the workers is :mod:`jobs.trainer`.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from aiaas import datasets, progress
from aiaas.config.train import TrainConfig


class LoopArgs(BaseModel):
    """What the driver ships to every worker (Ray Train passes it on as a plain dict)."""

    config: TrainConfig
    dataset_schema: datasets.DatasetSchema
    parquet: dict[str, str] = Field(
        default_factory=dict,
        description="splits each worker reads its share of from Parquet itself, by split name",
    )

    def loop_config(self) -> dict[str, Any]:
        """The ``train_loop_config`` of a TorchTrainer."""
        return self.model_dump(mode="json")


def train_loop(loop: dict[str, Any]) -> None:
    """One Ray Train worker: the DDP training loop."""
    import ray.train
    import ray.train.torch
    import torch
    from torch import nn

    from aiaas import models

    args = LoopArgs.model_validate(loop)
    config, schema = args.config, args.dataset_schema
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
            progress.emit({"resumed_from_epoch": state["epoch"]})
    model = ray.train.torch.prepare_model(model)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    features, label = schema.features, schema.label
    # A split is either a Ray Dataset (streamed, or read into memory from its shard) or, when
    # a worker's share fits in memory, a Parquet path each worker reads its share of directly.
    direct = args.parquet
    train_shard: Any = None if "train" in direct else ray.train.get_dataset_shard("train")
    val_shard: Any = None if "validation" in direct else ray.train.get_dataset_shard("validation")

    def tensors(batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.column_stack([batch[name] for name in features]).astype(np.float32, copy=False)
        # Arrow hands out read-only label arrays, which torch will not wrap: copy the labels.
        return torch.from_numpy(x), torch.from_numpy(np.array(batch[label], dtype=np.int64))

    loading = time.perf_counter()
    limit = int(config.shard_memory_limit)
    train_rows, val_rows = (
        ShardInMemory.read_share(direct[split], rank, world, tensors)
        if split in direct
        else ShardInMemory.load(shard, tensors, limit)
        for split, shard in (("train", train_shard), ("validation", val_shard))
    )
    if rank == 0:
        where = "in memory" if train_rows is not None else "streamed by Ray Data"
        event = {"shard": where, "load_s": round(time.perf_counter() - loading, 3)}
        progress.emit(event)

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
            progress.phase("first_step")
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
            "peak_rss_mb": progress.peak_rss_mb(),
        }
        reported = time.perf_counter()
        if rank == 0:
            progress.emit(metrics)
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


class ShardInMemory:
    """A worker's whole shard as two tensors, reshuffled every epoch like a plain PyTorch loop.

    Streaming every epoch through Ray Data costs about a millisecond of iterator work per small
    batch; a shard that fits in memory is read once, in large batches, instead.
    """

    def __init__(self, x: Any, y: Any) -> None:
        self.x, self.y = x, y

    @classmethod
    def load(cls, shard: Any, tensors: Any, limit_bytes: int) -> ShardInMemory | None:
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
    def read_share(cls, path: str, rank: int, world: int, tensors: Any) -> ShardInMemory:
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
