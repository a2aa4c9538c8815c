"""``aiaas train CONFIG``, ``aiaas finetune CONFIG``, ``aiaas tune CONFIG`` and
``aiaas jobs list | status | logs | stop``."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import click

from aiaas.config import loader
from aiaas.config.train import TrainConfig
from aiaas_cli import console, flags, submission, target

#: What to run next after a submission that is not followed.
_NEXT = ("aiaas jobs status {id}", "aiaas jobs logs {id} --follow")


@click.command()
@flags.config_argument
@flags.cluster_option
@flags.follow_option("Show live progress (epoch, loss, accuracy) until it ends.")
@flags.dry_run_option("Run every check; submit nothing.")
@console.user_errors
def train(config_path: Path, cluster_path: Path, follow: bool, dry_run: bool) -> None:
    """Submit a training job (python -m jobs.train CONFIG) through the Ray Jobs API."""
    from jobs import preflight

    config = loader.load(config_path, TrainConfig)
    cluster = target.load_cluster(cluster_path)
    preflight.check_train(config, config_path, cluster)
    if dry_run:
        click.echo(f"{config_path}: checks passed; would submit python -m jobs.train {config_path}")
        return
    submission.submit_and_report(
        "train",
        config_path,
        config,
        cluster,
        follow=follow,
        next_steps=_NEXT,
        report=submission.print_outcome,
    )


@click.command()
@flags.config_argument
@flags.cluster_option
@flags.follow_option("Show live progress (step, losses, tokens/s) and the gate until it ends.")
@flags.dry_run_option("Run every check; submit nothing.")
@console.user_errors
def finetune(config_path: Path, cluster_path: Path, follow: bool, dry_run: bool) -> None:
    """Submit a fine-tuning job (python -m jobs.finetune CONFIG) through the Ray Jobs API."""
    from aiaas.config.finetune import FinetuneConfig
    from jobs import preflight

    config = loader.load(config_path, FinetuneConfig)
    cluster = target.load_cluster(cluster_path)
    uri = target.use_registry(cluster)
    base, steps = preflight.check_finetune(config, config_path, cluster, uri)
    if dry_run:
        click.echo(
            f"{config_path}: checks passed; would submit python -m jobs.finetune {config_path} "
            f"({config.method} of {base.name}:{base.version}, {steps.total_steps} steps over "
            f"{steps.epochs} epoch{'s' if steps.epochs != 1 else ''})"
        )
        return
    submission.submit_and_report(
        "finetune",
        config_path,
        config,
        cluster,
        follow=follow,
        next_steps=_NEXT,
        report=submission.print_outcome,
    )


@click.command()
@flags.config_argument
@flags.cluster_option
@flags.follow_option("Show trials' progress and the results table.")
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the tune run of this name; finished trials are not run again.",
)
@flags.dry_run_option("Run every check; submit nothing.")
@console.user_errors
def tune(config_path: Path, cluster_path: Path, follow: bool, resume: bool, dry_run: bool) -> None:
    """Submit a hyperparameter search (python -m jobs.tune CONFIG) through the Ray Jobs API."""
    from aiaas.config.tune import TuneConfig
    from jobs import preflight

    config = loader.load(config_path, TuneConfig)
    cluster = target.load_cluster(cluster_path)
    uri = target.use_registry(cluster) if config.finetune is not None else None
    preflight.check_tune(config, config_path, cluster, uri)
    extra = ("--resume",) if resume else ()
    if dry_run:
        click.echo(
            f"{config_path}: checks passed; would submit python -m jobs.tune {config_path} "
            f"{' '.join(extra)}({config.trial_count()} trials, {config.max_concurrent_trials} "
            "at a time)"
        )
        return
    submission.submit_and_report(
        "tune",
        config_path,
        config,
        cluster,
        extra_args=extra,
        follow=follow,
        next_steps=_NEXT,
        report=_print_tune_outcome,
    )


def _print_tune_outcome(record: Any) -> None:
    _print_trials((record.result or {}).get("trials") or [])
    submission.print_outcome(record)


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
@flags.cluster_option
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
    click.echo(f"{'JOB':<52} {'KIND':<8} {'STATUS':<10} {'SUBMITTED':<19} RESULT")
    for record in found:
        fresh = submit.refresh(cluster, record)
        when = datetime.datetime.fromtimestamp(record.submitted_at).strftime("%Y-%m-%d %H:%M:%S")
        if record.status == records.DAMAGED:
            when = "?"
        said = submission.summary(record.result)
        if not said and fresh.status in ("FAILED", records.DAMAGED):
            said = (fresh.message or "").splitlines()[0][:160] if fresh.message else ""
        click.echo(
            f"{record.submission_id:<52} {record.kind:<8} {fresh.status:<10} {when:<19} {said}"
        )


@jobs_group.command()
@click.argument("submission_id", metavar="ID")
@flags.cluster_option
@flags.json_option("Print the whole record as JSON.")
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
        click.echo(f"  result:     {submission.summary(record.result)}")
    if record.status in ("FAILED", "DAMAGED"):
        click.echo(f"  reason:     {submission.reason(record)}")


@jobs_group.command()
@click.argument("submission_id", metavar="ID")
@flags.cluster_option
@flags.follow_option("Stream new lines until the job ends.")
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
@flags.cluster_option
@console.user_errors
def stop(submission_id: str, cluster_path: Path) -> None:
    """Stop a running job; its checkpoints are kept and nothing is registered."""
    from jobs import submit

    record = submit.stop(target.load_cluster(cluster_path), submission_id)
    click.echo(f"{record.submission_id}: {record.status}")
