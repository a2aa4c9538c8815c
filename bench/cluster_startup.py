"""Cluster start-up: `aiaas cluster up` (1 head + 2 workers) vs the same nodes by hand with
`ray start`, and the `aiaas` CLI's start-up vs a bare Python interpreter. Median of 3,
alternating runs."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench import report
from cluster import processes
from tests import support

BIN = Path(sys.executable).parent
REPEATS = 3


def _wait_alive(url: str, count: int, headers: dict[str, str]) -> None:
    while True:
        try:
            body = httpx.get(
                f"{url}/api/v0/nodes", params={"limit": 100}, headers=headers, timeout=5
            ).json()
            if sum(n["state"] == "ALIVE" for n in body["data"]["result"]["result"]) >= count:
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.2)


def _aiaas_up(directory: Path) -> float:
    config = support.write_cluster_config(directory, "bench", workers=2)
    started = time.perf_counter()
    up = support.run("aiaas", "cluster", "up", str(config))
    elapsed = time.perf_counter() - started
    support.run("aiaas", "cluster", "down", str(config))
    if up.returncode != 0:
        raise RuntimeError(up.stderr)
    return elapsed


def _by_hand(directory: Path) -> float:
    """What a user does without aiaas: ray start the head, then each worker, one by one."""
    gcs, dashboard, client = support.free_ports(3)
    temp = tempfile.mkdtemp(prefix="b", dir="/tmp")
    common = [
        "--num-cpus=1",
        "--memory=1073741824",
        "--object-store-memory=104857600",
        "--disable-usage-stats",
    ]
    head = [
        "--head",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}",
    ]
    nodes = [[*head, f"--temp-dir={temp}/h"]] + [
        [f"--address=127.0.0.1:{gcs}", f"--temp-dir={temp}/w{index}"] for index in range(2)
    ]
    # With token auth, as aiaas starts clusters: the same work on both sides.
    token = Path(temp) / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = support.env({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})
    leaders = []
    started = time.perf_counter()
    for arguments in nodes:
        # Without --block, `ray start` returns once its node is up: one node after the other.
        leader = subprocess.Popen(
            [str(BIN / "ray"), "start", *arguments, *common],
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        leader.wait()
        leaders.append(leader)
    _wait_alive(
        f"http://127.0.0.1:{dashboard}", 3, {"Authorization": f"Bearer {token.read_text()}"}
    )
    elapsed = time.perf_counter() - started
    _stop_sessions([leader.pid for leader in leaders])
    shutil.rmtree(temp, ignore_errors=True)
    return elapsed


def _stop_sessions(sessions: list[int]) -> None:
    # Plain `ray start` exits after forking its daemons, so every member gets the signal.
    members = processes.session_members(sessions)
    for process in members:
        process.terminate()
    _, alive = psutil.wait_procs(members, timeout=10)
    for process in alive:
        process.kill()


def _cli_start(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=support.env(), capture_output=True, check=True)
    return time.perf_counter() - started


def run() -> list[dict[str, Any]]:
    """Measure and return the rows."""
    ours, reference, cli, bare = [], [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(REPEATS):
            directory = Path(scratch) / str(repeat)
            directory.mkdir()
            ours.append(_aiaas_up(directory))
            reference.append(_by_hand(directory))
            cli.append(_cli_start([str(BIN / "aiaas"), "--help"]))
            bare.append(_cli_start([sys.executable, "-c", "import click"]))
    return [
        {
            "figure": "cluster up, 1 head + 2 workers, until all alive",
            "ours": report.median(ours),
            "reference": report.median(reference),
            "reference_name": "ray start by hand",
            "unit": "s",
            "ratio": report.median(ours) / report.median(reference),
            "target": 1.0,
        },
        {
            "figure": "`aiaas --help` start-up",
            "ours": report.median(cli),
            "reference": report.median(bare),
            "reference_name": "python -c 'import click'",
            "unit": "s",
            "ratio": report.median(cli) / report.median(bare),
            "target": 3.0,
        },
    ]
