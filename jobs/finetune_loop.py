"""The fine-tuning loop: what runs in each Ray Train worker of the fine-tuning ``TorchTrainer``.

Each worker loads the base version's Hugging Face directory, wraps it with a peft LoRA adapter
(or trains every weight), prepares it for DDP or FSDP, and runs the steps of the run's
:class:`~jobs.finetune_plan.StepPlan` over its Ray Data shard of the train split: micro-batches
of token rows, the loss on target tokens only, gradient accumulation, clipping and the
warm-up/decay schedule. Before the first step it measures the base model's validation loss; it
evaluates and checkpoints at the plan's steps. Checkpoints (the trainable weights — the adapter
alone for LoRA — with the optimizer, the schedule and the step) go through ``ray.train.report``;
a restarted worker group resumes from the latest one. The driver is :mod:`jobs.finetune_trainer`;
the weights and checkpoint files are :mod:`jobs.finetune_weights`.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from aiaas import progress
from aiaas.config.finetune import FinetuneConfig
from jobs import finetune_data, finetune_plan, finetune_weights


class LoopArgs(BaseModel):
    """What the driver ships to every worker (Ray Train passes it on as a plain dict)."""

    config: FinetuneConfig
    base: dict[str, str]
    steps: finetune_plan.StepPlan

    def loop_config(self) -> dict[str, Any]:
        """The ``train_loop_config`` of a TorchTrainer."""
        return self.model_dump(mode="json")


def token_loss(model: Any, batch: finetune_data.TokenBatch) -> tuple[Any, Any]:
    """The summed next-token cross-entropy over a batch's target tokens, and their count.

    Only positions whose next token has a label count: the prompt, the padding and anything
    labelled -100 add nothing. Sums (not means) let micro-batches of different target counts
    add up to one exact mean per optimizer step.
    """
    import torch

    logits = model(**batch.model_inputs()).logits[:, :-1]
    labels = batch.shifted_labels()
    trained = labels != finetune_data.IGNORE_INDEX
    # Cross-entropy of the trained positions only: the vocabulary-wide softmax is the largest
    # tensor of a small model's step.
    loss = torch.nn.functional.cross_entropy(
        logits[trained].float(), labels[trained], reduction="sum"
    )
    return loss, trained.sum()


@dataclass
class StepFigures:
    """What one optimizer step did on this worker."""

    loss_sum: float
    target_tokens: int
    tokens: int
    sequences: int


def optimizer_step(
    model: Any,
    optimizer: Any,
    group: list[finetune_data.TokenBatch],
    *,
    world: int,
    plan: finetune_plan.ParallelPlan,
    max_grad_norm: float | None,
) -> StepFigures:
    """One optimizer step over ``group`` (the step's micro-batches on this worker).

    Each micro-batch's loss sum is divided by the target tokens of the whole step on every
    worker, so the gradient is the mean over all of them however they fall into micro-batches
    and ranks (DDP averages gradients over ranks, hence the factor ``world``). Gradients are
    synchronized on the last micro-batch only.
    """
    import torch

    targets = torch.tensor(float(sum(batch.target_tokens() for batch in group)))
    if world > 1:
        targets = targets.to(_device_of(model))
        torch.distributed.all_reduce(targets)
    scale = world / max(float(targets), 1.0)
    loss_sum = 0.0
    for index, batch in enumerate(group):
        last = index == len(group) - 1
        syncing = contextlib.nullcontext() if last or world == 1 else model.no_sync()
        with syncing:
            with finetune_plan.autocast(plan):
                loss, _ = token_loss(model, batch)
            (loss * scale).backward()
        loss_sum += float(loss.detach())
    if max_grad_norm is not None:
        if hasattr(model, "clip_grad_norm_"):  # FSDP: the norm over every shard
            model.clip_grad_norm_(max_grad_norm)
        else:
            torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], max_grad_norm
            )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepFigures(
        loss_sum=loss_sum,
        target_tokens=sum(batch.target_tokens() for batch in group),
        tokens=sum(batch.tokens() for batch in group),
        sequences=sum(len(batch.input_ids) for batch in group),
    )


def evaluate(
    model: Any,
    batches: Iterator[finetune_data.TokenBatch],
    plan: finetune_plan.ParallelPlan,
    world: int,
) -> float:
    """Mean loss per target token over the batches of every worker."""
    import torch

    device = _device_of(model)
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    model.eval()
    with torch.no_grad():
        for batch in batches:
            with finetune_plan.autocast(plan):
                loss, count = token_loss(model, batch.to(device))
            sums += torch.stack([loss.double(), count.double()])
    model.train()
    if world > 1:
        torch.distributed.all_reduce(sums)
    return float(sums[0] / sums[1].clamp(min=1))


def finetune_loop(loop: dict[str, Any]) -> None:
    """One Ray Train worker: the fine-tuning loop."""
    args = LoopArgs.model_validate(loop)
    _Worker(args).run()


class _Worker:
    """One worker's model, optimizer and schedule, restored from the latest checkpoint."""

    def __init__(self, args: LoopArgs) -> None:
        import ray.train
        import ray.train.torch
        import torch

        from aiaas import causal_lm, registry

        self.config, self.steps = args.config, args.steps
        config = self.config
        self.plan = finetune_plan.parallel_plan(config)
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        torch.set_num_threads(config.scaling.threads())
        torch.manual_seed(config.seed)
        self.device = ray.train.torch.get_device()
        base_dir = causal_lm.local_directory(registry.Version.from_pin(args.base))
        self.base = f"{args.base['model']}:{args.base['version']}"
        resumed: finetune_weights.TrainerState | None = None
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            model = finetune_weights.build(config, base_dir)
        else:
            with checkpoint.as_directory() as directory:
                model, resumed = finetune_weights.restore(config, base_dir, Path(directory))
            if self.rank == 0:
                progress.emit({"resumed_from_step": resumed.step})
        self.trainable = finetune_weights.trainable_names(model)
        self.raw = model
        self.model = ray.train.torch.prepare_model(
            model, **finetune_plan.prepare_kwargs(self.plan, model)
        )
        self.optimizer = finetune_weights.optimizer(config, self.model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            functools.partial(
                finetune_plan.lr_factor,
                total_steps=self.steps.total_steps,
                schedule=config.schedule,
            ),
        )
        self.step, self.base_eval_loss, self.lr = 0, float("nan"), 0.0
        if resumed is not None:
            finetune_weights.load_optimizer(
                self.model, self.optimizer, resumed.optimizer, self.plan
            )
            self.scheduler.load_state_dict(resumed.scheduler)
            self.step, self.base_eval_loss = resumed.step, resumed.base_eval_loss
        self.train_shard = ray.train.get_dataset_shard("train")
        self.val_shard = ray.train.get_dataset_shard("validation")
        self.gauges = _Gauges(config) if self.rank == 0 else None
        self.resumed = resumed is not None

    def evaluate(self) -> float:
        """The validation loss of the model as it is now, over every worker's shard."""
        stream = self.val_shard.iter_batches(
            batch_size=self.config.batch_size, batch_format="numpy"
        )
        batches = (finetune_data.TokenBatch.from_numpy(batch) for batch in stream)
        return evaluate(self.model, batches, self.plan, self.world)

    def run(self) -> None:
        """Measure the base model, then train to the plan's last step."""
        import ray.train

        config, steps = self.config, self.steps
        if not self.resumed:
            # The untrained model is the base model (LoRA's B matrices start at 0): its loss is
            # what the gate compares the fine-tuned one with.
            self.base_eval_loss = self.evaluate()
            figures = {"step": 0, "epoch": 0, "eval_loss": self.base_eval_loss}
            figures["base_eval_loss"] = self.base_eval_loss
            if self.rank == 0:
                progress.emit(figures)
            ray.train.report(figures)
        if self.rank == 0 and self.step < steps.total_steps:
            progress.phase("first_step")
        window = _Window()
        while self.step < steps.total_steps:
            epoch = steps.epoch_of(self.step)
            batches = _micro_batches(self.train_shard, config, epoch, steps, self.device)
            # A resumed run re-draws the epoch it stopped in and skips the micro-batches done.
            for _ in range(
                (self.step % steps.steps_per_epoch) * config.gradient_accumulation_steps
            ):
                next(batches)
            while self.step < steps.total_steps:
                group = [next(batches) for _ in range(config.gradient_accumulation_steps)]
                done = optimizer_step(
                    self.model,
                    self.optimizer,
                    group,
                    world=self.world,
                    plan=self.plan,
                    max_grad_norm=config.optimizer.max_grad_norm,
                )
                window.add(done)
                self.lr = float(self.scheduler.get_last_lr()[0])  # what this step used
                self.scheduler.step()
                self.step += 1
                if steps.evaluates(self.step) or steps.checkpoints(self.step):
                    self.report(window.figures(self.world, self.device), epoch)
                    window = _Window()
                if self.step % steps.steps_per_epoch == 0:
                    break
            for _ in batches:  # the rest of the epoch's stream, so the next one starts cleanly
                pass

    def report(self, figures: dict[str, Any], epoch: int) -> None:
        """Report the step's figures to Ray Train, evaluated and with a checkpoint where the
        plan says. Every rank gathers the weights (a collective under FSDP); rank 0 writes."""
        import ray.train

        step = self.step
        figures.update(step=step, epoch=epoch, lr=self.lr)
        figures["base_eval_loss"] = self.base_eval_loss
        if self.steps.evaluates(step):
            figures["eval_loss"] = self.evaluate()
        figures["peak_rss_mb"] = progress.peak_rss_mb()
        if self.rank == 0:
            progress.emit(figures)
        saving = time.perf_counter()
        if not self.steps.checkpoints(step):
            ray.train.report(figures)
        else:
            weights = finetune_weights.gather(self.model, self.optimizer, self.plan, self.trainable)
            if self.rank != 0:
                ray.train.report(figures)
            else:
                state = finetune_weights.TrainerState(
                    step=step,
                    epoch=epoch,
                    base_eval_loss=self.base_eval_loss,
                    optimizer=weights.optimizer,
                    scheduler=self.scheduler.state_dict(),
                )
                directory = Path(tempfile.mkdtemp(prefix="aiaas-finetune-ckpt-"))
                finetune_weights.save(
                    self.raw, self.config, weights.model, state, figures, directory, self.base
                )
                # Uploaded in the background: the next steps run while it is persisted.
                ray.train.report(
                    figures,
                    checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                    checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                    delete_local_checkpoint_after_upload=True,
                )
        if self.gauges is not None:
            self.gauges.record(figures, time.perf_counter() - saving)


def _micro_batches(
    shard: Any,
    config: FinetuneConfig,
    epoch: int,
    steps: finetune_plan.StepPlan,
    device: Any,
) -> Iterator[finetune_data.TokenBatch]:
    """Exactly the plan's micro-batches of one epoch from this worker's shard, on ``device``,
    then the rest of the stream (which the caller drains)."""
    from aiaas import errors

    stream = shard.iter_batches(
        batch_size=config.batch_size,
        batch_format="numpy",
        drop_last=True,
        local_shuffle_buffer_size=config.batch_size * 16,
        local_shuffle_seed=config.seed + epoch,
    )
    taken = 0
    for batch in stream:
        if taken < steps.micro_batches_per_epoch:
            taken += 1
            yield finetune_data.TokenBatch.from_numpy(batch).to(device)
    if taken < steps.micro_batches_per_epoch:
        raise errors.JobError(
            f"epoch {epoch + 1}: this worker's share of the train split gave {taken} "
            f"micro-batches, the plan needs {steps.micro_batches_per_epoch}",
            "The train split changed since the run started: start a run under a new name.",
        )


class _Window:
    """The steps since the last report: loss and throughput figures."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.loss_sum = 0.0
        self.target_tokens = 0
        self.tokens = 0
        self.sequences = 0

    def add(self, step: StepFigures) -> None:
        self.loss_sum += step.loss_sum
        self.target_tokens += step.target_tokens
        self.tokens += step.tokens
        self.sequences += step.sequences

    def figures(self, world: int, device: Any) -> dict[str, Any]:
        """Train loss per target token and throughput, over every worker."""
        import torch

        seconds = max(time.perf_counter() - self.started, 1e-9)
        totals = torch.tensor(
            [self.loss_sum, self.target_tokens, self.tokens, self.sequences],
            dtype=torch.float64,
            device=device,
        )
        if world > 1:
            torch.distributed.all_reduce(totals)
        return {
            "train_loss": float(totals[0] / totals[1].clamp(min=1)),
            "tokens_per_s": float(totals[2]) / seconds,
            "samples_per_s": float(totals[3]) / seconds,
        }


class _Gauges:
    """The run's figures as Prometheus metrics (rank 0 only: the figures are global)."""

    def __init__(self, config: FinetuneConfig) -> None:
        from aiaas import metrics

        registered = config.registration.model if config.registration else config.base.name
        self.tags = {"run": config.name, "model": registered}
        self.tokens = metrics.TRAIN_TOKENS_PER_S.create()
        self.samples = metrics.TRAIN_SAMPLES_PER_S.create()
        self.epoch = metrics.TRAIN_EPOCH.create()
        self.loss = metrics.TRAIN_LOSS.create()
        self.checkpoint = metrics.TRAIN_CHECKPOINT_SECONDS.create()

    def record(self, figures: dict[str, Any], seconds: float) -> None:
        self.tokens.set(figures["tokens_per_s"], tags=self.tags)
        self.samples.set(figures["samples_per_s"], tags=self.tags)
        self.epoch.set(figures["epoch"], tags=self.tags)
        self.loss.set(figures["train_loss"], tags={**self.tags, "split": "train"})
        self.loss.set(figures["base_eval_loss"], tags={**self.tags, "split": "validation_base"})
        if "eval_loss" in figures:
            self.loss.set(figures["eval_loss"], tags={**self.tags, "split": "validation"})
        self.checkpoint.observe(seconds, tags=self.tags)


def _device_of(model: Any) -> Any:
    return next(model.parameters()).device
