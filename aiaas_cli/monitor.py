"""``aiaas monitor up | down | status | dashboards``: parse, validate, call, print."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from aiaas.config import loader
from aiaas.config.cluster import ClusterConfig
from aiaas.config.monitoring import MonitoringConfig
from aiaas_cli import console, flags, target

if TYPE_CHECKING:
    from cluster.monitor import LiveSummary


def _load(cluster_path: Path, monitoring_path: Path) -> tuple[ClusterConfig, MonitoringConfig]:
    return target.load_cluster(cluster_path), loader.load(monitoring_path, MonitoringConfig)


@click.group()
def monitor() -> None:
    """Prometheus, alert rules and Grafana dashboards for a running cluster."""


@monitor.command()
@flags.monitoring_option
@flags.cluster_option
@flags.dry_run_option("Print the alert rules; start nothing.")
@console.user_errors
def up(monitoring_path: Path, cluster_path: Path, dry_run: bool) -> None:
    """Start Prometheus (127.0.0.1) and the cluster exporter; re-run to apply a changed config."""
    from cluster import monitor as monitoring

    cluster, config = _load(cluster_path, monitoring_path)
    if dry_run:
        import yaml

        from cluster import alert_rules

        click.echo(f"would start Prometheus on {cluster.prometheus_url()} with these rules:")
        click.echo(yaml.safe_dump(alert_rules.rules(config), sort_keys=False, width=100))
        return
    result = monitoring.up(cluster, config)
    verb = "started" if result.started else "running; re-read its config and rules"
    click.echo(f"Prometheus {verb}: {result.service.url}")
    click.echo(f"  scraping every node of '{cluster.name}' through Ray's service discovery")
    click.echo(f"  alert rules: {result.service.temp_dir}/aiaas_rules.yml")
    click.echo("  cluster exporter: actor 'aiaas-exporter' (namespace aiaas) on the head node")
    console.next_steps(
        [
            f"aiaas monitor status --cluster {cluster_path}",
            f"aiaas monitor dashboards --grafana-url URL --cluster {cluster_path}",
            f"aiaas monitor down --cluster {cluster_path}",
        ]
    )


@monitor.command()
@flags.cluster_option
@console.user_errors
def down(cluster_path: Path) -> None:
    """Stop Prometheus and the cluster exporter (the cluster keeps running)."""
    from cluster import monitor as monitoring

    stopped = monitoring.down(target.load_cluster(cluster_path))
    click.echo("Stopped: " + ", ".join(stopped) if stopped else "Nothing to stop.")
    console.next_steps([f"aiaas monitor up --cluster {cluster_path}"])


@monitor.command()
@flags.cluster_option
@console.user_errors
def status(cluster_path: Path) -> None:
    """Scrape targets, firing alerts and the live serving summary."""
    from cluster import monitor as monitoring
    from cluster import prometheus_service

    cluster = target.load_cluster(cluster_path)
    summary = monitoring.live_summary(cluster)
    if summary is None:
        console.fail(f"no Prometheus runs for cluster '{cluster.name}'; start it: aiaas monitor up")
        return
    with prometheus_service.Prometheus(summary.prometheus_url) as prometheus:
        targets = prometheus.targets()
    click.echo(f"Prometheus: {summary.prometheus_url}")
    click.echo(f"\nScrape targets ({len(targets)}):")
    for entry in targets:
        error = f"  {entry.get('lastError')}" if entry.get("lastError") else ""
        click.echo(f"  {entry['scrapeUrl']:<40} {entry['health']}{error}")
    print_summary(summary)


def print_summary(summary: LiveSummary) -> None:
    """The live part shared with ``aiaas cluster status``."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    click.echo("\nServing (last minute):")
    if not summary.models:
        click.echo("  no predict traffic")
    for row in summary.models:
        errors = "-" if row.error_ratio is None else f"{row.error_ratio:.1%}"
        click.echo(
            f"  {row.model:<16} v{row.version:<4} {row.qps:8.2f} req/s  "
            f"p50 {ms(row.p50_ms)} ms  p99 {ms(row.p99_ms)} ms  5xx {errors}"
        )
    running = ", ".join(
        f"{kind} {count:g}" for kind, count in summary.running_jobs.items() if count
    )
    click.echo(f"Running jobs: {running or 'none'}")
    click.echo(f"Firing alerts: {', '.join(summary.firing) or 'none'}")


@monitor.command()
@flags.monitoring_option
@flags.cluster_option
@click.option(
    "--grafana-url",
    help="Grafana to provision through its HTTP API (default: the cluster config's grafana.url)."
    " The token comes from the variable named by dashboards.token_env (GRAFANA_TOKEN).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Also write the dashboards and Grafana provisioning files under this directory.",
)
@flags.dry_run_option("List the dashboards; send and write nothing.")
@console.user_errors
def dashboards(
    monitoring_path: Path,
    cluster_path: Path,
    grafana_url: str | None,
    output: Path | None,
    dry_run: bool,
) -> None:
    """Create or update aiaas's (and Ray's) dashboards in Grafana, and/or write them as files."""
    from cluster import monitor as monitoring

    cluster, config = _load(cluster_path, monitoring_path)
    if dry_run:
        for folder in monitoring.folders(cluster, config):
            for board in folder.dashboards:
                panels = len(board.get("panels", []))
                click.echo(
                    f"  {folder.title}/{board.get('title')} (uid {board['uid']}, {panels} panels)"
                )
        return
    url = grafana_url or cluster.grafana.url
    if url is None and output is None:
        console.fail(
            "give --grafana-url URL (or grafana.url in the cluster config) and/or --output DIR"
        )
        return
    outcomes, written = monitoring.provision(cluster, config, url, output)
    for outcome in outcomes:
        click.echo(f"  {outcome.action:<9} {outcome.folder}/{outcome.title} (uid {outcome.uid})")
    if url:
        click.echo(f"Grafana {url}: {len(outcomes)} dashboards provisioned.")
    if written:
        click.echo(f"Wrote {len(written)} files under {output}")
        click.echo(f"  point Grafana's paths.provisioning at {output}/provisioning")
