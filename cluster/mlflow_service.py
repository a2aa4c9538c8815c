"""The MLflow tracking server and model registry that `cluster up` starts beside Ray."""

from __future__ import annotations

from aiaas import registry
from aiaas.config.cluster import ClusterConfig
from aiaas.storage import Storage
from cluster import environment, processes, state


def start(config: ClusterConfig) -> state.NodeRecord:
    """Start ``mlflow server`` on 127.0.0.1 in a session of its own; returns its record."""
    artifacts = Storage(config.storage_root).path(*registry.ARTIFACT_STORE)
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
    processes.wait_answering(
        service.name,
        service.pid,
        service.create_time,
        f"{service.url}/health",
        service.log_path,
        deadline,
        "Raise 'startup_timeout_s' in the cluster config if this machine is slow.",
    )
