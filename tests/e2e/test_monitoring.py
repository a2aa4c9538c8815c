"""Monitoring on the real cluster: `aiaas monitor up` starts a real Prometheus scraping every node,
a real training job and real traffic (some of it answered 503) run, and then every query of every
aiaas dashboard but the LLM one returns data, the serving error alert fires, a failed train job
fires its alert, and `cluster status` shows the live summary."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from aiaas.config import loader
from aiaas.config.monitoring import MonitoringConfig
from cluster import dashboards
from cluster.prometheus_service import Prometheus
from tests import support
from tests.e2e.conftest import TrainedModel, aiaas_cli, serve_url, variant

pytestmark = pytest.mark.slow


@dataclass
class Watched:
    trained: TrainedModel
    prometheus: Prometheus
    monitoring: Path
    started_at: float

    def cli(self, *args: str) -> support.subprocess.CompletedProcess[str]:
        return aiaas_cli(self.trained.cluster, *args)


def _fast_monitoring(directory: Path) -> Path:
    """The shipped monitoring config with windows short enough for a test."""
    config = yaml.safe_load((support.REPO / "configs/monitoring/default.yaml").read_text())
    config["prometheus"].update(scrape_interval="1s", evaluation_interval="1s")
    config["exporter"].update(interval_s=1, registry_interval_s=2)
    config["alerts"].update(window="30s", pending_for="5s", lookback="10m")
    path = directory / "monitoring.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def watched(trained: TrainedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Watched]:
    path = _fast_monitoring(tmp_path_factory.mktemp("monitoring"))
    started_at = time.time()
    result = aiaas_cli(trained.cluster, "monitor", "up", "--config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    url = result.stdout.split("Prometheus started: ", 1)[1].split()[0]
    assert url.startswith("http://127.0.0.1:")
    with Prometheus(url) as prometheus:
        yield Watched(trained, prometheus, path, started_at)
        stopped = aiaas_cli(trained.cluster, "monitor", "down")
        assert stopped.returncode == 0, stopped.stderr
        assert "Prometheus" in stopped.stdout and "cluster exporter" in stopped.stdout
    services = [s["name"] for s in trained.cluster.state()["services"]]
    assert "prometheus" not in services
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/-/ready", timeout=5)


def _wait(what: str, check: object, timeout_s: float = 120) -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()  # type: ignore[operator]
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(2)


def test_prometheus_scrapes_every_node(watched: Watched) -> None:
    nodes = len(watched.trained.cluster.state()["nodes"])

    def healthy() -> list[dict]:
        targets = watched.prometheus.targets()
        ray_targets = [t for t in targets if t["labels"]["job"] == "ray" and t["health"] == "up"]
        return ray_targets if len(ray_targets) >= nodes else []

    ray_targets = _wait("every node's metrics endpoint to be up", healthy)
    ports = {str(node["metrics_export_port"]) for node in watched.trained.cluster.state()["nodes"]}
    assert ports <= {t["labels"]["instance"].rsplit(":", 1)[1] for t in ray_targets}  # type: ignore[union-attr]
    # The Ray dashboard finds this Prometheus (cluster up set RAY_PROMETHEUS_HOST on the head).
    health = httpx.get(
        f"{watched.trained.cluster.dashboard_url}/api/prometheus_health",
        headers=watched.trained.cluster.headers,
        timeout=30,
    )
    assert health.status_code == 200 and health.json()["result"] is True, health.text
    rules = httpx.get(f"{watched.prometheus.url}/api/v1/rules", timeout=10).json()
    names = {rule["name"] for group in rules["data"]["groups"] for rule in group["rules"]}
    assert {"AiaasServingErrorRate", "AiaasTrainingJobFailed", "AiaasNodeLost"} <= names


def _serve_with_tight_limits(watched: Watched) -> str:
    """configs/serve/digits.yaml (autoscaling) as app 'watched', answering 503 past 2 pending."""
    trained = watched.trained
    config = yaml.safe_load((support.REPO / "configs/serve/digits.yaml").read_text())
    config["http_options"]["port"] = support.free_ports(1)[0]
    app = config["applications"][0]
    app.update(name="watched", route_prefix="/watched")
    app["args"]["models"][0]["model"] = f"{trained.name}@production"
    app["args"].update(max_pending=2, batch_wait_timeout_s=0.4)
    path = watched.monitoring.parent / "watched.yaml"
    path.write_text(yaml.safe_dump(config))
    deployed = watched.cli("serve", "deploy", str(path))
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    return f"{serve_url(deployed.stdout)}/watched/digits:predict"


def test_training_traffic_and_alerts_fill_every_dashboard_panel(
    watched: Watched, tmp_path: Path
) -> None:
    trained = watched.trained
    # A real training run while Prometheus watches (its metrics live while the run does).
    config = variant(tmp_path, "configs/train/tiny/digits_mlp.yaml", "watched-mlp", epochs=8)
    result = watched.cli("train", str(config), "--follow")
    assert result.returncode == 0, result.stdout + result.stderr
    # A train job that fails, submitted with Ray's own CLI.
    support.ray_job_submit(
        trained.cluster.dashboard_url,
        "python",
        "-m",
        "jobs.train",
        "configs/train/missing.yaml",
        ray_env=trained.cluster.ray_env,
    )
    promoted = watched.cli("models", "promote", trained.name, trained.version)
    assert promoted.returncode == 0, promoted.stderr
    url = _serve_with_tight_limits(watched)
    body = {"instances": [[0.0] * 64]}
    codes: list[int] = []
    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(8) as pool:
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:
            # A burst of 8 against a limit of 2 pending: some 200, some 503.
            codes += list(pool.map(lambda _: client.post(url, json=body).status_code, range(8)))
    assert 200 in codes and 503 in codes, codes

    def firing(name: str) -> list[dict]:
        return [
            alert
            for alert in watched.prometheus.alerts()
            if alert["labels"]["alertname"] == name and alert["state"] == "firing"
        ]

    errors = _wait("AiaasServingErrorRate to fire", lambda: firing("AiaasServingErrorRate"))
    assert errors[0]["labels"]["model"] == "digits"  # type: ignore[index]
    _wait("AiaasTrainingJobFailed to fire", lambda: firing("AiaasTrainingJobFailed"))

    spec = loader.load(watched.monitoring, MonitoringConfig)
    # No LLM app runs in this test, so the aiaas / LLM dashboard has nothing to show; its
    # queries are checked as PromQL over the catalogue by the unit tests.
    llm_board = f"{spec.dashboards.uid_prefix}-llm"
    queries = [
        (board["title"], title, dashboards.concrete(expr, rate_interval="30s"))
        for board in dashboards.build(spec)
        if board["uid"] != llm_board
        for title, expr in dashboards.panel_queries(board)
    ]

    def empty() -> list[tuple[str, str, str]]:
        end = time.time()
        return [
            query
            for query in queries
            if not any(
                series["values"]
                for series in watched.prometheus.query_range(
                    query[2], watched.started_at, end, "2s"
                )
            )
        ]

    deadline = time.monotonic() + 120
    missing = empty()
    while missing and time.monotonic() < deadline:
        time.sleep(5)
        missing = empty()
    assert not missing, "panels without data:\n" + "\n".join(map(str, missing))

    status = support.run("aiaas", "cluster", "status", str(trained.cluster.config_path))
    assert status.returncode == 0, status.stderr
    assert "Live summary from http://127.0.0.1:" in status.stdout
    assert "digits" in status.stdout and "req/s" in status.stdout
    assert "AiaasServingErrorRate model=digits" in status.stdout
    deleted = watched.cli("serve", "delete", "watched")
    assert deleted.returncode == 0, deleted.stderr


def test_dashboards_written_as_provisioning_files(watched: Watched, tmp_path: Path) -> None:
    result = watched.cli(
        "monitor", "dashboards", "--config", str(watched.monitoring), "--output", str(tmp_path)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "dashboards/aiaas/aiaas-serving.json").exists()
    # Ray's generated dashboards of this session go beside ours, in their own folder.
    assert list((tmp_path / "dashboards/aiaas-ray").glob("*.json"))
    assert (tmp_path / "provisioning/dashboards/aiaas.yml").exists()
