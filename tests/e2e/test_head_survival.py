"""The session cluster's head killed (every process of it, SIGKILL) under a steady load: the
supervisor starts it again without any command, the GCS finds the cluster's state in Redis, the
app answers again at its pinned version, the training job that ran is FAILED with its cause, and
`jobs list` / `models list` show everything that was there before, a damaged record included."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests import support
from tests.e2e.conftest import TrainedModel, aiaas_cli, serve_url, storage_root, variant


class _Load:
    """One loopback client, each answer kept with its time: bounded by ``limit_s``."""

    def __init__(self, url: str, limit_s: float) -> None:
        self.url, self.limit_s = url, limit_s
        self.answers: list[tuple[float, str]] = []  # (time, version or failure)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> _Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit_s
        body = {"instances": [[0.0] * 64]}
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    answer = client.post(self.url, json=body)
                    said = answer.json()["version"] if answer.status_code == 200 else None
                    self.answers.append((time.monotonic(), said or f"HTTP {answer.status_code}"))
                except (httpx.HTTPError, ValueError) as exc:
                    self.answers.append((time.monotonic(), type(exc).__name__))
                    time.sleep(0.05)
                time.sleep(0.02)

    def back_since(self, moment: float, answers: int = 20) -> bool:
        """The last ``answers`` answers after ``moment`` all succeeded."""
        after = [said for at, said in self.answers if at > moment]
        return len(after) >= answers and all(
            not s.startswith(("HTTP", "C", "R")) for s in after[-answers:]
        )


def _kill_the_head(state: dict) -> int:
    head = next(node for node in state["nodes"] if node["role"] == "head")
    victims = [p for p in psutil.process_iter() if _sid(p.pid) == head["pid"]]
    for process in victims:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=10)
    return len(victims)


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _listed(trained: TrainedModel, *command: str) -> str:
    result = aiaas_cli(trained.cluster, *command)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow
@pytest.mark.kills_the_head
def test_a_killed_head_comes_back_by_itself_and_costs_no_app_record_or_version(
    trained: TrainedModel, tmp_path: Path
) -> None:
    cluster = trained.cluster
    config = yaml.safe_load((support.REPO / "configs/serve/digits.yaml").read_text())
    config["http_options"]["port"] = support.free_ports(1)[0]
    app = config["applications"][0]
    app["name"] = "survivor"
    app["route_prefix"] = "/survivor"
    app["args"]["models"][0]["model"] = f"{trained.name}:{trained.version}"
    serve_file = tmp_path / "survivor.yaml"
    serve_file.write_text(yaml.safe_dump(config, sort_keys=False))
    deployed = aiaas_cli(cluster, "serve", "deploy", str(serve_file))
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    predict = f"{serve_url(deployed.stdout)}/survivor/digits:predict"

    # A training job that is still running when the head dies.
    long_run = variant(tmp_path, "configs/train/tiny/digits_mlp.yaml", "head-loss-run", epochs=500)
    submitted = aiaas_cli(cluster, "train", str(long_run))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = re.search(r"Submitted (\S+)", submitted.stdout).group(1)  # type: ignore[union-attr]
    deadline = time.monotonic() + 120
    while "RUNNING" not in _listed(trained, "jobs", "status", job_id):
        assert time.monotonic() < deadline, "the training job never started"
        time.sleep(1)
    # A half-written record beside the others must not hide them.
    damaged = storage_root(cluster) / "jobs" / "half-written" / "record.json"
    damaged.parent.mkdir(parents=True)
    damaged.write_text('{"submission_id": "half-wr')
    jobs_before = set(re.findall(r"^(\S+)\s", _listed(trained, "jobs", "list"), re.M)) - {"JOB"}
    models_before = _listed(trained, "models", "list")
    head_before = cluster.state()["nodes"][0]["pid"]

    with _Load(predict, limit_s=240) as load:
        time.sleep(3)
        assert load.back_since(0), f"the app does not answer before the kill: {load.answers[-3:]}"
        killed_at = time.monotonic()
        killed = _kill_the_head(cluster.state())
        deadline = killed_at + 180
        while not load.back_since(killed_at):
            assert time.monotonic() < deadline, f"no answers since the kill: {load.answers[-5:]}"
            time.sleep(1)
        back_at = time.monotonic()
        time.sleep(3)

    failed = [(at - killed_at, said) for at, said in load.answers if not said.isdigit()]
    after = [said for at, said in load.answers if at > back_at]
    print(
        f"head kill ({killed} processes): {len(failed)} of {len(load.answers)} requests failed, "
        f"answers back {back_at - killed_at:.1f} s after; failures {failed[:2]} … {failed[-2:]}"
    )
    assert after and set(after) == {trained.version}
    # Failures only while the ingress was down, never before the kill.
    assert all(0 <= offset <= back_at - killed_at for offset, _ in failed)
    assert cluster.state()["nodes"][0]["pid"] != head_before  # restarted without a command

    status = _listed(trained, "jobs", "status", job_id)
    assert f"{job_id}: FAILED" in status
    assert "lost with the head node" in status
    listed = _listed(trained, "jobs", "list")
    assert jobs_before <= set(re.findall(r"^(\S+)\s", listed, re.M))
    assert re.search(r"^half-written\s+\?\s+DAMAGED\s.*cannot be read", listed, re.M), listed
    assert _listed(trained, "models", "list") == models_before

    nodes = support.ray_nodes(cluster.gcs_address, cluster.ray_env)
    assert sorted(n["NodeName"] for n in nodes if n["Alive"]) == ["cpu-1", "cpu-2", "head"]
    assert aiaas_cli(cluster, "serve", "delete", "survivor").returncode == 0
