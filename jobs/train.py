"""The training job: ``python -m jobs.train CONFIG`` on the cluster (submitted through Ray Jobs).

Ray Data streams the prepared Parquet splits to the workers of a ``TorchTrainer`` (DDP over gloo
on CPU, NCCL with ``use_gpu``); each epoch reports train/validation metrics with a checkpoint;
a failed worker group restarts from the latest checkpoint (``max_failures``), and so does a run
restarted under the same name. The driver then evaluates the best checkpoint on the test split
and registers it in MLflow when the gate passes.

Where each part runs: the workers' loop in :mod:`jobs.train_loop`, the driver's trainer in
:mod:`jobs.trainer`, the gate and registration in :mod:`jobs.gate`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from aiaas import progress
from aiaas.config import loader
from aiaas.config.train import TrainConfig
from jobs import entrypoint, gate, outcomes, trainer


def run(config: TrainConfig, config_path: Path) -> outcomes.TrainingOutcome:
    """Train, evaluate on the test split and register; returns the outcome for the job record.

    Raises:
        AiaasError: A bad input (missing data set, model that does not fit, unplaceable workers)
            or a failed registration gate.
    """
    storage, schema = trainer.prepare(config, config_path)
    direct = trainer.direct_splits(config, storage, schema)
    splits = trainer.read_splits(config, storage, skip=direct)
    torch_trainer = trainer.build_trainer(
        config, schema, splits, storage, run_name=config.name, direct=direct
    )
    result, train_seconds = trainer.fit(config, torch_trainer)
    outcome = gate.evaluate_and_register(
        config,
        config_path,
        schema,
        storage,
        trainer.best_checkpoint(config, result),
        trainer.history(result),
        outcomes.RunSummary(run=config.name, train_seconds=round(train_seconds, 2)),
    )
    progress.phase("registered")
    return outcome


def main(argv: list[str]) -> int:
    """Entry point of ``python -m jobs.train CONFIG``."""
    if len(argv) != 1:
        print("usage: python -m jobs.train CONFIG", file=sys.stderr)
        return 2
    config_path = Path(argv[0])
    progress.phase("driver_started")
    code, outcome = entrypoint.run_job(
        "train", config_path, lambda: run(loader.load(config_path, TrainConfig), config_path)
    )
    registered = outcome.registered if outcome else None
    if outcome and registered:
        verb = "Already registered as" if registered.already else "Registered"
        print(
            f"{verb} {registered.model} version {registered.version} "
            f"(test accuracy {outcome.test.accuracy:.4f})"
        )
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
