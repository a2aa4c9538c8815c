"""``aiaas monitor``: Prometheus and the cluster exporter beside a running cluster, the
dashboards, and the live summary ``cluster status`` prints."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiaas import errors, metrics
from aiaas.config.cluster import ClusterConfig
from aiaas.config.monitoring import MonitoringConfig
from cluster import (
    alert_rules,
    dashboards,
    exporter,
    grafana_provisioning,
    launcher,
    processes,
    prometheus_service,
    state,
)


@dataclass
class UpResult:
    service: state.NodeRecord
    started: bool  # False: it ran already and re-read its config


def _running_cluster(config: ClusterConfig) -> state.ClusterState:
    recorded = state.load(config)
    if recorded is None:
        raise errors.ClusterNotRunningError(
            f"no cluster '{config.name}' is running (nothing recorded under {config.storage_root})",
            "Start it first: aiaas cluster up",
        )
    return recorded


def recorded_prometheus(recorded: state.ClusterState) -> state.NodeRecord | None:
    """The cluster's Prometheus if it was started and still runs."""
    for service in recorded.services:
        if service.group == prometheus_service.NAME:
            alive = processes.leader(service.pid, service.create_time) is not None
            return service if alive else None
    return None


def up(config: ClusterConfig, monitoring: MonitoringConfig) -> UpResult:
    """Start (or refresh) the exporter and Prometheus for the running cluster."""
    # Under the cluster's lock: the supervisor must not see a Prometheus between its start and
    # its record (nor restart one that `down` is stopping).
    with launcher.held(config):
        return _up(config, monitoring)


def _up(config: ClusterConfig, monitoring: MonitoringConfig) -> UpResult:
    recorded = _running_cluster(config)
    prometheus_service.binary(monitoring)  # before anything starts: say how to install it
    try:
        exporter.ensure_running(
            _local_gcs(recorded),
            recorded.dashboard_url,
            config.auth_mode,
            config.mlflow_url(),
            monitoring.exporter.interval_s,
            monitoring.exporter.registry_interval_s,
            timeout_s=monitoring.startup_timeout_s,
        )
    except Exception as exc:
        raise errors.ClusterError(
            f"could not start the cluster exporter on cluster '{config.name}': {exc}",
            f"Check 'aiaas cluster status'; the head's logs are under {recorded.head().temp_dir}.",
        ) from None
    running = recorded_prometheus(recorded)
    if running is not None:
        prometheus_service.write_files(config, monitoring, recorded.head().temp_dir)
        prometheus_service.reload(running)
        return UpResult(running, started=False)
    service = prometheus_service.start(config, monitoring, recorded.head().temp_dir)
    try:
        prometheus_service.wait_ready(service, monitoring.startup_timeout_s)
    except BaseException:
        processes.stop_sessions([service.pid])
        raise
    others = [s for s in recorded.services if s.group != prometheus_service.NAME]
    state.save(config, recorded.model_copy(update={"services": [*others, service]}))
    return UpResult(service, started=True)


def down(config: ClusterConfig) -> list[str]:
    """Stop Prometheus and the exporter; returns what was stopped."""
    with launcher.held(config):
        return _down(config)


def _down(config: ClusterConfig) -> list[str]:
    recorded = _running_cluster(config)
    stopped = []
    ours = [s for s in recorded.services if s.group == prometheus_service.NAME]
    for service in ours:
        if processes.leader(service.pid, service.create_time) is not None:
            processes.stop_sessions([service.pid])
            stopped.append(f"Prometheus ({service.url})")
    try:
        if exporter.stop(_local_gcs(recorded)):
            stopped.append("cluster exporter")
    except Exception:
        pass
    if ours:
        others = [s for s in recorded.services if s.group != prometheus_service.NAME]
        state.save(config, recorded.model_copy(update={"services": others}))
    return stopped


def _local_gcs(recorded: state.ClusterState) -> str:
    # The GCS binds the machine's address; the port is ours, and loopback reaches it too.
    return f"127.0.0.1:{recorded.gcs_address.rsplit(':', 1)[1]}"


def folders(
    config: ClusterConfig, monitoring: MonitoringConfig
) -> list[grafana_provisioning.Folder]:
    """aiaas's dashboards, and Ray's generated ones when asked and the cluster runs."""
    spec = monitoring.dashboards
    found = [
        grafana_provisioning.Folder(spec.uid_prefix, spec.folder, dashboards.build(monitoring))
    ]
    recorded = state.load(config)
    if spec.include_ray and recorded is not None:
        ray_boards = grafana_provisioning.ray_dashboards(recorded.head().temp_dir)
        if ray_boards:
            found.append(grafana_provisioning.Folder(f"{spec.uid_prefix}-ray", "Ray", ray_boards))
    return found


def provision(
    config: ClusterConfig,
    monitoring: MonitoringConfig,
    grafana_url: str | None,
    output: Path | None,
) -> tuple[list[grafana_provisioning.Outcome], list[Path]]:
    """Send the dashboards to Grafana's API and/or write them as provisioning files."""
    chosen = folders(config, monitoring)
    datasource = (config.grafana.datasource, config.prometheus_url())
    written = grafana_provisioning.write_files(output, chosen, datasource) if output else []
    outcomes: list[grafana_provisioning.Outcome] = []
    if grafana_url:
        token = os.environ.get(monitoring.dashboards.token_env)
        outcomes = grafana_provisioning.upload(grafana_url, token, chosen, datasource)
    return outcomes, written


@dataclass
class ModelSummary:
    model: str
    version: str
    qps: float
    p50_ms: float | None
    p99_ms: float | None
    error_ratio: float | None


@dataclass
class LiveSummary:
    prometheus_url: str
    models: list[ModelSummary]
    running_jobs: dict[str, float]
    firing: list[str]


def live_summary(config: ClusterConfig, window: str = "1m") -> LiveSummary | None:
    """QPS, p50/p99 and error ratio per served model, running jobs by kind and firing alerts,
    from the cluster's Prometheus; None when ``monitor up`` has not started it."""
    recorded = state.load(config)
    if recorded is None:
        return None
    service = recorded_prometheus(recorded)
    if service is None or service.url is None:
        return None
    requests = metrics.SERVE_REQUESTS.series
    buckets = f"{metrics.SERVE_LATENCY.series}_bucket"

    def by_model(rows: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
        return {
            (row["metric"].get("model", "?"), row["metric"].get("version", "?")): float(
                row["value"][1]
            )
            for row in rows
        }

    with prometheus_service.Prometheus(service.url) as prometheus:
        qps = by_model(prometheus.query(f"sum by (model, version) (rate({requests}[{window}]))"))
        quantiles = {
            q: by_model(
                prometheus.query(
                    f"histogram_quantile({q}, sum by (model, version, le) "
                    f"(rate({buckets}[{window}])))"
                )
            )
            for q in (0.5, 0.99)
        }
        errors_ = by_model(prometheus.query(alert_rules.serving_error_ratio(window)))
        jobs = prometheus.query(f'sum by (kind) ({metrics.JOBS.series}{{status="RUNNING"}})')
        firing = [
            f"{alert['labels'].get('alertname')} {_alert_subject(alert['labels'])}".strip()
            for alert in prometheus.alerts()
            if alert.get("state") == "firing"
        ]
    models = [
        ModelSummary(
            model,
            version,
            rate,
            _finite(quantiles[0.5].get((model, version))),
            _finite(quantiles[0.99].get((model, version))),
            # No 5xx series at all means none were answered: 0, not unknown.
            _finite(errors_.get((model, version), 0.0 if rate > 0 else None)),
        )
        for (model, version), rate in sorted(qps.items())
    ]
    return LiveSummary(
        service.url,
        models,
        {row["metric"].get("kind", "?"): float(row["value"][1]) for row in jobs},
        firing,
    )


def _finite(value: float | None) -> float | None:
    return value if value is not None and value == value and abs(value) != float("inf") else None


def _alert_subject(labels: dict[str, str]) -> str:
    keys = ("model", "version", "application", "deployment", "kind")
    return " ".join(f"{key}={labels[key]}" for key in keys if key in labels)
