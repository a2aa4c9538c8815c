"""``kind: monitoring`` — Prometheus, the cluster exporter, alert thresholds and dashboards."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, PositiveFloat, PositiveInt

from aiaas.config.base import ConfigModel

_DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


def _check_duration(value: str) -> str:
    if not _DURATION.match(value):
        raise ValueError(
            f"'{value}' is not a Prometheus duration; write e.g. '30s', '5m', '1h30m' or '15d'"
        )
    return value


#: A Prometheus duration such as ``5m`` (used verbatim in PromQL and rule files).
Duration = Annotated[str, AfterValidator(_check_duration)]


class PrometheusSpec(ConfigModel):
    """The Prometheus that ``aiaas monitor up`` runs on 127.0.0.1 (the port is the cluster's)."""

    scrape_interval: Duration = Field("5s", description="how often every node is scraped")
    evaluation_interval: Duration = Field("5s", description="how often alert rules are evaluated")
    retention: Duration = Field("7d", description="how long samples are kept")
    binary: str = Field(
        "prometheus",
        description="the Prometheus executable (Debian's package installs /usr/bin/prometheus)",
    )


class ExporterSpec(ConfigModel):
    """The cluster exporter: a detached Ray actor turning cluster state into metrics."""

    interval_s: PositiveFloat = Field(5, description="seconds between polls of jobs and Serve")
    registry_interval_s: PositiveFloat = Field(
        30, description="seconds between polls of the model registry"
    )


class AlertSpec(ConfigModel):
    """Thresholds of aiaas's alert rules."""

    window: Duration = Field("5m", description="rate window of the serving and LLM alerts")
    pending_for: Duration = Field(
        "2m", description="how long a serving or LLM condition must hold before its alert fires"
    )
    serving_error_ratio: PositiveFloat = Field(
        0.05, le=1, description="share of 5xx answers per model and version that alerts"
    )
    serving_p99_ms: PositiveFloat = Field(
        250, description="p99 predict latency inside the replica that alerts, in milliseconds"
    )
    llm_error_ratio: PositiveFloat = Field(
        0.05, le=1, description="share of 5xx LLM answers per model and version that alerts"
    )
    llm_ttft_p99_ms: PositiveFloat = Field(
        5000,
        description="p99 time to first token inside the LLM replicas that alerts, in milliseconds",
    )
    replicas_at_max_for: Duration = Field(
        "10m", description="how long a deployment may sit at its max replicas before alerting"
    )
    lookback: Duration = Field(
        "15m", description="how far back failed jobs and lost nodes are looked for"
    )


class DashboardSpec(ConfigModel):
    """Where the dashboards go."""

    folder: str = Field("aiaas", min_length=1, description="Grafana folder of the dashboards")
    uid_prefix: str = Field(
        "aiaas",
        pattern=r"^[a-zA-Z0-9-]{1,20}$",
        description="prefix of the dashboards' uids (kept across updates)",
    )
    refresh: Duration = Field("10s", description="auto-refresh of the dashboards")
    include_ray: bool = Field(
        True, description="also provision Ray's generated dashboards (Serve, Train, Data, ...)"
    )
    token_env: str = Field(
        "GRAFANA_TOKEN",
        pattern=r"^[A-Z_][A-Z0-9_]*$",
        description="environment variable holding a Grafana service-account token",
    )


class MonitoringConfig(ConfigModel):
    """How ``aiaas monitor up`` watches a cluster."""

    kind: Literal["monitoring"] = Field(description="always 'monitoring'")
    prometheus: PrometheusSpec = Field(default_factory=PrometheusSpec, description="Prometheus")
    exporter: ExporterSpec = Field(default_factory=ExporterSpec, description="cluster exporter")
    alerts: AlertSpec = Field(default_factory=AlertSpec, description="alert thresholds")
    dashboards: DashboardSpec = Field(default_factory=DashboardSpec, description="dashboards")
    startup_timeout_s: PositiveInt = Field(
        60, description="how long 'monitor up' waits for Prometheus to be ready"
    )
