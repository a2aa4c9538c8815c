"""What ``cluster up`` started, kept under the storage root so ``status`` and ``down`` find it."""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel

from aiaas.config.cluster import ClusterConfig
from aiaas.storage import Storage


class NodeRecord(BaseModel):
    """One started process tree: a ``ray start`` node or a service such as MLflow.

    ``pid`` is a session leader; ``temp_dir`` appears in the command line of the processes of
    the session, which is how a session whose leader died is still recognised as ours.
    """

    name: str
    role: str  # "head", "worker" or "service"
    group: str
    pid: int
    create_time: float
    temp_dir: str
    log_path: str
    metrics_export_port: int = 0
    agent_port: int = 0
    url: str | None = None
    # How a service is started again as it was (Prometheus, the supervisor), and what of
    # ``url`` answers 200 once it is ready.
    command: list[str] = []
    health_path: str = ""


class ClusterState(BaseModel):
    """The record of a running local cluster."""

    name: str
    config_path: str
    config_hash: str
    started_at: float
    gcs_address: str
    dashboard_url: str
    cluster_dir: str
    nodes: list[NodeRecord]
    services: list[NodeRecord] = []

    def workers(self) -> list[NodeRecord]:
        """The worker nodes, in start order."""
        return [node for node in self.nodes if node.role == "worker"]

    def head(self) -> NodeRecord:
        """The head node."""
        return next(node for node in self.nodes if node.role == "head")


def config_hash(config: ClusterConfig) -> str:
    """A stable hash of the parts of a config that change what runs (not rendering settings)."""
    relevant = config.model_dump(mode="json", exclude={"deploy"})
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _relative(config: ClusterConfig) -> str:
    return f"clusters/{config.name}/state.json"


def load(config: ClusterConfig) -> ClusterState | None:
    """The recorded state of the config's cluster, or None."""
    text = Storage(config.storage_root).read_text(_relative(config))
    return ClusterState.model_validate_json(text) if text else None


def save(config: ClusterConfig, state: ClusterState) -> str:
    """Record the cluster's state; returns where."""
    return Storage(config.storage_root).write_text(
        _relative(config), state.model_dump_json(indent=2)
    )


def forget(config: ClusterConfig) -> None:
    """Remove the record after the cluster stopped."""
    Storage(config.storage_root).delete(_relative(config))
