"""The fine-tuning job: ``python -m jobs.finetune CONFIG`` on the cluster (through Ray Jobs).

A registered causal LM (``base_model: smollm2@production``) is fine-tuned on a prepared chat
data set by the workers of a ``TorchTrainer``: a peft LoRA adapter (or every weight), DDP on
CPUs, FSDP and bf16 on GPUs. Ray Data streams the train and validation splits; every eval step
reports the train and validation loss, the base model's validation loss and tokens/s; every
checkpoint step saves the trainable weights with the optimizer state, and a failed worker group
restarts from the latest checkpoint (``max_failures``), as does a run restarted under the same
name. The driver then judges the latest checkpoint (validation loss below the base's, exact
match on test prompts) and registers the adapter when the gate passes.

Where each part runs: the workers' loop in :mod:`jobs.finetune_loop` (weights and checkpoints
in :mod:`jobs.finetune_weights`), the driver in :mod:`jobs.finetune_trainer`, the gate and
registration in :mod:`jobs.finetune_gate`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from aiaas import progress
from aiaas.config import loader
from aiaas.config.finetune import FinetuneConfig
from jobs import entrypoint, finetune_gate, finetune_trainer, outcomes, trainer


def run(config: FinetuneConfig, config_path: Path) -> outcomes.FinetuneOutcome:
    """Fine-tune, judge the result and register it; returns the outcome for the job record.

    Raises:
        AiaasError: A bad input (unknown base model, a data set that does not fit it,
            unplaceable workers) or a failed registration gate.
    """
    prepared = finetune_trainer.prepare(config, config_path)
    progress.emit(
        {
            "plan": {
                "base": f"{prepared.base.name}:{prepared.base.version}",
                "method": config.method,
                "steps": prepared.steps.total_steps,
                "epochs": prepared.steps.epochs,
                "train_rows": prepared.data.rows["train"],
            }
        }
    )
    torch_trainer = finetune_trainer.build_trainer(config, prepared)
    result, train_seconds = trainer.fit(config, torch_trainer)
    outcome = finetune_gate.evaluate_and_register(
        config,
        config_path,
        prepared,
        result,
        outcomes.RunSummary(run=config.name, train_seconds=round(train_seconds, 2)),
    )
    progress.phase("registered")
    return outcome


def main(argv: list[str]) -> int:
    """Entry point of ``python -m jobs.finetune CONFIG``."""
    if len(argv) != 1:
        print("usage: python -m jobs.finetune CONFIG", file=sys.stderr)
        return 2
    config_path = Path(argv[0])
    progress.phase("driver_started")
    code, outcome = entrypoint.run_job(
        "finetune",
        config_path,
        lambda: run(loader.load(config_path, FinetuneConfig), config_path),
    )
    registered = outcome.registered if outcome else None
    if outcome and registered:
        verb = "Already registered as" if registered.already else "Registered"
        figures = outcome.figures
        print(
            f"{verb} {registered.model} version {registered.version} (validation loss "
            f"{figures.eval_loss:.4f}, base {figures.base_eval_loss:.4f}; exact match "
            f"{figures.exact_match:.4f}, base {figures.base_exact_match or 0.0:.4f})"
        )
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
