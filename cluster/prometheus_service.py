"""The Prometheus that ``aiaas monitor up`` runs: config, start, readiness, queries."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from aiaas import errors
from aiaas.config.cluster import ClusterConfig
from aiaas.config.monitoring import MonitoringConfig
from cluster import alert_rules, environment, processes, state

NAME = "prometheus"
#: Ray rewrites this file in the head's temp dir as nodes come and go.
SERVICE_DISCOVERY = "prom_metrics_service_discovery.json"


def directory(config: ClusterConfig) -> Path:
    """Prometheus's config, rules, data and log, kept with the cluster's temp files."""
    return environment.cluster_dir(config) / NAME


def render_config(
    cluster: ClusterConfig, monitoring: MonitoringConfig, head_temp_dir: str
) -> dict[str, Any]:
    """prometheus.yml: every node of the cluster through Ray's service-discovery file."""
    return {
        "global": {
            "scrape_interval": monitoring.prometheus.scrape_interval,
            "evaluation_interval": monitoring.prometheus.evaluation_interval,
            "external_labels": {"aiaas_cluster": cluster.name},
        },
        "rule_files": [alert_rules.RULES_FILE],
        "scrape_configs": [
            {
                "job_name": "ray",
                "file_sd_configs": [
                    {
                        "files": [str(Path(head_temp_dir) / SERVICE_DISCOVERY)],
                        "refresh_interval": "5s",
                    }
                ],
            },
            {
                "job_name": NAME,
                "static_configs": [{"targets": [f"127.0.0.1:{cluster.ports.prometheus}"]}],
            },
        ],
    }


def write_files(cluster: ClusterConfig, monitoring: MonitoringConfig, head_temp_dir: str) -> Path:
    """Write prometheus.yml and the rule file; returns the config's path."""
    where = directory(cluster)
    where.mkdir(parents=True, exist_ok=True)
    (where / alert_rules.RULES_FILE).write_text(
        yaml.safe_dump(alert_rules.rules(monitoring), sort_keys=False, width=100)
    )
    config_path = where / "prometheus.yml"
    config_path.write_text(
        yaml.safe_dump(render_config(cluster, monitoring, head_temp_dir), sort_keys=False)
    )
    return config_path


def binary(monitoring: MonitoringConfig) -> str:
    """The Prometheus executable, or a ClusterError saying how to install it."""
    found = shutil.which(monitoring.prometheus.binary)
    if found is None:
        raise errors.ClusterError(
            f"no Prometheus executable '{monitoring.prometheus.binary}' on PATH",
            "Install Debian's package: apt-get install -y --no-install-recommends prometheus "
            "(make demo and make test do), or set prometheus.binary in the monitoring config.",
        )
    return found


def start(
    cluster: ClusterConfig, monitoring: MonitoringConfig, head_temp_dir: str
) -> state.NodeRecord:
    """Start Prometheus on 127.0.0.1 in a session of its own; returns its record."""
    executable = binary(monitoring)
    config_path = write_files(cluster, monitoring, head_temp_dir)
    where = config_path.parent
    log_path = where / "prometheus.log"
    command = [
        executable,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={where / 'data'}",
        f"--storage.tsdb.retention.time={monitoring.prometheus.retention}",
        f"--web.listen-address=127.0.0.1:{cluster.ports.prometheus}",
        # `monitor up` with changed rules reloads them without losing the samples.
        "--web.enable-lifecycle",
    ]
    leader = processes.spawn(command, environment.node_env(cluster), log_path)
    return state.NodeRecord(
        name=NAME,
        role="service",
        group=NAME,
        pid=leader.pid,
        create_time=leader.create_time(),
        temp_dir=str(where),
        log_path=str(log_path),
        url=cluster.prometheus_url(),
        command=command,
        health_path="/-/ready",
    )


def wait_ready(service: state.NodeRecord, timeout_s: float) -> None:
    """Wait until Prometheus answers ``/-/ready``; a ClusterError with its log if it dies."""
    processes.wait_answering(
        "Prometheus",
        service.pid,
        service.create_time,
        f"{service.url}/-/ready",
        service.log_path,
        time.monotonic() + timeout_s,
        "Is the cluster's ports.prometheus free? Raise 'startup_timeout_s' in the monitoring "
        "config if this machine is slow.",
    )


def reload(service: state.NodeRecord) -> None:
    """Make a running Prometheus re-read its config and rules."""
    import httpx

    try:
        answer = httpx.post(f"{service.url}/-/reload", timeout=10, trust_env=False)
    except httpx.HTTPError as exc:
        raise errors.ClusterError(f"Prometheus at {service.url} did not answer: {exc}") from None
    if answer.status_code != 200:
        raise errors.ClusterError(
            f"Prometheus at {service.url} refused the new config: {answer.text.strip()}",
            f"Check {service.log_path}.",
        )


class Prometheus:
    """A small client of Prometheus's HTTP API (``/api/v1``)."""

    def __init__(self, url: str, timeout_s: float = 10) -> None:
        import httpx

        self.url = url.rstrip("/")
        self._client = httpx.Client(timeout=timeout_s, trust_env=False)

    def close(self) -> None:
        """Release the connection pool."""
        self._client.close()

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector."""
        return self._data("/api/v1/query", {"query": expr})["result"]

    def query_range(self, expr: str, start: float, end: float, step: str) -> list[dict[str, Any]]:
        """A range query's result matrix."""
        params = {"query": expr, "start": start, "end": end, "step": step}
        return self._data("/api/v1/query_range", params)["result"]

    def alerts(self) -> list[dict[str, Any]]:
        """Active (pending or firing) alerts."""
        return self._data("/api/v1/alerts", {})["alerts"]

    def targets(self) -> list[dict[str, Any]]:
        """Active scrape targets and their health."""
        return self._data("/api/v1/targets", {})["activeTargets"]

    def _data(self, path: str, params: dict[str, Any]) -> Any:
        import httpx

        try:
            answer = self._client.get(f"{self.url}{path}", params=params)
        except httpx.HTTPError as exc:
            raise errors.ClusterError(
                f"Prometheus at {self.url} did not answer: {exc}", "Start it: aiaas monitor up"
            ) from None
        body = (
            answer.json()
            if answer.headers.get("content-type", "").startswith("application/json")
            else {}
        )
        if answer.status_code != 200 or body.get("status") != "success":
            raise errors.ClusterError(
                f"Prometheus refused {params.get('query', path)!r}: "
                f"{body.get('error', answer.text[:200])}"
            )
        return body["data"]
