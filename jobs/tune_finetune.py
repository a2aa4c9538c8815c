"""A hyperparameter search over a finetune config (``kind: tune`` with ``finetune:``), run by
``python -m jobs.tune``.

Every trial is the finetune config with the trial's values (``optimizer.lr``, ``lora.rank``,
``batch_size``, ...), fine-tuned by the fine-tuning job's own TorchTrainer and workers' loop
(:mod:`jobs.finetune_trainer`, :mod:`jobs.finetune_loop`); each eval step reaches Tune
(``TuneReportCallback``), so ASHA or median stopping ends weak trials between eval steps. A
trial checkpoints at each of its eval steps, so the latest checkpoint of the winning trial is the
one its last figures describe: that checkpoint goes through the fine-tuning gate (validation
loss below the base's, the skill's exact match) and is registered as the finetune config says,
with the tune run, the trial and the winning values in its lineage.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiaas import errors, progress
from aiaas.config import loader
from aiaas.config.finetune import FinetuneConfig
from aiaas.config.tune import TuneConfig, apply
from aiaas.storage import Storage
from jobs import finetune_gate, finetune_plan, finetune_trainer, outcomes, tune


def trial_config(
    config: TuneConfig, base: FinetuneConfig, params: dict[str, Any]
) -> FinetuneConfig:
    """The finetune config one trial runs: the base with the trial's values, checkpointing at
    each eval step (what the search compares is then what a checkpoint holds)."""
    data = apply(base.model_dump(mode="json"), params)
    if data.get("eval_every_steps"):
        data["checkpoint"] = {**data["checkpoint"], "every_steps": data["eval_every_steps"]}
    else:
        data["eval_every_steps"] = data["checkpoint"]["every_steps"]
    return FinetuneConfig.model_validate(data)


def _reports(config: FinetuneConfig, train_rows: int) -> int:
    """How many times a trial of ``config`` reports: the base's loss, then each eval step."""
    plan = finetune_plan.step_plan(config, train_rows)
    return 1 + sum(plan.evaluates(step) for step in range(1, plan.total_steps + 1))


def _trial(
    params: dict[str, Any],
    tune_config: dict[str, Any],
    base: dict[str, Any],
    prepared: finetune_trainer.Prepared,
) -> None:
    """One Tune trial: a Ray Train fine-tune of the trial's config, reporting each eval step."""
    from ray import tune as ray_tune
    from ray.tune.integration.ray_train import TuneReportCallback

    config = TuneConfig.model_validate(tune_config)
    trial = trial_config(config, FinetuneConfig.model_validate(base), params)
    steps = finetune_plan.step_plan(trial, prepared.data.rows["train"])
    trial_trainer = finetune_trainer.build_trainer(
        trial,
        dataclasses.replace(prepared, steps=steps),
        run_name=f"{config.name}-{ray_tune.get_context().get_trial_id()}",
        callbacks=[TuneReportCallback()],
    )
    trial_trainer.fit()


def run(config: TuneConfig, config_path: Path, resume: bool) -> outcomes.FinetuneOutcome:
    """Search, write the results table, judge and register the best trial's adapter."""
    from ray import tune as ray_tune

    assert config.finetune is not None
    base = loader.load(config.finetune, FinetuneConfig)
    prepared = finetune_trainer.prepare(base, config_path)
    storage: Storage = prepared.storage
    rows = prepared.data.rows["train"]
    # The longest trial any value of the space makes: ASHA must not cut a trial short of it.
    ends = [
        trial_config(config, base, {path: value})
        for path, domain in config.search_space.items()
        for value in domain.values()
    ]
    longest = max(_reports(c, rows) for c in [trial_config(config, base, {}), *ends])
    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(
            _trial,
            tune_config=config.model_dump(mode="json"),
            base=base.model_dump(mode="json"),
            prepared=prepared,
        ),
        {"CPU": 0.01},  # the trial only drives its Train run, whose workers hold the CPUs
    )
    tuner, resumed = tune.search(config, storage, trainable, longest, resume)
    grid = tuner.fit()
    table = _table(config, grid, base, rows)
    storage.write_bytes(f"tune/{config.name}/results.parquet", tune.parquet(table))
    progress.emit({"trials": table})
    result, trial_id, params = _best(config, grid)
    winner = trial_config(config, base, params)
    steps = finetune_plan.step_plan(winner, rows)
    return finetune_gate.evaluate_and_register(
        winner,
        config_path,
        dataclasses.replace(prepared, steps=steps),
        result,
        outcomes.RunSummary(
            run=config.name,
            resumed=bool(resumed),
            trials=table,
            best_trial=trial_id,
            best_params=params,
            results=storage.path("tune", config.name, "results.parquet"),
        ),
        lineage_extra={
            "tune_run": config.name,
            "tune_trial": trial_id,
            "tune_params": json.dumps(params, sort_keys=True)[:5000],
        },
    )


def _metric_values(config: TuneConfig, result: Any) -> list[float]:
    frame = result.metrics_dataframe
    if frame is None or config.metric not in frame:
        return []
    return [float(v) for v in frame[config.metric] if v == v]  # NaN: a report without it


def _table(config: TuneConfig, grid: Any, base: FinetuneConfig, rows: int) -> list[dict[str, Any]]:
    found = []
    for result in grid:
        values = _metric_values(config, result)
        best = (max(values) if config.mode == "max" else min(values)) if values else None
        frame = result.metrics_dataframe
        reports = len(frame) if frame is not None else 0
        planned = _reports(trial_config(config, base, result.config or {}), rows)
        status = (
            "ERROR" if result.error else ("STOPPED EARLY" if reports < planned else "COMPLETED")
        )
        found.append(
            {
                "trial_id": tune.trial_id(result),
                **{f"param.{k}": tune.plain(v) for k, v in sorted((result.config or {}).items())},
                config.metric: best,
                "reports": reports,
                "status": status,
            }
        )
    return sorted(found, key=lambda r: (r[config.metric] is None, tune.order(config, r)))


@dataclass(frozen=True)
class TrialRun:
    """What the fine-tuning gate reads of a run (as of a Ray Train result): a trial's latest
    checkpoint (Tune hands the path over as a metric; the checkpoint is the Train run's) and
    its reports."""

    checkpoint: Any
    metrics_dataframe: Any


def _best(config: TuneConfig, grid: Any) -> tuple[TrialRun, str, dict[str, Any]]:
    """The trial whose latest checkpoint measured best (the metric of that report)."""
    from ray.train import Checkpoint

    candidates = []
    for result in grid:
        frame = result.metrics_dataframe
        if frame is None or config.metric not in frame or "checkpoint_path" not in frame:
            continue
        saved = [
            (float(row[config.metric]), row["checkpoint_path"])
            for _, row in frame.iterrows()
            if isinstance(row["checkpoint_path"], str)
            and os.path.exists(row["checkpoint_path"])
            and row[config.metric] == row[config.metric]  # NaN: a report without the metric
        ]
        if saved:
            value, path = saved[-1]
            candidates.append((value, path, result))
    if not candidates:
        raise errors.JobError(f"tune run '{config.name}' has no trial with a checkpoint")
    pick = max if config.mode == "max" else min
    _, path, result = pick(candidates, key=lambda c: c[0])
    params = {k: tune.plain(v) for k, v in (result.config or {}).items()}
    run = TrialRun(Checkpoint(path), result.metrics_dataframe)
    return run, tune.trial_id(result), params


def registered_line(outcome: outcomes.FinetuneOutcome) -> str | None:
    """What ``python -m jobs.tune`` prints for a registered adapter."""
    registered = outcome.registered
    if registered is None:
        return None
    figures = outcome.figures
    verb = "Already registered as" if registered.already else "Registered"
    return (
        f"{verb} {registered.model} version {registered.version} from trial "
        f"{outcome.best_trial} (validation loss {figures.eval_loss:.4f}, exact match "
        f"{figures.exact_match:.4f})"
    )
