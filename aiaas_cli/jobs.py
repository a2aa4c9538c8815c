"""``aiaas train CONFIG``, ``aiaas tune CONFIG`` and ``aiaas jobs list | status | logs | stop``."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import click

from aiaas.config import loader
from aiaas.config.train import TrainConfig
from aiaas_cli import console, target


@click.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(path_type=Path))
@target.cluster_option
@click.option(
    "--follow", is_flag=True, help="Show live progress (epoch, loss, accuracy) until it ends."
)
@click.option("--dry-run", is_flag=True, help="Run every check; submit nothing.")
@console.user_errors
def train(config_path: Path, cluster_path: Path, follow: bool, dry_run: bool) -> None:
    """Submit a training job (python -m jobs.train CONFIG) through the Ray Jobs API."""
    from jobs import preflight, submit

    config = loader.load(config_path, TrainConfig)
    cluster = target.load_cluster(cluster_path)
    preflight.check_train(config, config_path, cluster)
    if dry_run:
        click.echo(f"{config_path}: checks passed; would submit python -m jobs.train {config_path}")
        return
    record = submit.submit("train", config_path, config, cluster)
    click.echo(f"Submitted {record.submission_id} to {record.address}")
    if not follow:
        console.next_steps(
            [
                f"aiaas jobs status {record.submission_id}",
                f"aiaas jobs logs {record.submission_id} --follow",
            ]
        )
        return
    final = submit.follow(cluster, record.submission_id, _progress_printer())
    _print_outcome(final)
    if final.status != "SUCCEEDED":
        console.fail(f"job {final.submission_id} {final.status}: {_reason(final)}")


@click.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(path_type=Path))
@target.cluster_option
@click.option("--follow", is_flag=True, help="Show trials' progress and the results table.")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the tune run of this name; finished trials are not run again.",
)
@click.option("--dry-run", is_flag=True, help="Run every check; submit nothing.")
@console.user_errors
def tune(config_path: Path, cluster_path: Path, follow: bool, resume: bool, dry_run: bool) -> None:
    """Submit a hyperparameter search (python -m jobs.tune CONFIG) through the Ray Jobs API."""
    from aiaas.config.tune import TuneConfig
    from jobs import preflight, submit

    config = loader.load(config_path, TuneConfig)
    cluster = target.load_cluster(cluster_path)
    preflight.check_tune(config, config_path, cluster)
    extra = ("--resume",) if resume else ()
    if dry_run:
        click.echo(
            f"{config_path}: checks passed; would submit python -m jobs.tune {config_path} "
            f"{' '.join(extra)}({config.trial_count()} trials, {config.max_concurrent_trials} "
            "at a time)"
        )
        return
    record = submit.submit("tune", config_path, config, cluster, extra)
    click.echo(f"Submitted {record.submission_id} to {record.address}")
    if not follow:
        console.next_steps(
            [
                f"aiaas jobs status {record.submission_id}",
                f"aiaas jobs logs {record.submission_id} --follow",
            ]
        )
        return
    final = submit.follow(cluster, record.submission_id, _progress_printer())
    _print_trials((final.result or {}).get("trials") or [])
    _print_outcome(final)
    if final.status != "SUCCEEDED":
        console.fail(f"job {final.submission_id} {final.status}: {_reason(final)}")


def _print_trials(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in columns}
    click.echo("  " + "  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        click.echo("  " + "  ".join(_cell(row.get(c)).ljust(widths[c]) for c in columns))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


@click.group("jobs")
def jobs_group() -> None:
    """List, inspect, follow and stop aiaas jobs (records survive cluster restarts)."""


@jobs_group.command("list")
@target.cluster_option
@console.user_errors
def list_jobs(cluster_path: Path) -> None:
    """Every recorded job, newest first."""
    from aiaas.storage import Storage
    from jobs import records, submit

    cluster = target.load_cluster(cluster_path)
    found = records.all_records(Storage(cluster.storage_root))
    if not found:
        click.echo("No jobs recorded yet.")
        console.next_steps(["aiaas train configs/train/digits_mlp.yaml --follow"])
        return
    click.echo(f"{'JOB':<52} {'KIND':<6} {'STATUS':<10} {'SUBMITTED':<19} RESULT")
    for record in found:
        fresh = submit.refresh(cluster, record)
        when = datetime.datetime.fromtimestamp(record.submitted_at).strftime("%Y-%m-%d %H:%M:%S")
        click.echo(
            f"{record.submission_id:<52} {record.kind:<6} {fresh.status:<10} {when:<19} "
            f"{_summary(record.result)}"
        )


@jobs_group.command()
@click.argument("submission_id", metavar="ID")
@target.cluster_option
@click.option("--json", "as_json", is_flag=True, help="Print the whole record as JSON.")
@console.user_errors
def status(submission_id: str, cluster_path: Path, as_json: bool) -> None:
    """Status, metrics and registered version of one job."""
    from jobs import submit

    record = submit.find(target.load_cluster(cluster_path), submission_id)
    if as_json:
        click.echo(record.model_dump_json(indent=2))
        return
    click.echo(f"{record.submission_id}: {record.status}")
    click.echo(f"  entrypoint: {record.entrypoint}")
    click.echo(f"  config:     {record.config_path} (hash {record.config_hash})")
    if record.result:
        click.echo(f"  result:     {_summary(record.result)}")
    if record.status == "FAILED":
        click.echo(f"  reason:     {_reason(record)}")


@jobs_group.command()
@click.argument("submission_id", metavar="ID")
@target.cluster_option
@click.option("--follow", is_flag=True, help="Stream new lines until the job ends.")
@console.user_errors
def logs(submission_id: str, cluster_path: Path, follow: bool) -> None:
    """The job's log (from Ray while the cluster runs, else the stored tail)."""
    from jobs import submit

    cluster = target.load_cluster(cluster_path)
    record = submit.find(cluster, submission_id)
    if follow:
        submit.follow(cluster, submission_id, click.echo)
        return
    try:
        click.echo(submit.client(cluster).get_job_logs(submission_id), nl=False)
    except Exception:  # cluster down: the stored tail is what is left
        click.echo(record.log_tail or "(no log stored)")


@jobs_group.command()
@click.argument("submission_id", metavar="ID")
@target.cluster_option
@console.user_errors
def stop(submission_id: str, cluster_path: Path) -> None:
    """Stop a running job; its checkpoints are kept and nothing is registered."""
    from jobs import submit

    record = submit.stop(target.load_cluster(cluster_path), submission_id)
    click.echo(f"{record.submission_id}: {record.status}")


def _progress_printer() -> Any:
    from jobs import submit

    seen: set[str] = set()

    def on_line(line: str) -> None:
        for event in submit.progress([line]):
            # Ray Train forwards a worker's print both as log and as output: show it once.
            key = json.dumps(event, sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            if "epoch" in event:
                click.echo(
                    f"  epoch {int(event['epoch']) + 1:>3}  train_loss {event['train_loss']:.4f}  "
                    f"val_loss {event['val_loss']:.4f}  val_accuracy {event['val_accuracy']:.4f}  "
                    f"{event['samples_per_s']:.0f} samples/s"
                )
            elif "resumed_from_epoch" in event:
                click.echo(
                    f"  resumed from the checkpoint of epoch {event['resumed_from_epoch'] + 1}"
                )
            elif "test" in event:
                click.echo(f"  test: {json.dumps(event['test'])}")
        if line.startswith(("Error:", "Registered ", "Already registered as ")):
            click.echo(f"  {line}")

    return on_line


def _print_outcome(record: Any) -> None:
    click.echo(f"{record.submission_id}: {record.status}")
    if record.result:
        click.echo(f"  {_summary(record.result)}")


def _summary(result: dict[str, Any] | None) -> str:
    if not result:
        return ""
    parts = []
    if "test" in result:
        parts.append(f"test accuracy {result['test']['accuracy']:.4f}")
    if "registered" in result:
        parts.append(
            f"registered {result['registered']['model']} v{result['registered']['version']}"
        )
    elif "gate" in result:
        parts.append(f"gate {result['gate']}")
    if "error" in result and "gate" not in result:
        parts.append(result["error"].splitlines()[0][:120])
    return "; ".join(parts)


def _reason(record: Any) -> str:
    if record.result and "error" in record.result:
        return str(record.result["error"])
    return str(record.message or "see aiaas jobs logs")
