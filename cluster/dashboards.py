"""aiaas's Grafana dashboards, built in code with Grafana's own grafana-foundation-sdk.

Why the foundation SDK rather than grafanalib: it is generated from Grafana's schemas by Grafana
Labs and released with Grafana (grafanalib's last release is from January 2024), so the JSON it
writes is the model current Grafana versions load without migration.

Every query is written against :mod:`aiaas.metrics`'s series names. Panels pick the Prometheus
data source through a ``datasource`` variable, as Ray's generated dashboards do, so the same JSON
works in any Grafana whatever its data source is called.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from aiaas import metrics
from aiaas.config.monitoring import MonitoringConfig
from cluster import alert_rules

RATE = "$__rate_interval"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class PanelSpec:
    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    stat: bool = False
    width: int = 12


def _model_filter(metric: metrics.Metric, suffix: str = "") -> str:
    return f'{metric.series}{suffix}{{model=~"$model"}}'


def _quantile(metric: metrics.Metric, q: float) -> Query:
    buckets = _model_filter(metric, "_bucket")
    return Query(
        f"histogram_quantile({q}, sum by (model, version, le) (rate({buckets}[{RATE}])))",
        f"p{int(q * 100)} {{{{model}}}} v{{{{version}}}}",
    )


def _serving() -> list[PanelSpec]:
    requests = _model_filter(metrics.SERVE_REQUESTS)
    batch = metrics.SERVE_BATCH_SIZE.series
    by_model = 'model=~"$model"'
    return [
        PanelSpec(
            "Requests per second",
            "Predict answers per second by model, version and HTTP status code.",
            (
                Query(
                    f"sum by (model, version, code) (rate({requests}[{RATE}]))",
                    "{{model}} v{{version}} {{code}}",
                ),
            ),
            unit="reqps",
        ),
        PanelSpec(
            "Server error ratio",
            "Share of 5xx answers; the AiaasServingErrorRate alert fires above its threshold.",
            (
                Query(
                    alert_rules.serving_error_ratio(RATE, by_model),
                    "{{model}} v{{version}}",
                ),
            ),
            unit="percentunit",
        ),
        PanelSpec(
            "Latency inside the replica",
            "p50 and p99 predict latency per model and version.",
            (_quantile(metrics.SERVE_LATENCY, 0.5), _quantile(metrics.SERVE_LATENCY, 0.99)),
            unit="ms",
        ),
        PanelSpec(
            "Mean batch size",
            "Requests per executed batch (dynamic batching across clients).",
            (
                Query(
                    f"sum by (model) (rate({batch}_sum{{{by_model}}}[{RATE}]))"
                    f" / sum by (model) (rate({batch}_count{{{by_model}}}[{RATE}]))",
                    "{{model}}",
                ),
            ),
        ),
        PanelSpec(
            "Pending requests",
            "Requests waiting or running in the replicas, per model.",
            (Query(f"sum by (model) ({_model_filter(metrics.SERVE_PENDING)})", "{{model}}"),),
        ),
        PanelSpec(
            "Replicas",
            "Serve replicas by state, and each autoscaling deployment's maximum.",
            (
                Query(
                    f"sum by (application, deployment, state) ({metrics.SERVE_REPLICAS.series})",
                    "{{application}}/{{deployment}} {{state}}",
                ),
                Query(
                    f"max by (application, deployment) ({metrics.SERVE_REPLICAS_MAX.series})",
                    "{{application}}/{{deployment}} max",
                ),
            ),
        ),
    ]


def _llm() -> list[PanelSpec]:
    # Imported here: aiaas.serving costs a quarter second, and only building needs it.
    from aiaas.serving import apps

    by_model = 'model=~"$model"'
    per_version = "{{model}} v{{version}}"

    def rate(metric: metrics.Metric, legend: str) -> Query:
        return Query(
            f"sum by (model, version) (rate({_model_filter(metric)}[{RATE}]))",
            f"{legend} {per_version}",
        )

    def gauge(metric: metrics.Metric, legend: str) -> Query:
        return Query(
            f"sum by (model, version) ({_model_filter(metric)})", f"{legend} {per_version}"
        )

    llm = f'deployment="{apps.LLM.deployment}"'
    return [
        PanelSpec(
            "Requests per second",
            "Chat and completion answers per second by model, version and HTTP status code.",
            (
                Query(
                    f"sum by (model, version, code) "
                    f"(rate({_model_filter(metrics.LLM_REQUESTS)}[{RATE}]))",
                    "{{model}} v{{version}} {{code}}",
                ),
            ),
            unit="reqps",
        ),
        PanelSpec(
            "Server error ratio",
            "Share of 5xx answers; the AiaasLLMErrorRate alert fires above its threshold.",
            (Query(alert_rules.llm_error_ratio(RATE, by_model), per_version),),
            unit="percentunit",
        ),
        PanelSpec(
            "Time to first token",
            "p50 and p99 from a request reaching the replica to its first token; the "
            "AiaasLLMTimeToFirstTokenHigh alert watches the p99.",
            (_quantile(metrics.LLM_TTFT, 0.5), _quantile(metrics.LLM_TTFT, 0.99)),
            unit="ms",
        ),
        PanelSpec(
            "Inter-token latency",
            "p50 and p99 over requests of each request's mean time between output tokens.",
            (_quantile(metrics.LLM_INTER_TOKEN, 0.5), _quantile(metrics.LLM_INTER_TOKEN, 0.99)),
            unit="ms",
        ),
        PanelSpec(
            "Tokens per second",
            "Output tokens generated and prompt tokens admitted, per model and version.",
            (rate(metrics.LLM_OUTPUT_TOKENS, "output"), rate(metrics.LLM_PROMPT_TOKENS, "prompt")),
        ),
        PanelSpec(
            "Sequences",
            "Sequences generating in the engines' batches, and requests waiting for a place.",
            (gauge(metrics.LLM_RUNNING, "running"), gauge(metrics.LLM_WAITING, "waiting")),
        ),
        PanelSpec(
            "Fine-tuning throughput",
            "Tokens per second of each fine-tuning run (aiaas finetune) since its last report, "
            "all workers together; its losses are on the Jobs dashboard (split "
            "validation_base: the base model's).",
            (
                Query(
                    f"max by (run, model) ({metrics.TRAIN_TOKENS_PER_S.series})",
                    "{{run}} ({{model}})",
                ),
            ),
        ),
        PanelSpec(
            "Replicas",
            "LLM replicas by state, and each LLM deployment's maximum.",
            (
                Query(
                    f"sum by (application, state) ({metrics.SERVE_REPLICAS.series}{{{llm}}})",
                    "{{application}} {{state}}",
                ),
                Query(
                    f"max by (application) ({metrics.SERVE_REPLICAS_MAX.series}{{{llm}}})",
                    "{{application}} max",
                ),
            ),
        ),
    ]


def _jobs_and_training() -> list[PanelSpec]:
    jobs = metrics.JOBS.series
    checkpoint = f"{metrics.TRAIN_CHECKPOINT_SECONDS.series}_bucket"
    return [
        PanelSpec(
            "Running jobs",
            "Ray jobs running now (train, tune, optimize and others).",
            (Query(f'sum({jobs}{{status="RUNNING"}})', "running"),),
            stat=True,
            width=6,
        ),
        PanelSpec(
            "Failed jobs",
            "Jobs of this cluster that failed, by kind.",
            (Query(f'sum by (kind) ({jobs}{{status="FAILED"}})', "{{kind}}"),),
            stat=True,
            width=6,
        ),
        PanelSpec(
            "Jobs by kind and status",
            "Every job the cluster knows, by aiaas kind and Ray job status.",
            (Query(f"sum by (kind, status) ({jobs})", "{{kind}} {{status}}"),),
        ),
        PanelSpec(
            "Training throughput",
            "Rows per second over each epoch, all workers of a run together.",
            (
                Query(
                    f"max by (run, model) ({metrics.TRAIN_SAMPLES_PER_S.series})",
                    "{{run}} ({{model}})",
                ),
            ),
        ),
        PanelSpec(
            "Epoch",
            "The last finished epoch of each run.",
            (Query(f"max by (run) ({metrics.TRAIN_EPOCH.series})", "{{run}}"),),
        ),
        PanelSpec(
            "Loss",
            "Mean loss per epoch, training and validation splits.",
            (Query(f"max by (run, split) ({metrics.TRAIN_LOSS.series})", "{{run}} {{split}}"),),
        ),
        PanelSpec(
            "Accuracy",
            "Accuracy per epoch, training and validation splits.",
            (Query(f"max by (run, split) ({metrics.TRAIN_ACCURACY.series})", "{{run}} {{split}}"),),
            unit="percentunit",
        ),
        PanelSpec(
            "Checkpoint time",
            "p90 time to save and report an epoch's checkpoint.",
            (
                Query(
                    f"histogram_quantile(0.9, sum by (run, le) (rate({checkpoint}[{RATE}])))",
                    "{{run}}",
                ),
            ),
            unit="s",
        ),
        PanelSpec(
            "Registered versions",
            "Versions per registered model; incomplete ones were never servable.",
            (
                Query(
                    f"sum by (model, state) ({metrics.REGISTRY_VERSIONS.series})",
                    "{{model}} {{state}}",
                ),
            ),
        ),
        PanelSpec(
            "Alias moves",
            "Promotions and rollbacks recorded in the registry.",
            (
                Query(
                    f"sum by (model, alias, action) ({metrics.REGISTRY_ALIAS_MOVES.series})",
                    "{{model}}@{{alias}} {{action}}",
                ),
            ),
        ),
    ]


def _cluster() -> list[PanelSpec]:
    return [
        PanelSpec(
            "Alive nodes",
            "Ray nodes alive; the AiaasNodeLost alert fires when this falls.",
            (Query("sum(ray_cluster_active_nodes)", "nodes"),),
            stat=True,
            width=6,
        ),
        PanelSpec(
            "Scrape targets up",
            "Metrics endpoints Prometheus reaches (one per node, plus Ray's dashboard and "
            "autoscaler).",
            (Query('sum(up{job="ray"})', "up"),),
            stat=True,
            width=6,
        ),
        PanelSpec(
            "CPU utilization per node",
            "Per node (metrics endpoint), in percent of its CPUs.",
            (Query("avg by (instance) (ray_node_cpu_utilization)", "{{instance}}"),),
            unit="percent",
        ),
        PanelSpec(
            "Memory used per node",
            "Host memory in use as each node sees it.",
            (Query("max by (instance) (ray_node_mem_used)", "{{instance}}"),),
            unit="bytes",
        ),
        PanelSpec(
            "Object store used",
            "Plasma object store memory in use, per node.",
            (Query("sum by (instance) (ray_object_store_used_memory)", "{{instance}}"),),
            unit="bytes",
        ),
        PanelSpec(
            "Running Ray tasks and actors",
            "Tasks and actors by state, the whole cluster.",
            (Query('sum by (State) (ray_tasks{State=~"RUNNING.*"})', "tasks {{State}}"),),
        ),
    ]


#: uid suffix → (title, panels, the metric whose ``model`` label fills a model variable).
_DASHBOARDS: dict[str, tuple[str, Any, metrics.Metric | None]] = {
    "serving": ("aiaas / Serving", _serving, metrics.SERVE_REQUESTS),
    "llm": ("aiaas / LLM", _llm, metrics.LLM_REQUESTS),
    "jobs": ("aiaas / Jobs, training and registry", _jobs_and_training, None),
    "cluster": ("aiaas / Cluster", _cluster, None),
}


def build(config: MonitoringConfig) -> list[dict[str, Any]]:
    """Every aiaas dashboard as Grafana dashboard JSON."""
    from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

    source = DataSourceRef(type_val="prometheus", uid="${datasource}")
    built = []
    for suffix, (title, panels, models) in _DASHBOARDS.items():
        board = (
            dashboard.Dashboard(title)
            .uid(f"{config.dashboards.uid_prefix}-{suffix}")
            .tags(["aiaas"])
            .refresh(config.dashboards.refresh)
            .time("now-1h", "now")
            .timezone("browser")
            .with_variable(
                dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")
            )
        )
        if models is not None:
            board = board.with_variable(
                dashboard.QueryVariable("model")
                .label("Model")
                .datasource(source)
                .query(f"label_values({models.series}, model)")
                .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
                .multi(True)
                .include_all(True)
                .all_value(".*")
            )
        for spec in panels():
            panel = (stat.Panel() if spec.stat else timeseries.Panel()).title(spec.title)
            panel = panel.description(spec.description).unit(spec.unit).datasource(source)
            panel = panel.span(spec.width).height(4 if spec.stat else 8)
            for ref, query in zip("ABCDEFGH", spec.queries, strict=False):
                panel = panel.with_target(
                    prometheus.Dataquery().expr(query.expr).legend_format(query.legend).ref_id(ref)
                )
            board = board.with_panel(panel)
        built.append(json.loads(json.dumps(board.build(), cls=JSONEncoder)))
    return built


_VARIABLES = re.compile(r"\$(__rate_interval|model)\b")


def panel_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of a dashboard, as written in its JSON."""
    found = []
    for panel in board.get("panels", []):
        for target in panel.get("targets", []):
            found.append((str(panel.get("title")), str(target["expr"])))
    return found


def concrete(expr: str, rate_interval: str = "1m", model: str = ".*") -> str:
    """A panel's PromQL with Grafana's variables replaced, as Grafana sends it to Prometheus."""
    values = {"__rate_interval": rate_interval, "model": model}
    return _VARIABLES.sub(lambda match: values[match.group(1)], expr)
