"""One real local cluster (1 head + 2 workers, own ports and temp dirs) shared by the e2e tests."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import support


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that kill the session cluster's head run last: whatever they break, no other test
    runs on a cluster that went through it."""
    items.sort(key=lambda item: item.get_closest_marker("kills_the_head") is not None)


@dataclass
class RunningCluster:
    """A cluster started with the real `aiaas cluster up`."""

    config_path: Path
    state_path: Path
    temp_root: str

    def state(self) -> dict:
        return json.loads(self.state_path.read_text())

    @property
    def dashboard_url(self) -> str:
        return str(self.state()["dashboard_url"])

    @property
    def gcs_address(self) -> str:
        return str(self.state()["gcs_address"])

    @property
    def ray_env(self) -> dict[str, str]:
        """Auth settings for Ray's own CLIs and drivers (what `aiaas cluster env` prints)."""
        return support.cluster_ray_env(self.config_path)

    @property
    def headers(self) -> dict[str, str]:
        """The dashboard REST API's Authorization header."""
        return support.cluster_headers(self.config_path)


def start(directory: Path, name: str, workers: int, **overrides: object) -> RunningCluster:
    """Start a cluster through the CLI and check it reported success."""
    config_path = support.write_cluster_config(directory, name, workers, **overrides)
    result = support.run("aiaas", "cluster", "up", str(config_path))
    assert result.returncode == 0, result.stdout + result.stderr
    import yaml

    config = yaml.safe_load(config_path.read_text())
    state_path = Path(config["storage_root"]) / "clusters" / name / "state.json"
    return RunningCluster(config_path, state_path, config["temp_root"])


def stop(cluster: RunningCluster) -> None:
    """Stop it through the CLI and check nothing of it is left."""
    result = support.run("aiaas", "cluster", "down", str(cluster.config_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert support.processes_under(cluster.temp_root) == []
    shutil.rmtree(cluster.temp_root, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    running = start(tmp_path_factory.mktemp("cluster"), "e2e", workers=2)
    try:
        yield running
    finally:
        stop(running)


@pytest.fixture(scope="session")
def digits(cluster: RunningCluster) -> RunningCluster:
    """The session cluster with the digits data set prepared under its storage root."""
    result = support.run(
        "aiaas",
        "data",
        "prepare",
        "configs/data/digits.yaml",
        "--cluster",
        str(cluster.config_path),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return cluster


def aiaas_cli(
    cluster: RunningCluster, *args: str, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """``aiaas ARGS --cluster <the test cluster's config>``."""
    return support.run("aiaas", *args, "--cluster", str(cluster.config_path), timeout=timeout)


def mlflow_uri(cluster: RunningCluster) -> str:
    import yaml

    return f"http://127.0.0.1:{yaml.safe_load(cluster.config_path.read_text())['mlflow']['port']}"


def storage_root(cluster: RunningCluster) -> Path:
    import yaml

    return Path(yaml.safe_load(cluster.config_path.read_text())["storage_root"])


def variant(tmp_path: Path, base: str, name: str, **changes: object) -> Path:
    """A shipped train config with another run name and changes, written outside the project."""
    import yaml

    config = yaml.safe_load((support.REPO / base).read_text())
    config.update(name=name, **changes)
    config["registration"] = {**config["registration"], "model_name": name}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class TrainedModel:
    """A model trained and registered on the session cluster by the real CLI."""

    cluster: RunningCluster
    name: str
    version: str


@pytest.fixture(scope="session")
def trained(digits: RunningCluster, tmp_path_factory: pytest.TempPathFactory) -> TrainedModel:
    """The tiny digits MLP trained for a few epochs as 'lifecycle-mlp' (version 1)."""
    path = variant(
        tmp_path_factory.mktemp("trained"),
        "configs/train/tiny/digits_mlp.yaml",
        "lifecycle-mlp",
        epochs=6,
    )
    result = aiaas_cli(digits, "train", str(path), "--follow")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "registered lifecycle-mlp v1" in result.stdout, result.stdout
    return TrainedModel(digits, "lifecycle-mlp", "1")


def ray_job_logs(cluster: RunningCluster, submission_id: str) -> str:
    """The job's log as Ray's own CLI prints it (with the cluster's token)."""
    return support.run(
        "ray",
        "job",
        "logs",
        "--address",
        cluster.dashboard_url,
        submission_id,
        ray_env=cluster.ray_env,
    ).stdout


def train_worker_nodes(cluster: RunningCluster) -> set[str]:
    """Names of the nodes where Ray Train workers of a running job live."""
    import httpx

    url = cluster.dashboard_url
    headers = cluster.headers
    actors = httpx.get(
        f"{url}/api/v0/actors",
        params={"limit": 10000, "detail": "true"},
        headers=headers,
        timeout=30,
    )
    nodes = httpx.get(f"{url}/api/v0/nodes", params={"limit": 1000}, headers=headers, timeout=30)
    try:
        names = {n["node_id"]: n["node_name"] for n in nodes.json()["data"]["result"]["result"]}
        found = actors.json()["data"]["result"]["result"]
    except (KeyError, TypeError, ValueError):
        return set()  # a busy dashboard's error answer: the caller asks again
    return {
        names.get(actor["node_id"], "?")
        for actor in found
        if actor["class_name"] == "RayTrainWorker" and actor["state"] == "ALIVE"
    }


def kill_a_train_worker_node(cluster: RunningCluster) -> str:
    """SIGKILL every process of a worker node (not the head) that holds a Ray Train worker of
    the running job; its name. The state API is a snapshot (an actor between restarts, a
    partial answer from a busy dashboard), so it is asked until it shows one."""
    import os
    import signal
    import time

    import psutil

    deadline = time.monotonic() + 120
    while not (victims := sorted(train_worker_nodes(cluster) - {"head", "?"})):
        assert time.monotonic() < deadline, "no Ray Train worker was seen on a worker node"
        time.sleep(1)
    victim = next(node for node in cluster.state()["nodes"] if node["name"] == victims[0])
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == victim["pid"]:
                process.send_signal(signal.SIGKILL)
        except (ProcessLookupError, psutil.Error):
            continue
    return str(victims[0])


def serve_url(deploy_output: str) -> str:
    """The address Serve answers on, as `aiaas serve deploy` printed it (Serve keeps the port
    of the first deploy of a session)."""
    return deploy_output.split("Serve: ", 1)[1].split()[0]
