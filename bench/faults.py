"""Faults: kill -9 every process of the head node under a steady bounded load on the model
server, then the head's Serve ingress (HAProxy) alone, on a 1 head + 1 worker cluster as shipped
(GCS fault tolerance in Redis, the supervisor restarting what dies). Reference: the same head
kill on the same cluster without fault tolerance, recovered the only way it can be, by hand and
at once (`aiaas cluster up`, then `aiaas serve deploy` again; a person is slower).

Reported per kill: requests failed (of those sent), seconds until the first failure, until
answers are back to 100% (every answer of the next 5 s succeeds), and until the cluster is whole
(every node alive, the app RUNNING). Load: 2 loopback clients, bounded in time.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from bench import serving
from tests import support

CLIENTS = 2
LIMIT_S = 240.0
#: Answers are "back" once every answer in this many seconds succeeded.
STEADY_S = 5.0


class _Load:
    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: list[tuple[float, bool]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(CLIENTS)]

    def __enter__(self) -> _Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _run(self) -> None:
        deadline = time.monotonic() + LIMIT_S
        body = {"instances": [[0.0] * 64]}
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    ok = client.post(self.url, json=body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.answers.append((time.monotonic(), ok))
                if not ok:
                    time.sleep(0.05)

    def figures(self, killed_at: float) -> dict[str, float]:
        after = sorted(a for a in self.answers if a[0] >= killed_at)
        failed = [at for at, ok in after if not ok]
        back = killed_at
        for at, ok in after:
            if not ok:
                back = at
        return {
            "failed": float(len(failed)),
            "sent": float(len(after)),
            "first_failure_s": (failed[0] - killed_at) if failed else 0.0,
            "back_s": back - killed_at,
        }

    def steady_since(self, moment: float) -> bool:
        recent = [(at, ok) for at, ok in self.answers if at > moment]
        if not recent or recent[-1][0] - recent[0][0] < STEADY_S:
            return False
        tail = [ok for at, ok in recent if at > recent[-1][0] - STEADY_S]
        return bool(tail) and all(tail)


class _Cluster:
    def __init__(self, directory: Path, name: str, fault_tolerance: bool) -> None:
        env = yaml.safe_load((support.REPO / "configs/cluster/local.yaml").read_text())["env"]
        directory.mkdir(parents=True, exist_ok=True)
        self.config = support.write_cluster_config(
            directory,
            name,
            workers=1,
            head={"num_cpus": 1, "memory": "2GiB", "object_store_memory": "200MiB"},
            env={k: str(v) for k, v in env.items()},
            gcs_fault_tolerance={"enabled": fault_tolerance},
        )
        data = yaml.safe_load(self.config.read_text())
        self.storage = Path(data["storage_root"])
        self.dashboard = f"http://127.0.0.1:{data['ports']['dashboard']}"
        self.port = support.free_ports(1)[0]
        self.app_file = directory / f"{name}-app.yaml"
        app = serving._app_config(self.port, "digits", "/v1/models", max_batch_size=1)
        # Without a custom resource the 2 replicas land where Ray puts them; one per node here.
        app["applications"][0]["deployments"][0]["max_replicas_per_node"] = 1
        self.app_file.write_text(yaml.safe_dump(app))
        self.running = False

    def cli(self, *args: str) -> float:
        started = time.monotonic()
        result = support.run(*args, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {result.stdout}{result.stderr}")
        return time.monotonic() - started

    def up(self) -> None:
        self.running = True
        self.cli("aiaas", "cluster", "up", str(self.config))
        subprocess.run(
            [sys.executable, "-c", serving._REGISTER],
            env={
                **support.env(support.cluster_ray_env(self.config)),
                "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{self._mlflow_port()}",
            },
            check=True,
            cwd=support.REPO,
            capture_output=True,
        )
        self.deploy()

    def deploy(self) -> float:
        return self.cli(
            "aiaas", "serve", "deploy", str(self.app_file), "--cluster", str(self.config)
        )

    def _mlflow_port(self) -> int:
        return int(yaml.safe_load(self.config.read_text())["mlflow"]["port"])

    def state(self) -> dict[str, Any]:
        import json

        path = self.storage / "clusters" / self.config.stem / "state.json"
        return dict(json.loads(path.read_text()))

    def whole(self) -> bool:
        headers = support.cluster_headers(self.config)
        try:
            nodes = httpx.get(
                f"{self.dashboard}/api/v0/nodes", params={"detail": "true"}, headers=headers
            ).json()["data"]["result"]["result"]
            apps = httpx.get(f"{self.dashboard}/api/serve/applications/", headers=headers)
            app = (apps.json().get("applications") or {}).get("digits") or {}
        except (httpx.HTTPError, ValueError, KeyError):
            return False
        alive = {n["node_name"] for n in nodes if n["state"] == "ALIVE"}
        return alive == {"head", "cpu-1"} and app.get("status") == "RUNNING"

    def down(self) -> None:
        if self.running:
            support.run("aiaas", "cluster", "down", str(self.config))
            self.running = False


def _head_processes(state: dict[str, Any], only: str | None = None) -> list[psutil.Process]:
    head = next(node for node in state["nodes"] if node["role"] == "head")
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        try:
            if os.getsid(process.pid) != head["pid"]:
                continue
        except OSError:
            continue
        if only is None or only in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


def _kill(victims: list[psutil.Process]) -> None:
    for process in victims:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.Error:
            continue


def _measure_kill(cluster: _Cluster, only: str | None, by_hand: bool) -> dict[str, float]:
    url = f"http://127.0.0.1:{cluster.port}/v1/models/digits:predict"
    with _Load(url) as load:
        time.sleep(3)
        victims = _head_processes(cluster.state(), only)
        if not victims:
            raise RuntimeError(f"no head process matches {only!r}")
        killed_at = time.monotonic()
        _kill(victims)
        if by_hand:
            psutil.wait_procs(victims, timeout=10)
            cluster.cli("aiaas", "cluster", "up", str(cluster.config))
            cluster.deploy()
        whole_at = None
        deadline = killed_at + LIMIT_S - 10
        while time.monotonic() < deadline:
            if whole_at is None and cluster.whole():
                whole_at = time.monotonic()
            if whole_at is not None and load.steady_since(whole_at):
                break
            time.sleep(0.5)
        figures = load.figures(killed_at)
    figures["whole_s"] = (whole_at or time.monotonic()) - killed_at
    figures["processes"] = float(len(victims))
    print(f"  kill {only or 'the head'} ({'by hand' if by_hand else 'supervised'}): {figures}")
    return figures


def run() -> list[dict[str, Any]]:
    directory = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    figures: dict[str, dict[str, float]] = {}
    try:
        for name, fault_tolerance in (("faults-ft", True), ("faults-plain", False)):
            cluster = _Cluster(directory / name, name, fault_tolerance)
            try:
                cluster.up()
                if fault_tolerance:
                    figures["ingress"] = _measure_kill(cluster, "haproxy", by_hand=False)
                    time.sleep(5)
                    figures["head"] = _measure_kill(cluster, None, by_hand=False)
                else:
                    figures["reference"] = _measure_kill(cluster, None, by_hand=True)
            finally:
                cluster.down()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    head, ref, ingress = figures["head"], figures["reference"], figures["ingress"]
    by_hand = "no fault tolerance, recovered by hand at once"
    return [
        serving._row(
            "head killed: requests failed", head["failed"], ref["failed"], by_hand, "", None
        ),
        serving._row(
            "head killed: seconds until answers are back to 100%",
            head["back_s"],
            ref["back_s"],
            by_hand,
            "s",
            None,
        ),
        serving._row(
            "head killed: seconds until the cluster is whole",
            head["whole_s"],
            ref["whole_s"],
            by_hand,
            "s",
            None,
        ),
        serving._row(
            "head killed: seconds until the first failure",
            head["first_failure_s"],
            ref["first_failure_s"],
            by_hand,
            "s",
            None,
        ),
        serving._row(
            "head's ingress killed: requests failed",
            ingress["failed"],
            head["failed"],
            "the head killed, same run",
            "",
            None,
        ),
        serving._row(
            "head's ingress killed: seconds until answers are back to 100%",
            ingress["back_s"],
            head["back_s"],
            "the head killed, same run",
            "s",
            None,
        ),
    ]


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for row in run():
        print(row)
