"""``aiaas cluster status``: nodes, resources, running jobs and Serve apps of a running cluster."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiaas import errors
from aiaas.config.cluster import ClusterConfig
from aiaas.dashboard import Dashboard
from cluster import processes, state

_ACTIVE_JOB_STATES = ("PENDING", "RUNNING")


@dataclass
class ClusterStatus:
    """A snapshot of the cluster as Ray reports it."""

    state: state.ClusterState
    reachable: bool
    nodes: list[dict[str, Any]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    active_jobs: list[dict[str, Any]] = field(default_factory=list)
    job_count: int = 0
    serve_apps: dict[str, Any] = field(default_factory=dict)


def collect(config: ClusterConfig) -> ClusterStatus:
    """Ask Ray for the state of the config's cluster.

    Raises:
        ClusterNotRunningError: Nothing is recorded for this config.
    """
    recorded = state.load(config)
    if recorded is None:
        raise errors.ClusterNotRunningError(
            f"no cluster '{config.name}' is running (nothing recorded under {config.storage_root})",
            "Start it: aiaas cluster up",
        )
    with Dashboard(recorded.dashboard_url, config.auth_mode) as dashboard:
        if not dashboard.reachable():
            return ClusterStatus(state=recorded, reachable=False)
        alive = [node for node in dashboard.nodes() if node["state"] == "ALIVE"]
        names = {node["node_name"] for node in alive}
        missing = [
            node.name
            for node in recorded.nodes
            if node.name not in names or processes.leader(node.pid, node.create_time) is None
        ] + [
            service.name
            for service in recorded.services
            if processes.leader(service.pid, service.create_time) is None
        ]
        jobs = dashboard.jobs()
        return ClusterStatus(
            state=recorded,
            reachable=True,
            nodes=sorted(alive, key=lambda node: (not node.get("is_head_node"), node["node_name"])),
            missing=missing,
            active_jobs=[job for job in jobs if job.get("status") in _ACTIVE_JOB_STATES],
            job_count=len(jobs),
            serve_apps=dashboard.serve_applications(),
        )
