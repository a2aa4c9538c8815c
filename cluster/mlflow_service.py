"""The MLflow tracking server and model registry that `cluster up` starts beside Ray."""

from __future__ import annotations

import time
from pathlib import Path

from aiaas import errors
from aiaas.config.cluster import ClusterConfig
from aiaas.storage import Storage
from cluster import environment, processes, state


def start(config: ClusterConfig) -> state.NodeRecord:
    """Start ``mlflow server`` on 127.0.0.1 in a session of its own; returns its record."""
    artifacts = Storage(config.storage_root).path("mlflow", "artifacts")
    root = config.local_storage_root()
    if root is not None:
        (root / "mlflow").mkdir(parents=True, exist_ok=True)
    log_path = environment.cluster_dir(config) / "mlflow.log"
    command = [
        str(environment.venv_bin() / "mlflow"),
        "server",
        "--host=127.0.0.1",
        f"--port={config.mlflow.port}",
        f"--backend-store-uri={config.mlflow_backend_uri()}",
        f"--artifacts-destination={artifacts}",
        # One worker: the registry sees a handful of requests per job, and every worker costs
        # ~150 MB and start-up time on a small machine.
        "--workers=1",
    ]
    env = environment.node_env(config)
    # MLflow's server-side job runner (GenAI evaluation) adds four processes we never use.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    leader = processes.spawn(command, env, log_path)
    return state.NodeRecord(
        name="mlflow",
        role="service",
        group="mlflow",
        pid=leader.pid,
        create_time=leader.create_time(),
        temp_dir=artifacts,
        log_path=str(log_path),
        url=config.mlflow_url(),
    )


def wait_healthy(service: state.NodeRecord, deadline: float) -> None:
    """Wait until the service answers ``/health``; a ClusterError with its log if it dies."""
    import httpx

    while True:
        if processes.leader(service.pid, service.create_time) is None:
            raise errors.ClusterError(
                f"{service.name} exited while starting; the last lines of {service.log_path}:\n"
                f"{processes.log_tail(Path(service.log_path))}"
            )
        try:
            if httpx.get(f"{service.url}/health", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise errors.ClusterError(
                f"timed out waiting for {service.name} at {service.url}; "
                f"its log: {service.log_path}",
                "Raise 'startup_timeout_s' in the cluster config if this machine is slow.",
            )
        time.sleep(0.5)
