"""Helpers the integration and end-to-end tests share: CLI runs, free ports, test cluster configs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def env(ray_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for CLI subprocesses: the virtualenv first, no inherited Ray address or
    token; ``ray_env`` is a cluster's auth settings (:func:`cluster_ray_env`) for Ray's own CLIs
    and drivers (the ``aiaas`` CLI finds them itself from ``--cluster``)."""
    result = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")
    }
    result["PATH"] = f"{BIN}{os.pathsep}{result.get('PATH', '')}"
    result["RAY_AUTH_MODE"] = "disabled"
    result["RAY_USAGE_STATS_ENABLED"] = "0"
    result.update(ray_env or {})
    return result


def run(
    *args: str, timeout: float = 300, cwd: Path = REPO, ray_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command from the virtualenv's bin dir (e.g. ``aiaas``, ``ray``) and capture its output."""
    command = [str(BIN / args[0]), *args[1:]]
    return subprocess.run(
        command,
        cwd=cwd,
        env=env(ray_env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def cluster_ray_env(config_path: Path) -> dict[str, str]:
    """What Ray's own CLIs and drivers need to authenticate to the cluster of ``config_path``:
    the same settings ``aiaas cluster env`` prints."""
    from aiaas import ray_auth
    from aiaas.config import loader
    from aiaas.config.cluster import ClusterConfig

    return ray_auth.process_env(loader.load(config_path, ClusterConfig))


def cluster_headers(config_path: Path) -> dict[str, str]:
    """The dashboard REST API's ``Authorization`` header for that cluster."""
    from aiaas import ray_auth
    from aiaas.config import loader
    from aiaas.config.cluster import ClusterConfig

    return ray_auth.headers(loader.load(config_path, ClusterConfig))


def free_ports(count: int) -> list[int]:
    """Distinct ports that are free right now."""
    sockets = []
    try:
        for _ in range(count):
            probe = socket.socket()
            # The wildcard address: Ray's servers listen on the machine's own address too.
            probe.bind(("0.0.0.0", 0))
            sockets.append(probe)
        return [int(probe.getsockname()[1]) for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


def write_cluster_config(directory: Path, name: str, workers: int, **overrides: Any) -> Path:
    """A small cluster config with its own ports, storage root and (short) temp root."""
    (
        gcs,
        dashboard,
        client,
        metrics,
        mlflow,
        prometheus,
        stats,
        hap_metrics,
        fallback,
        grpc,
        redis,
    ) = free_ports(11)
    config: dict[str, Any] = {
        "kind": "cluster",
        "name": name,
        "storage_root": str(directory / "storage"),
        # Ray's socket paths must stay short, so not under pytest's long tmp_path.
        "temp_root": tempfile.mkdtemp(prefix="a", dir="/tmp"),
        "head": {"num_cpus": 1, "memory": "1GiB", "object_store_memory": "100MiB"},
        "worker_groups": [
            {
                "name": "cpu",
                "replicas": workers,
                "num_cpus": 1,
                "memory": "1GiB",
                "object_store_memory": "100MiB",
                "resources": {"edge": 1},
                "labels": {"zone": "a"},
            }
        ]
        if workers
        else [],
        "ports": {
            "gcs": gcs,
            "dashboard": dashboard,
            "client_server": client,
            "metrics_export": metrics,
            "prometheus": prometheus,
            "haproxy_stats": stats,
            "haproxy_metrics": hap_metrics,
            "serve_fallback_http": fallback,
            "serve_fallback_grpc": grpc,
            "redis": redis,
        },
        "mlflow": {"port": mlflow},
        "env": {
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
            # Behind HAProxy a stopping replica stays reachable this long (Ray's default: 30 s,
            # for load balancers to deregister it) before it refuses connections, which HAProxy
            # retries elsewhere: on one machine 3 s is plenty, and every delete, downscale and
            # replaced replica of the suite waited the 30 s.
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "3",
            "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
            "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
        },
    }
    config.update(overrides)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def processes_under(temp_root: str) -> list[str]:
    """Command lines of live processes that work in ``temp_root`` (i.e. belong to that cluster)."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        try:
            if process.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(process.info["cmdline"] or [])
        except psutil.Error:
            continue
        if temp_root in cmdline:
            found.append(f"{process.pid}: {cmdline[:200]}")
    return found


def ray_nodes(gcs_address: str, ray_env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """``ray.nodes()`` as seen by a driver that joins the cluster (in its own process)."""
    import json

    probe = (
        "import json, ray\n"
        f"ray.init(address={gcs_address!r}, logging_level='ERROR')\n"
        "print(json.dumps(ray.nodes()))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        env=env(ray_env),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    nodes: list[dict[str, Any]] = json.loads(result.stdout.strip().splitlines()[-1])
    return nodes


def ray_job_submit(
    dashboard_url: str, *entrypoint: str, ray_env: dict[str, str], timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Ray's own ``ray job submit --working-dir .`` from the repository root, waiting for the end."""
    return run(
        "ray",
        "job",
        "submit",
        "--address",
        dashboard_url,
        "--working-dir",
        ".",
        "--",
        *entrypoint,
        timeout=timeout,
        ray_env=ray_env,
    )
