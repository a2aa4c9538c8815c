"""``aiaas cluster up | status | down | render``: parse, validate, call the launcher, print."""

from __future__ import annotations

from pathlib import Path

import click

from aiaas import ray_auth
from aiaas.config.cluster import ClusterConfig
from aiaas_cli import console, flags, target


def _load(config_path: Path | None) -> tuple[ClusterConfig, Path]:
    path = config_path or flags.DEFAULT_CLUSTER
    return target.load_cluster(path), path


@click.group()
def cluster() -> None:
    """Start, inspect, stop or render the Ray cluster described by a cluster config.

    CONFIG defaults to configs/cluster/local.yaml (one head and two workers on this machine).
    """


@cluster.command()
@flags.cluster_config_argument
@flags.dry_run_option("Validate and show the nodes; start nothing.")
@console.user_errors
def up(config_path: Path | None, dry_run: bool) -> None:
    """Start the head and worker nodes; report the cluster if it already runs."""
    from cluster import launcher

    config, path = _load(config_path)
    if dry_run:
        for node in launcher.plan(config):
            spec = node.spec
            click.echo(
                f"would start {node.name:<12} {node.role:<6} "
                f"CPU={spec.num_cpus} GPU={spec.num_gpus} "
                f"memory={spec.memory.human_readable()} "
                f"object_store={spec.object_store_memory.human_readable()}"
            )
        return
    if config.auth_mode == "disabled":
        click.echo(
            f"Warning: auth_mode: disabled in {path}: Ray's GCS, raylets, dashboard agents and "
            "Ray Client listen on this machine's address and will run code for anyone who "
            "reaches them. Set auth_mode: token unless this machine is isolated.",
            err=True,
        )
    result = launcher.up(config, path, echo=click.echo)
    current = result.state
    if result.already_running:
        click.echo(f"Cluster '{config.name}' is already running ({len(current.nodes)} nodes).")
    elif result.restarted:
        click.echo(
            f"Cluster '{config.name}' is running again; restarted {', '.join(result.restarted)}."
        )
    else:
        click.echo(f"Cluster '{config.name}' is up: {len(current.nodes)} nodes alive.")
    _print_addresses(config, current.gcs_address, current.dashboard_url)
    console.next_steps(
        [
            f"aiaas cluster status {path}",
            "aiaas data prepare configs/data/digits.yaml",
            "aiaas train configs/train/digits_mlp.yaml --follow",
            f"ray job submit --address {current.dashboard_url} --working-dir . -- "
            "python -m jobs.node_report",
            f"aiaas cluster down {path}",
        ]
    )


@cluster.command()
@flags.cluster_config_argument
@console.user_errors
def status(config_path: Path | None) -> None:
    """Show nodes, resources, running jobs and Serve apps."""
    from cluster import status as cluster_status

    config, path = _load(config_path)
    report = cluster_status.collect(config)
    current = report.state
    _print_addresses(config, current.gcs_address, current.dashboard_url)
    if not report.reachable:
        console.fail(
            f"the head of cluster '{config.name}' does not answer at {current.dashboard_url}\n"
            f"Restart it: aiaas cluster down {path} && aiaas cluster up {path}"
        )
    click.echo(f"\nNodes ({len(report.nodes)} alive):")
    recorded = {node.name: node for node in current.nodes}
    for node in report.nodes:
        total = node.get("resources_total", {})
        custom = {
            key: value
            for key, value in total.items()
            if key not in ("CPU", "GPU", "memory", "object_store_memory")
            and not key.startswith("node:")
        }
        click.echo(
            f"  {node['node_name']:<12} {'head' if node.get('is_head_node') else 'worker':<6} "
            f"{node['node_ip']:<15} CPU={total.get('CPU', 0):g} GPU={total.get('GPU', 0):g} "
            f"memory={total.get('memory', 0) / 2**30:.1f}GiB "
            f"object_store={total.get('object_store_memory', 0) / 2**30:.2f}GiB"
            + (f" {custom}" if custom else "")
            + (
                f" pid={recorded[node['node_name']].pid} "
                f"metrics=:{recorded[node['node_name']].metrics_export_port}"
                if node["node_name"] in recorded
                else ""
            )
        )
    if report.missing:
        click.echo(
            f"  missing: {', '.join(report.missing)} (aiaas cluster up {path} restarts them)"
        )
    click.echo(f"\nJobs: {len(report.active_jobs)} running of {report.job_count}")
    for job in report.active_jobs:
        job_id = job.get("submission_id") or job.get("job_id")
        click.echo(f"  {job_id}  {job['status']:<8} {job['entrypoint']}")
    click.echo(f"\nServe applications: {len(report.serve_apps)}")
    for name, app in report.serve_apps.items():
        click.echo(f"  {name:<16} {app.get('status', '?'):<10} route={app.get('route_prefix')}")
    _print_live_summary(config, path)
    console.next_steps(
        [f"ray status --address {current.gcs_address}", f"aiaas cluster down {path}"]
    )


@cluster.command()
@flags.cluster_config_argument
@console.user_errors
def down(config_path: Path | None) -> None:
    """Stop exactly the processes 'up' started, and nothing else."""
    from cluster import launcher

    config, path = _load(config_path)
    result = launcher.down(config, echo=click.echo)
    if not result.found:
        click.echo(
            f"No cluster '{config.name}' is recorded under {config.storage_root}; nothing to stop."
        )
        return
    click.echo(
        f"Cluster '{config.name}' stopped: {len(result.nodes)} nodes, {result.processes} processes."
    )
    console.next_steps([f"aiaas cluster up {path}"])


@cluster.command()
@flags.cluster_config_argument
@click.option(
    "--target",
    type=click.Choice(["ray-up", "kuberay"]),
    required=True,
    help="ray-up: a `ray up` cluster YAML; kuberay: a KubeRay RayCluster manifest.",
)
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), help="Write here instead of standard output."
)
@console.user_errors
def render(config_path: Path | None, target: str, output: Path | None) -> None:
    """Render the cluster for `ray up` or KubeRay, for clusters beyond this machine."""
    import yaml

    from cluster import render as renderer

    config, path = _load(config_path)
    rendered = renderer.ray_up(config, path) if target == "ray-up" else renderer.kuberay(config)
    text = yaml.safe_dump(rendered, sort_keys=False)
    for warning in renderer.warnings(config):
        click.echo(f"Warning: {warning}", err=True)
    if output is None:
        click.echo(text, nl=False)
        return
    output.write_text(text)
    click.echo(f"Wrote {output}", err=True)
    console.next_steps(renderer.next_steps(config, target, output))


def _print_live_summary(config: ClusterConfig, path: Path) -> None:
    from aiaas import errors
    from aiaas_cli import monitor as monitor_commands
    from cluster import monitor

    try:
        summary = monitor.live_summary(config)
    except errors.ClusterError as exc:
        click.echo(f"\nLive summary unavailable: {exc}")
        return
    if summary is None:
        click.echo(f"\nLive summary: no Prometheus (start it: aiaas monitor up --cluster {path})")
        return
    click.echo(f"\nLive summary from {summary.prometheus_url}:", nl=False)
    monitor_commands.print_summary(summary)


def _print_addresses(config: ClusterConfig, gcs_address: str, dashboard_url: str) -> None:
    click.echo(f"  Dashboard / Jobs API: {dashboard_url}")
    click.echo(f"  GCS address:          {gcs_address}")
    click.echo(f"  Metrics (head):       http://127.0.0.1:{config.ports.metrics_export}/metrics")
    click.echo(f"  MLflow registry:      {config.mlflow_url() or '(disabled)'}")
    click.echo(f"  Prometheus:           {config.prometheus_url()} (aiaas monitor up)")
    if config.gcs_fault_tolerance.enabled:
        click.echo(
            f"  GCS state in Redis:   127.0.0.1:{config.ports.redis} (a supervisor restarts "
            "lost nodes and services)"
        )
    else:
        click.echo("  GCS fault tolerance:  disabled (a dead head forgets the cluster)")
    click.echo(f"  Storage root:         {config.storage_root}")
    if config.auth_mode == "token":
        click.echo(f"  Ray token:            {ray_auth.token_path(config)} (mode 0600)")
        click.echo("  For Ray's own CLIs (ray job submit, serve deploy, ray status), run:")
        click.echo(f"    {ray_auth.export_line(config)}")
    else:
        click.echo("  Ray token auth:       disabled")


@cluster.command()
@flags.cluster_config_argument
@console.user_errors
def env(config_path: Path | None) -> None:
    """Print the shell line that points Ray's own CLIs at this cluster's token.

    Use it as: eval "$(aiaas cluster env)"
    """
    config, _ = _load(config_path)
    click.echo(ray_auth.export_line(config))
