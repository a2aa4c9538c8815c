"""Monitoring without a cluster: alert rules under `promtool test rules`, dashboards that are valid
PromQL over the metric catalogue, Grafana provisioning against the API contract, the exporter's
counting."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from aiaas import errors, metrics
from aiaas.config import loader
from aiaas.config.monitoring import MonitoringConfig
from cluster import alert_rules, dashboards, exporter, grafana_provisioning
from tests.grafana_api import GrafanaDouble

REPO = Path(__file__).resolve().parents[2]
SHIPPED = loader.load(REPO / "configs/monitoring/default.yaml", MonitoringConfig)
PROMTOOL = shutil.which("promtool")


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # Never skipped: `make test` installs Debian's prometheus package, which brings promtool.
    assert PROMTOOL is not None, "no promtool: apt-get install prometheus (make test does)"
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def _write_rules(directory: Path, config: MonitoringConfig = SHIPPED) -> dict[str, Any]:
    rendered = alert_rules.rules(config)
    (directory / alert_rules.RULES_FILE).write_text(yaml.safe_dump(rendered, sort_keys=False))
    return {rule["alert"]: rule for group in rendered["groups"] for rule in group["rules"]}


def _expected(rule: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
    """What promtool reports for a firing alert: its labels, and annotations with the label
    templates filled in."""

    def fill(text: str) -> str:
        return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)

    return {
        "exp_labels": {**rule["labels"], **labels},
        "exp_annotations": {key: fill(value) for key, value in rule["annotations"].items()},
    }


def test_alert_rules_pass_promtool_tests(tmp_path: Path) -> None:
    """Each rule fires on the series that should fire it, after its `for`, and not on others
    (thresholds of the shipped configs/monitoring/default.yaml: 5m window, 2m pending, 5%, 250 ms,
    LLM 5% and 5000 ms, 10m at max, 15m lookback)."""
    rules = _write_rules(tmp_path)
    checked = _promtool("check", "rules", alert_rules.RULES_FILE, cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    requests = metrics.SERVE_REQUESTS.series
    latency = f"{metrics.SERVE_LATENCY.series}_bucket"
    replicas, maximum = metrics.SERVE_REPLICAS.series, metrics.SERVE_REPLICAS_MAX.series
    jobs = metrics.JOBS.series
    llm, ttft = metrics.LLM_REQUESTS.series, f"{metrics.LLM_TTFT.series}_bucket"
    digits = {"model": "digits", "version": "3"}
    smollm = {"model": "smollm", "version": "2"}

    def proc(worker: str) -> str:
        # Per-process labels: Ray's WorkerId and Serve's replica, new when a replica restarts.
        return f'WorkerId="{worker}",replica="{worker}"'

    series = [
        # digits v3: 1 req/s, and from minute 5 on 0.5 req/s of 503s; "other" has no errors.
        # Two replicas (WorkerId) each export their own counters.
        (f'{requests}{{model="digits",version="3",code="200",WorkerId="a"}}', "0+30x30"),
        (f'{requests}{{model="digits",version="3",code="200",WorkerId="b"}}', "0+30x30"),
        (f'{requests}{{model="digits",version="3",code="503",WorkerId="a"}}', "0x5 0+30x25"),
        (f'{requests}{{model="other",version="1",code="200",WorkerId="c"}}', "0+60x30"),
        # digits v3 answers in (100, 500] ms, "other" in under 100 ms.
        (f'{latency}{{model="digits",version="3",le="100"}}', "0x30"),
        (f'{latency}{{model="digits",version="3",le="500"}}', "0+60x30"),
        (f'{latency}{{model="digits",version="3",le="+Inf"}}', "0+60x30"),
        (f'{latency}{{model="other",version="1",le="100"}}', "0+60x30"),
        (f'{latency}{{model="other",version="1",le="500"}}', "0+60x30"),
        (f'{latency}{{model="other",version="1",le="+Inf"}}', "0+60x30"),
        # LLM smollm v2: replicas a and b answer 0.5 req/s each over both endpoints, and a
        # answers 0.1 req/s more of 503s (9% of answers). At minute 10 a restarts as c:
        # new per-process labels, counters from 0, and still one alert per version.
        # "tiny" answers 3.8% 503s: below the 5% threshold.
        *[
            (f'{llm}{{model="{m}",version="{v}",endpoint="{e}",code="{c}",{proc(w)}}}', values)
            for m, v, e, c, w, values in (
                ("smollm", "2", "chat", "200", "a", "0+30x10"),
                ("smollm", "2", "chat", "503", "a", "0+6x10"),
                ("smollm", "2", "chat", "200", "c", "_x10 0+30x20"),
                ("smollm", "2", "chat", "503", "c", "_x10 0+6x20"),
                ("smollm", "2", "completions", "200", "b", "0+30x30"),
                ("tiny", "1", "chat", "200", "d", "0+60x30"),
                ("tiny", "1", "chat", "503", "d", "0+2.4x30"),
            )
        ],
        # smollm v2's first tokens come in (5000, 10000] ms (p99 9950 ms), from replica a and,
        # after its restart, c; tiny's in (2000, 5000] ms (p99 4970 ms, just under 5000).
        *[
            (f'{ttft}{{model="smollm",version="2",le="{le}",{proc(w)}}}', values)
            for le, count in (("5000", "0"), ("10000", "60"), ("+Inf", "60"))
            for w, values in (("a", f"0+{count}x10"), ("c", f"_x10 0+{count}x20"))
        ],
        *[
            (f'{ttft}{{model="tiny",version="1",le="{le}",{proc("d")}}}', values)
            for le, values in (("2000", "0x30"), ("5000", "0+60x30"), ("+Inf", "0+60x30"))
        ],
        # "digits" runs at its max of 3 from the start; "small" at 1 of 3.
        (f'{replicas}{{application="digits",deployment="ModelServer",state="RUNNING"}}', "3x30"),
        (f'{maximum}{{application="digits",deployment="ModelServer"}}', "3x30"),
        (f'{replicas}{{application="small",deployment="ModelServer",state="RUNNING"}}', "1x30"),
        (f'{maximum}{{application="small",deployment="ModelServer"}}', "3x30"),
        # A train job fails at minute 6; optimize jobs failing do not page.
        (f'{jobs}{{kind="train",status="FAILED"}}', "0x5 1x25"),
        (f'{jobs}{{kind="optimize",status="FAILED"}}', "0x2 1x27"),
        # Node b leaves at minute 6.
        ('ray_cluster_active_nodes{node_type="a"}', "1x30"),
        ('ray_cluster_active_nodes{node_type="b"}', "1x5 0x24"),
    ]
    cases: list[tuple[str, str, list[dict[str, Any]]]] = [
        ("AiaasServingErrorRate", "6m", []),  # errors seen, not yet for 2m
        ("AiaasServingErrorRate", "12m", [_expected(rules["AiaasServingErrorRate"], digits)]),
        ("AiaasServingLatencyHigh", "1m", []),
        ("AiaasServingLatencyHigh", "10m", [_expected(rules["AiaasServingLatencyHigh"], digits)]),
        ("AiaasLLMErrorRate", "2m", []),  # errors seen, not yet for 2m
        ("AiaasLLMErrorRate", "8m", [_expected(rules["AiaasLLMErrorRate"], smollm)]),
        ("AiaasLLMErrorRate", "13m", [_expected(rules["AiaasLLMErrorRate"], smollm)]),
        ("AiaasLLMTimeToFirstTokenHigh", "2m", []),
        (
            "AiaasLLMTimeToFirstTokenHigh",
            "6m",
            [_expected(rules["AiaasLLMTimeToFirstTokenHigh"], smollm)],
        ),
        (
            "AiaasLLMTimeToFirstTokenHigh",
            "11m",
            [_expected(rules["AiaasLLMTimeToFirstTokenHigh"], smollm)],
        ),
        ("AiaasReplicasPinnedAtMax", "5m", []),
        (
            "AiaasReplicasPinnedAtMax",
            "15m",
            [
                _expected(
                    rules["AiaasReplicasPinnedAtMax"],
                    {"application": "digits", "deployment": "ModelServer"},
                )
            ],
        ),
        ("AiaasTrainingJobFailed", "4m", []),
        (
            "AiaasTrainingJobFailed",
            "8m",
            [_expected(rules["AiaasTrainingJobFailed"], {"kind": "train"})],
        ),
        ("AiaasTrainingJobFailed", "25m", []),  # older than the 15m lookback
        ("AiaasNodeLost", "4m", []),
        ("AiaasNodeLost", "8m", [_expected(rules["AiaasNodeLost"], {})]),
        ("AiaasNodeLost", "25m", []),
    ]
    unit = {
        "rule_files": [alert_rules.RULES_FILE],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": name, "values": values} for name, values in series],
                "alert_rule_test": [
                    {"eval_time": at, "alertname": name, "exp_alerts": expected}
                    for name, at, expected in cases
                ],
            }
        ],
    }
    (tmp_path / "rules_test.yml").write_text(yaml.safe_dump(unit, sort_keys=False))
    tested = _promtool("test", "rules", "rules_test.yml", cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert {name for name, _, _ in cases} == set(rules)  # every rule has a test


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    boards = dashboards.build(SHIPPED)
    queries = [query for board in boards for query in dashboards.panel_queries(board)]
    assert len(queries) >= 20
    recording = {
        "groups": [
            {
                "name": "dashboards",
                "rules": [
                    {"record": f"aiaas:panel_{index}", "expr": dashboards.concrete(expr)}
                    for index, (_, expr) in enumerate(queries)
                ],
            }
        ]
    }
    (tmp_path / "panels.yml").write_text(yaml.safe_dump(recording))
    checked = _promtool("check", "rules", "panels.yml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_dashboards_use_the_metric_catalogue_and_stable_uids() -> None:
    boards = dashboards.build(SHIPPED)
    assert [board["uid"] for board in boards] == [
        "aiaas-serving",
        "aiaas-llm",
        "aiaas-jobs",
        "aiaas-cluster",
    ]
    # Each serving dashboard's model variable lists the models of its own app.
    variables = {board["uid"]: board["templating"]["list"][1:] for board in boards}
    assert variables["aiaas-serving"][0]["query"] == (
        f"label_values({metrics.SERVE_REQUESTS.series}, model)"
    )
    assert variables["aiaas-llm"][0]["query"] == (
        f"label_values({metrics.LLM_REQUESTS.series}, model)"
    )
    catalogue = {metric.series for metric in metrics.CATALOGUE}
    used = set()
    for board in boards:
        assert board["templating"]["list"][0]["type"] == "datasource"
        for panel in board["panels"]:
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["gridPos"]["w"] > 0 and panel["title"]
        for _, expr in dashboards.panel_queries(board):
            for name in re.findall(r"\b(ray_aiaas_\w+?)(?:_bucket|_sum|_count)?\b", expr):
                used.add(name)
    assert used <= catalogue, used - catalogue
    # Every metric aiaas exports is on a dashboard, except the per-app embeddings series and
    # the exporter's own error counter (empty while all is well).
    unshown = catalogue - used
    assert all("embeddings" in name or "exporter_errors" in name for name in unshown), unshown
    # Building again gives the same JSON: provisioning compares content to stay idempotent.
    assert dashboards.build(SHIPPED) == boards


def test_a_bad_monitoring_config_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "monitoring.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            kind: monitoring
            alerts:
              window: 5 minutes
              serving_error_ratio: 5
            dashboards:
              folder_name: x
            """
        )
    )
    with pytest.raises(errors.ConfigError) as raised:
        loader.load(path, MonitoringConfig)
    message = str(raised.value)
    assert str(path) in message
    assert "alerts.window" in message and "Prometheus duration" in message
    assert "alerts.serving_error_ratio" in message
    assert "dashboards.folder_name" in message and "did you mean 'folder'" in message


@pytest.fixture
def grafana() -> Iterator[GrafanaDouble]:
    double = GrafanaDouble(token="glsa_test-token")
    yield double
    double.close()


def _folders() -> list[grafana_provisioning.Folder]:
    ray_board = {"uid": "rayServeDashboard", "title": "Serve Dashboard", "panels": []}
    return [
        grafana_provisioning.Folder("aiaas", "aiaas", dashboards.build(SHIPPED)),
        grafana_provisioning.Folder("aiaas-ray", "Ray", [ray_board]),
    ]


def test_provisioning_follows_grafanas_api_and_is_idempotent(grafana: GrafanaDouble) -> None:
    source = ("Prometheus", "http://127.0.0.1:9090")
    first = grafana_provisioning.upload(grafana.url, grafana.token, _folders(), source)
    assert [outcome.action for outcome in first] == ["created"] * 5
    assert set(grafana.folders) == {"aiaas", "aiaas-ray"}
    assert set(grafana.dashboards) == {
        "aiaas-serving",
        "aiaas-llm",
        "aiaas-jobs",
        "aiaas-cluster",
        "rayServeDashboard",
    }
    assert grafana.dashboards["rayServeDashboard"]["folderUid"] == "aiaas-ray"
    saved = [body for method, path, body in grafana.requests if path == "/api/dashboards/db"]
    for body in saved:
        assert body["overwrite"] is True and body["folderUid"] in grafana.folders
        assert body["dashboard"]["id"] is None and body["dashboard"]["uid"]
    assert [d["type"] for d in grafana.datasources] == ["prometheus"]
    assert grafana.datasources[0]["url"] == "http://127.0.0.1:9090"

    # Again: nothing changes, nothing is re-sent, nothing is duplicated.
    again = grafana_provisioning.upload(grafana.url, grafana.token, _folders(), source)
    assert [outcome.action for outcome in again] == ["unchanged"] * 5
    assert grafana.calls("POST", "/api/dashboards/db") == 5
    assert grafana.calls("POST", "/api/folders") == 2
    assert grafana.calls("POST", "/api/datasources") == 1

    # A changed dashboard is updated in place: same uid and id, next version.
    changed = _folders()
    changed[0].dashboards[0]["panels"][0]["title"] = "Predictions per second"
    before = grafana.dashboards["aiaas-serving"]["dashboard"]
    third = grafana_provisioning.upload(grafana.url, grafana.token, changed, source)
    assert [outcome.action for outcome in third] == ["updated"] + ["unchanged"] * 4
    after = grafana.dashboards["aiaas-serving"]["dashboard"]
    assert after["id"] == before["id"] and after["version"] == before["version"] + 1
    assert after["panels"][0]["title"] == "Predictions per second"
    assert len(grafana.dashboards) == 5 and grafana.problems == []


def test_provisioning_with_a_bad_token_says_so(grafana: GrafanaDouble) -> None:
    with pytest.raises(errors.ClusterError) as raised:
        grafana_provisioning.upload(grafana.url, "wrong", _folders())
    assert "401" in str(raised.value) and "token" in str(raised.value)
    assert grafana.dashboards == {}


def test_provisioning_files_load_in_grafana_file_provisioning(tmp_path: Path) -> None:
    written = grafana_provisioning.write_files(
        tmp_path, _folders(), ("Prometheus", "http://127.0.0.1:9090")
    )
    providers = yaml.safe_load((tmp_path / "provisioning/dashboards/aiaas.yml").read_text())
    assert providers["apiVersion"] == 1
    for provider in providers["providers"]:
        directory = Path(provider["options"]["path"])
        assert provider["type"] == "file" and directory.is_dir()
        for board in directory.glob("*.json"):
            assert json.loads(board.read_text())["uid"] == board.stem
    sources = yaml.safe_load((tmp_path / "provisioning/datasources/aiaas.yml").read_text())
    assert sources["datasources"][0]["type"] == "prometheus"
    assert len(written) == 5 + 2


def test_the_exporter_counts_jobs_by_kind_and_replicas_against_their_maximum() -> None:
    jobs = [
        {"status": "RUNNING", "metadata": {"aiaas_kind": "train"}, "entrypoint": "x"},
        {"status": "FAILED", "metadata": {}, "entrypoint": "python -m jobs.tune c.yaml"},
        {"status": "SUCCEEDED", "metadata": None, "entrypoint": "python script.py"},
    ]
    counts = exporter.job_counts(jobs)
    assert counts[("train", "RUNNING")] == 1 and counts[("tune", "FAILED")] == 1
    assert counts[("other", "SUCCEEDED")] == 1
    assert counts[("optimize", "FAILED")] == 0  # present before any failure
    assert len(counts) == len(exporter.JOB_KINDS) * len(exporter.JOB_STATUSES)
    details = {
        "applications": {
            "digits": {
                "deployments": {
                    "ModelServer": {
                        "replicas": [{"state": "RUNNING"}, {"state": "STARTING"}],
                        "deployment_config": {"autoscaling_config": {"max_replicas": 3}},
                    }
                }
            },
            "fixed": {
                "deployments": {"D": {"replicas": [], "deployment_config": {"num_replicas": 1}}}
            },
        }
    }
    replicas, maxima = exporter.replica_counts(details)
    assert replicas[("digits", "ModelServer", "RUNNING")] == 1
    assert replicas[("digits", "ModelServer", "STARTING")] == 1
    assert replicas[("fixed", "D", "RUNNING")] == 0
    assert maxima == {("digits", "ModelServer"): 3}


def test_cluster_nodes_point_the_ray_dashboard_at_prometheus_and_grafana() -> None:
    from aiaas.config.cluster import ClusterConfig
    from cluster import environment

    head = {"num_cpus": 1, "memory": "1GiB", "object_store_memory": "100MiB"}
    base = {"kind": "cluster", "head": head, "ports": {"prometheus": 9191}}
    plain = environment.node_env(ClusterConfig.model_validate(base))
    assert plain["RAY_PROMETHEUS_HOST"] == "http://127.0.0.1:9191"
    assert "RAY_GRAFANA_HOST" not in plain
    grafana = {"url": "http://grafana.internal:3000/", "iframe_url": "https://grafana.example"}
    env = environment.node_env(ClusterConfig.model_validate({**base, "grafana": grafana}))
    assert env["RAY_GRAFANA_HOST"] == "http://grafana.internal:3000"
    assert env["RAY_GRAFANA_IFRAME_HOST"] == "https://grafana.example"
    assert env["RAY_PROMETHEUS_NAME"] == "Prometheus"
    with pytest.raises(ValueError, match="http"):
        ClusterConfig.model_validate({**base, "grafana": {"url": "grafana:3000"}})
