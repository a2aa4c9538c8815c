"""Submitting a job and, with ``--follow``, waiting for it: the block ``train``, ``finetune``,
``tune`` and ``models optimize`` share, and how job records and outcomes print."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from aiaas_cli import console

if TYPE_CHECKING:
    from aiaas.config.cluster import ClusterConfig
    from jobs.records import JobRecord


def submit_and_report(
    kind: str,
    config_path: Path,
    config: Any,
    cluster: ClusterConfig,
    *,
    extra_args: tuple[str, ...] = (),
    follow: bool,
    next_steps: Sequence[str],
    report: Callable[[JobRecord], None],
    stream: bool = True,
) -> None:
    """Submit ``python -m jobs.<kind> CONFIG``, print where; without ``follow`` print the next
    commands, with it wait for the end, ``report`` the outcome and exit 1 unless it succeeded.

    Args:
        next_steps: Commands to print when not following; ``{id}`` is the submission id.
        report: Prints the final record (result table, summary).
        stream: Show the job's progress lines while waiting; otherwise wait silently.
    """
    from jobs import submit

    record = submit.submit(kind, config_path, config, cluster, extra_args)
    click.echo(f"Submitted {record.submission_id} to {record.address}")
    if not follow:
        console.next_steps([line.format(id=record.submission_id) for line in next_steps])
        return
    if stream:
        final = submit.follow(cluster, record.submission_id, progress_printer())
    else:
        final = submit.wait(cluster, record.submission_id)
    report(final)
    if final.status != "SUCCEEDED":
        console.fail(f"job {final.submission_id} {final.status}: {reason(final)}")


def progress_printer() -> Callable[[str], None]:
    """A log-line callback that prints the job's progress events (epochs, resume, test) once
    each, and its ``Error:`` / registration lines."""
    from jobs import submit

    seen: set[str] = set()

    def on_line(line: str) -> None:
        for event in submit.progress([line]):
            # Ray Train forwards a worker's print both as log and as output: show it once.
            key = json.dumps(event, sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            if "step" in event:
                click.echo(step_line(event))
            elif "epoch" in event:
                click.echo(
                    f"  epoch {int(event['epoch']) + 1:>3}  train_loss {event['train_loss']:.4f}  "
                    f"val_loss {event['val_loss']:.4f}  val_accuracy {event['val_accuracy']:.4f}  "
                    f"{event['samples_per_s']:.0f} samples/s"
                )
            elif "resumed_from_epoch" in event:
                click.echo(
                    f"  resumed from the checkpoint of epoch {event['resumed_from_epoch'] + 1}"
                )
            elif "resumed_from_step" in event:
                click.echo(f"  resumed from the checkpoint of step {event['resumed_from_step']}")
            elif "test" in event:
                click.echo(f"  test: {json.dumps(event['test'])}")
            elif "gate" in event:
                click.echo(f"  gate: {gate_text(event['gate'])}")
            elif "plan" in event:
                plan = event["plan"]
                click.echo(
                    f"  plan: {plan['method']} of {plan['base']}, {plan['steps']} steps "
                    f"({plan['epochs']} epochs of {plan['train_rows']} train rows)"
                )
        if line.startswith(("Error:", "Registered ", "Already registered as ")):
            click.echo(f"  {line}")

    return on_line


def step_line(event: dict[str, Any]) -> str:
    """One report of a fine-tuning run: step, epoch, losses, throughput."""
    parts = [f"  step {int(event['step']):>5}  epoch {int(event.get('epoch', 0)) + 1:>3}"]
    if "train_loss" in event:
        parts.append(f"train_loss {event['train_loss']:.4f}")
    if "eval_loss" in event:
        parts.append(f"eval_loss {event['eval_loss']:.4f} (base {event['base_eval_loss']:.4f})")
    if "tokens_per_s" in event:
        parts.append(f"{event['tokens_per_s']:.0f} tokens/s")
    return "  ".join(parts)


def gate_text(figures: dict[str, Any]) -> str:
    """A fine-tuning gate's figures in one phrase."""
    text = (
        f"eval loss {figures['eval_loss']:.4f} (base {figures['base_eval_loss']:.4f}), "
        f"exact match {figures['exact_match']:.4f} ({figures['matched']}/{figures['test_rows']})"
    )
    if figures.get("base_exact_match") is not None:
        text += (
            f" (base {figures['base_exact_match']:.4f}, "
            f"{figures['base_matched']}/{figures['test_rows']})"
        )
    return text


def print_outcome(record: JobRecord) -> None:
    """The job's final status and its one-line result."""
    click.echo(f"{record.submission_id}: {record.status}")
    if record.result:
        click.echo(f"  {summary(record.result)}")


def summary(result: dict[str, Any] | None) -> str:
    """A job result in one line: test accuracy, registered version or gate, first error line."""
    if not result:
        return ""
    parts = []
    if "test" in result:
        parts.append(f"test accuracy {result['test']['accuracy']:.4f}")
    if "figures" in result:
        parts.append(gate_text(result["figures"]))
    if "registered" in result:
        parts.append(
            f"registered {result['registered']['model']} v{result['registered']['version']}"
        )
    elif "gate" in result:
        parts.append(f"gate {result['gate']}")
    if "error" in result and "gate" not in result:
        parts.append(result["error"].splitlines()[0][:120])
    return "; ".join(parts)


def reason(record: JobRecord) -> str:
    """Why a job did not succeed: its recorded error, else Ray's message, else where to look."""
    return str((record.result or {}).get("error") or record.message or "see aiaas jobs logs")
