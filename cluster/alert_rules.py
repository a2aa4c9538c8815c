"""aiaas's Prometheus alert rules, written from the monitoring config's thresholds.

Every expression aggregates with ``sum by``/``max by`` over the labels it names: Ray adds
per-process labels (``WorkerId``, ``SessionName``, ...) that change whenever a replica or the
exporter restarts, and an alert must not split or double-fire because of them.
"""

from __future__ import annotations

from typing import Any

from aiaas import metrics
from aiaas.config.monitoring import MonitoringConfig

RULES_FILE = "aiaas_rules.yml"


def _rule(
    name: str, expr: str, for_: str, severity: str, summary: str, description: str
) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr,
        "for": for_,
        "labels": {"severity": severity, "source": "aiaas"},
        "annotations": {"summary": summary, "description": description},
    }


def _error_ratio(metric: metrics.Metric, window: str, selector: str) -> str:
    series = metric.series
    extra = f", {selector}" if selector else ""
    return (
        f'sum by (model, version) (rate({series}{{code=~"5.."{extra}}}[{window}]))'
        f" / sum by (model, version) (rate({series}{selector and '{' + selector + '}'}"
        f"[{window}]))"
    )


def _p99(metric: metrics.Metric, window: str) -> str:
    buckets = f"{metric.series}_bucket"
    return f"histogram_quantile(0.99, sum by (model, version, le) (rate({buckets}[{window}])))"


def serving_error_ratio(window: str, selector: str = "") -> str:
    """5xx answers over all answers, per model and version (``selector``: more label matchers,
    e.g. ``model=~"$model"``)."""
    return _error_ratio(metrics.SERVE_REQUESTS, window, selector)


def serving_p99_ms(window: str) -> str:
    """p99 predict latency inside the replicas, per model and version."""
    return _p99(metrics.SERVE_LATENCY, window)


def llm_error_ratio(window: str, selector: str = "") -> str:
    """5xx answers over all chat and completion answers, per model and version (both
    endpoints together: a broken model version fails both)."""
    return _error_ratio(metrics.LLM_REQUESTS, window, selector)


def llm_ttft_p99_ms(window: str) -> str:
    """p99 time to first token inside the LLM replicas, per model and version."""
    return _p99(metrics.LLM_TTFT, window)


def rules(config: MonitoringConfig) -> dict[str, Any]:
    """The rule file, as Prometheus reads it."""
    alerts = config.alerts
    replicas, replicas_max = metrics.SERVE_REPLICAS.series, metrics.SERVE_REPLICAS_MAX.series
    training = "train|tune|finetune"
    failed = f'sum by (kind) ({metrics.JOBS.series}{{kind=~"{training}", status="FAILED"}})'
    # Summed over nodes; a node that dies drops out (or to 0), so the sum falls below its
    # recent maximum. Ray's GCS exports one series per alive node.
    nodes = "sum(ray_cluster_active_nodes)"
    serving = [
        _rule(
            "AiaasServingErrorRate",
            f"({serving_error_ratio(alerts.window)}) > {alerts.serving_error_ratio}",
            alerts.pending_for,
            "critical",
            "{{ $labels.model }} version {{ $labels.version }} answers with server errors",
            f"More than {alerts.serving_error_ratio:.0%} of predict answers over "
            f"{alerts.window} are 5xx. "
            "Check 'aiaas serve status' and the replica logs; 'aiaas serve rollback APP' goes "
            "back to the previous version.",
        ),
        _rule(
            "AiaasServingLatencyHigh",
            f"{serving_p99_ms(alerts.window)} > {alerts.serving_p99_ms:g}",
            alerts.pending_for,
            "warning",
            "{{ $labels.model }} version {{ $labels.version }} p99 latency is over target",
            f"p99 predict latency over {alerts.window} is above the {alerts.serving_p99_ms:g} ms "
            "target. Raise max_replicas or batch size, or serve an optimized version.",
        ),
        _rule(
            "AiaasReplicasPinnedAtMax",
            f'sum by (application, deployment) ({replicas}{{state="RUNNING"}})'
            f" >= on (application, deployment) max by (application, deployment) ({replicas_max})",
            alerts.replicas_at_max_for,
            "warning",
            "{{ $labels.application }}/{{ $labels.deployment }} sits at its max replicas",
            f"The deployment has run at its autoscaling maximum for {alerts.replicas_at_max_for}:"
            " load is above what it may scale to. Raise max_replicas or add nodes.",
        ),
    ]
    llm = [
        _rule(
            "AiaasLLMErrorRate",
            f"({llm_error_ratio(alerts.window)}) > {alerts.llm_error_ratio}",
            alerts.pending_for,
            "critical",
            "LLM {{ $labels.model }} version {{ $labels.version }} answers with server errors",
            f"More than {alerts.llm_error_ratio:.0%} of chat and completion answers over "
            f"{alerts.window} are 5xx. "
            "Check 'aiaas serve status' and the replica logs; 'aiaas serve rollback APP' goes "
            "back to the previous version.",
        ),
        _rule(
            "AiaasLLMTimeToFirstTokenHigh",
            f"{llm_ttft_p99_ms(alerts.window)} > {alerts.llm_ttft_p99_ms:g}",
            alerts.pending_for,
            "warning",
            "LLM {{ $labels.model }} version {{ $labels.version }} p99 time to first token is "
            "over target",
            f"p99 time to first token over {alerts.window} is above the "
            f"{alerts.llm_ttft_p99_ms:g} ms target. If waiting sequences climb on the aiaas / LLM "
            "dashboard, requests queue for a place in the engine's batch: raise max_replicas or "
            "max_running. If prompt tokens per second climb instead, long prompts take the time.",
        ),
    ]
    jobs = [
        _rule(
            "AiaasTrainingJobFailed",
            f"{failed} > min_over_time({failed}[{alerts.lookback}:])",
            "0s",
            "critical",
            "A {{ $labels.kind }} job failed",
            f"A {{{{ $labels.kind }}}} job failed in the last {alerts.lookback}. "
            "'aiaas jobs list' shows it; 'aiaas jobs logs ID' shows why.",
        ),
    ]
    cluster = [
        _rule(
            "AiaasNodeLost",
            f"{nodes} < max_over_time({nodes}[{alerts.lookback}:])",
            "0s",
            "critical",
            "A Ray node of the cluster was lost",
            f"Fewer nodes are alive than in the last {alerts.lookback}. "
            "'aiaas cluster status' names the missing node; 'aiaas cluster up' restarts it.",
        ),
    ]
    return {
        "groups": [
            {"name": "aiaas-serving", "rules": serving},
            {"name": "aiaas-llm", "rules": llm},
            {"name": "aiaas-jobs", "rules": jobs},
            {"name": "aiaas-cluster", "rules": cluster},
        ]
    }
