"""The tune job: ``python -m jobs.tune CONFIG [--resume]`` (submitted by ``aiaas tune``).

Every trial is the train config with the trial's values, trained by the training job's own
TorchTrainer and loop (:mod:`jobs.trainer`, :mod:`jobs.train_loop`); Ray Train's reports reach
Tune (``TuneReportCallback``), so ASHA or median stopping ends weak trials between epochs. The
results table goes to Parquet under the storage root; the best trial's best checkpoint is
evaluated on the test split and registered through the same gate as a training job
(:mod:`jobs.gate`), with the tune run and the winning values in its lineage.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from aiaas import datasets, errors, progress
from aiaas.config import loader
from aiaas.config.train import TrainConfig
from aiaas.config.tune import TuneConfig, apply
from aiaas.storage import Storage
from jobs import entrypoint, gate, outcomes, trainer


def trial_config(config: TuneConfig, base: TrainConfig, params: dict[str, Any]) -> TrainConfig:
    """The train config one trial runs: the base with the trial's values and the tune scaling."""
    data = apply(base.model_dump(mode="json"), params)
    if config.scaling is not None:
        data["scaling"] = config.scaling.model_dump(mode="json")
    # Checkpoints are ranked by the searched metric, so the one kept is the one that wins.
    data["checkpoint"] = {
        **data["checkpoint"],
        "score_metric": config.metric,
        "score_order": config.mode,
    }
    return TrainConfig.model_validate(data)


def _trial(
    params: dict[str, Any],
    tune_config: dict[str, Any],
    base: dict[str, Any],
    schema: dict[str, Any],
    splits: dict[str, Any],
    storage_root: str,
) -> None:
    """One Tune trial: a Ray Train run of the trial's config, reporting each epoch to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    config = TuneConfig.model_validate(tune_config)
    trial = trial_config(config, TrainConfig.model_validate(base), params)
    trial_id = tune.get_context().get_trial_id()
    trial_trainer = trainer.build_trainer(
        trial,
        datasets.DatasetSchema.model_validate(schema),
        splits,
        Storage(storage_root),
        run_name=f"{config.name}-{trial_id}",
        callbacks=[TuneReportCallback()],
    )
    trial_trainer.fit()


def run(
    config: TuneConfig, config_path: Path, resume: bool
) -> outcomes.TrainingOutcome | outcomes.FinetuneOutcome:
    """Search, write the results table, evaluate and register the best trial."""
    from ray import tune

    if config.finetune is not None:
        from jobs import tune_finetune

        return tune_finetune.run(config, config_path, resume)
    assert config.train is not None
    base = loader.load(config.train, TrainConfig)
    first = trial_config(config, base, {})
    storage, schema = trainer.prepare(first, config_path)
    splits = trainer.read_splits(first, storage)
    trainable = tune.with_resources(
        tune.with_parameters(
            _trial,
            tune_config=config.model_dump(mode="json"),
            base=base.model_dump(mode="json"),
            schema=schema.model_dump(mode="json"),
            splits=splits,
            storage_root=storage.root,
        ),
        # The trial only drives its Train run, whose workers hold the CPUs (Tune refuses 0).
        {"CPU": 0.01},
    )
    tuner, resumed = search(config, storage, trainable, _max_epochs(config, base), resume)
    grid = tuner.fit()
    table = _table(config, grid, base)
    storage.write_bytes(f"tune/{config.name}/results.parquet", parquet(table))
    progress.emit({"trials": table})
    best = _best(config, grid)
    winner = trial_config(config, base, best.params)
    if config.registration is not None:
        winner = winner.model_copy(update={"registration": config.registration})
    return gate.evaluate_and_register(
        winner,
        config_path,
        schema,
        storage,
        best.checkpoint,
        best.history,
        outcomes.RunSummary(
            run=config.name,
            resumed=bool(resumed),
            trials=table,
            best_trial=best.trial_id,
            best_params=best.params,
            results=storage.path("tune", config.name, "results.parquet"),
        ),
        lineage_extra={
            "tune_run": config.name,
            "tune_trial": best.trial_id,
            "tune_params": json.dumps(best.params, sort_keys=True)[:5000],
        },
    )


def search(
    config: TuneConfig, storage: Storage, trainable: Any, longest: int, resume: bool
) -> tuple[Any, bool]:
    """The run's Tuner over ``trainable`` (restored with ``resume`` when the run exists) and
    whether it was restored; ``longest`` is the most reports a trial makes (ASHA's ``max_t``)."""
    from ray import tune

    experiment = storage.path("tune", config.name)
    if resume and tune.Tuner.can_restore(experiment):
        restored = tune.Tuner.restore(
            experiment, trainable, resume_unfinished=True, resume_errored=True
        )
        return restored, True
    tuner = tune.Tuner(
        trainable,
        param_space=config.param_space(),
        tune_config=tune.TuneConfig(
            metric=config.metric,
            mode=config.mode,
            num_samples=config.num_samples,
            max_concurrent_trials=config.max_concurrent_trials,
            search_alg=search_algorithm(config),
            scheduler=scheduler(config, longest),
        ),
        run_config=tune.RunConfig(name=config.name, storage_path=storage.path("tune"), verbose=0),
    )
    return tuner, False


def search_algorithm(config: TuneConfig) -> Any:
    """Random and grid sampling, seeded by the config so a search can be drawn again."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(
        max_concurrent=config.max_concurrent_trials, random_state=config.seed
    )


def _max_epochs(config: TuneConfig, base: TrainConfig) -> int:
    searched = config.search_space.get("epochs")
    return int(max(searched.values())) if searched is not None else base.epochs


def scheduler(config: TuneConfig, epochs: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    spec = config.scheduler
    if spec.name == "asha":
        return ASHAScheduler(
            time_attr="training_iteration",
            max_t=epochs,
            grace_period=spec.grace_period,
            reduction_factor=spec.reduction_factor,
        )
    if spec.name == "median":
        return MedianStoppingRule(
            time_attr="training_iteration", grace_period=spec.grace_period, min_samples_required=2
        )
    return FIFOScheduler()


def _table(config: TuneConfig, grid: Any, base: TrainConfig) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        epochs = trial_config(config, base, result.config or {}).epochs
        history = result.metrics_dataframe
        metric = history[config.metric] if history is not None and config.metric in history else []
        best = (max(metric) if config.mode == "max" else min(metric)) if len(metric) else None
        run = len(history) if history is not None else 0
        status = "ERROR" if result.error else ("STOPPED EARLY" if run < epochs else "COMPLETED")
        rows.append(
            {
                "trial_id": trial_id(result),
                **{f"param.{k}": plain(v) for k, v in sorted((result.config or {}).items())},
                config.metric: None if best is None else float(best),
                "epochs_run": run,
                "status": status,
            }
        )
    return sorted(rows, key=lambda r: (r[config.metric] is None, order(config, r)))


def order(config: TuneConfig, row: dict[str, Any]) -> float:
    value = row[config.metric] or 0.0
    return -value if config.mode == "max" else value


class _BestTrial(BaseModel):
    """The winning trial's best epoch: what is evaluated and registered."""

    # A Ray Train checkpoint is no pydantic type.
    model_config = ConfigDict(arbitrary_types_allowed=True)

    trial_id: str
    params: dict[str, Any]
    checkpoint: Any
    history: list[outcomes.EpochMetrics]


def _best(config: TuneConfig, grid: Any) -> _BestTrial:
    """The best epoch of the best trial, with a checkpoint that still exists."""
    from ray.train import Checkpoint

    candidates = []
    for result in grid:
        frame = result.metrics_dataframe
        if frame is None or config.metric not in frame or "checkpoint_path" not in frame:
            continue
        for _, row in frame.iterrows():
            path = row.get("checkpoint_path")
            if isinstance(path, str) and os.path.exists(path):
                candidates.append((float(row[config.metric]), result, path))
    if not candidates:
        raise errors.JobError(f"tune run '{config.name}' has no trial with a checkpoint")
    pick = max if config.mode == "max" else min
    _, result, path = pick(candidates, key=lambda c: c[0])
    return _BestTrial(
        trial_id=trial_id(result),
        params={k: plain(v) for k, v in (result.config or {}).items()},
        checkpoint=Checkpoint(path),
        history=[trainer.history_row(row) for row in result.metrics_dataframe.to_dict("records")],
    )


def trial_id(result: Any) -> str:
    return str((result.metrics or {}).get("trial_id") or Path(result.path or "?").name)


def plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def parquet(rows: list[dict[str, Any]]) -> bytes:
    import io

    import pandas as pd

    frame = pd.DataFrame(rows)
    for column in frame.columns:
        if frame[column].map(lambda v: isinstance(v, list | dict)).any():
            frame[column] = frame[column].map(json.dumps)
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def main(argv: list[str]) -> int:
    """Entry point of ``python -m jobs.tune CONFIG [--resume]``."""
    args = [a for a in argv if a != "--resume"]
    if len(args) != 1:
        print("usage: python -m jobs.tune CONFIG [--resume]", file=sys.stderr)
        return 2
    config_path = Path(args[0])
    code, outcome = entrypoint.run_job(
        "tune",
        config_path,
        lambda: run(loader.load(config_path, TuneConfig), config_path, "--resume" in argv),
    )
    registered = outcome.registered if outcome else None
    if isinstance(outcome, outcomes.FinetuneOutcome):
        from jobs import tune_finetune

        line = tune_finetune.registered_line(outcome)
        if line:
            print(line)
    elif outcome and registered:
        print(
            f"Registered {registered.model} version {registered.version} from trial "
            f"{outcome.best_trial} (test accuracy {outcome.test.accuracy:.4f})"
        )
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
