"""The cluster exporter: a detached Ray actor that turns cluster state into aiaas metrics.

Some state lives in no process that could export it: jobs by kind and status (Ray's job table),
Serve replicas against their autoscaling maximum (the Serve controller's config), and registry
versions and alias moves (MLflow, changed by short CLI commands). The exporter polls those and
publishes them through Ray's metrics API, so the node it runs on exports them with the rest.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from typing import Any

from aiaas import metrics

ACTOR_NAME = "aiaas-exporter"
NAMESPACE = "aiaas"
JOB_KINDS = ("train", "tune", "finetune", "optimize", "other")
JOB_STATUSES = ("PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED")
_ENTRYPOINT_KIND = re.compile(r"-m\s+jobs\.(train|tune|finetune|optimize)\b")

Labels = tuple[str, ...]


def job_kind(job: dict[str, Any]) -> str:
    """A job's aiaas kind: from the metadata aiaas submits with, or the entrypoint of a job
    submitted with ``ray job submit -- python -m jobs.<kind> ...``."""
    kind = (job.get("metadata") or {}).get("aiaas_kind")
    if kind in JOB_KINDS:
        return str(kind)
    found = _ENTRYPOINT_KIND.search(job.get("entrypoint") or "")
    return found.group(1) if found else "other"


def job_counts(jobs: list[dict[str, Any]]) -> dict[Labels, float]:
    """Jobs by (kind, status), every combination present (0 when none) so rules comparing a
    count with its past see the series before the first failure."""
    counts: dict[Labels, float] = {(k, s): 0.0 for k in JOB_KINDS for s in JOB_STATUSES}
    for job in jobs:
        key = (job_kind(job), str(job.get("status", "")))
        if key in counts:
            counts[key] += 1
    return counts


def replica_counts(details: dict[str, Any]) -> tuple[dict[Labels, float], dict[Labels, float]]:
    """Replicas by (application, deployment, state), and the maximum of each autoscaling
    deployment by (application, deployment)."""
    replicas: dict[Labels, float] = {}
    maxima: dict[Labels, float] = {}
    for app_name, app in (details.get("applications") or {}).items():
        for name, deployment in (app.get("deployments") or {}).items():
            states = Counter(
                replica.get("state", "?") for replica in deployment.get("replicas", [])
            )
            replicas[(app_name, name, "RUNNING")] = 0.0
            for replica_state, count in states.items():
                replicas[(app_name, name, replica_state)] = float(count)
            autoscaling = (deployment.get("deployment_config") or {}).get("autoscaling_config")
            if autoscaling and autoscaling.get("max_replicas"):
                maxima[(app_name, name)] = float(autoscaling["max_replicas"])
    return replicas, maxima


def registry_counts(uri: str) -> tuple[dict[Labels, float], dict[Labels, float]]:
    """Versions by (model, ready|incomplete), and alias moves by (model, alias, action)."""
    from aiaas import aliases, registry

    versions: dict[Labels, float] = {}
    moves: dict[Labels, float] = {}
    for name in registry.model_names(uri):
        found = registry.versions(name, uri)
        ready = sum(1 for version in found if version.ready)
        versions[(name, "ready")] = float(ready)
        versions[(name, "incomplete")] = float(len(found) - ready)
        for move in aliases.history(name, uri=uri):
            key = (name, move.alias, move.action)
            moves[key] = moves.get(key, 0.0) + 1
    return versions, moves


class _Published:
    """A gauge that also zeroes the label sets that disappeared since the last poll (a Ray
    gauge otherwise keeps exporting a deleted deployment's last value)."""

    def __init__(self, metric: metrics.Metric) -> None:
        self.labels = metric.labels
        self.gauge = metric.create()
        self.last: set[Labels] = set()

    def publish(self, values: dict[Labels, float]) -> None:
        for key in self.last - set(values):
            self.gauge.set(0.0, tags=dict(zip(self.labels, key, strict=True)))
        for key, value in values.items():
            self.gauge.set(value, tags=dict(zip(self.labels, key, strict=True)))
        self.last = set(values)


class Exporter:
    """The actor's body: two polling threads, one fast (jobs, Serve), one slow (registry)."""

    def __init__(
        self,
        dashboard_url: str,
        auth_mode: str,
        registry_uri: str | None,
        interval_s: float,
        registry_interval_s: float,
    ) -> None:
        self.dashboard_url = dashboard_url
        self.auth_mode = auth_mode
        self.registry_uri = registry_uri
        self.polls = 0
        self.errors = metrics.EXPORTER_ERRORS.create()
        self.jobs = _Published(metrics.JOBS)
        self.replicas = _Published(metrics.SERVE_REPLICAS)
        self.replicas_max = _Published(metrics.SERVE_REPLICAS_MAX)
        self.versions = _Published(metrics.REGISTRY_VERSIONS)
        self.moves = _Published(metrics.REGISTRY_ALIAS_MOVES)
        self._stop = threading.Event()
        self.intervals = {"cluster": interval_s, "registry": registry_interval_s}
        self._threads = [
            threading.Thread(target=self._every, args=("cluster", self._cluster), daemon=True)
        ]
        if registry_uri:
            self._threads.append(
                threading.Thread(target=self._every, args=("registry", self._registry), daemon=True)
            )
        for thread in self._threads:
            thread.start()

    def ping(self) -> int:
        """How many cluster polls ran (a caller waits for the first)."""
        return self.polls

    def stop(self) -> None:
        self._stop.set()

    def set_intervals(self, interval_s: float, registry_interval_s: float) -> None:
        """Apply a changed monitoring config to the running exporter."""
        self.intervals = {"cluster": interval_s, "registry": registry_interval_s}

    def _every(self, which: str, poll: Any) -> None:
        while not self._stop.is_set():
            poll()
            self._stop.wait(self.intervals[which])

    def _cluster(self) -> None:
        from aiaas.dashboard import Dashboard

        with Dashboard(self.dashboard_url, self.auth_mode) as dashboard:
            try:
                self.jobs.publish(job_counts(dashboard.jobs()))
            except Exception:
                self.errors.inc(tags={"source": "jobs"})
            try:
                details = dashboard.serve_details()
                replicas, maxima = replica_counts(details)
                self.replicas.publish(replicas)
                self.replicas_max.publish(maxima)
            except Exception:
                self.errors.inc(tags={"source": "serve"})
        self.polls += 1

    def _registry(self) -> None:
        assert self.registry_uri is not None
        try:
            versions, moves = registry_counts(self.registry_uri)
        except Exception:
            self.errors.inc(tags={"source": "registry"})
            return
        self.versions.publish(versions)
        self.moves.publish(moves)


def ensure_running(
    gcs_address: str,
    dashboard_url: str,
    auth_mode: str,
    registry_uri: str | None,
    interval_s: float,
    registry_interval_s: float,
    timeout_s: float = 60,
) -> None:
    """Start the exporter on the head node unless it runs; wait for its first poll."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    _connect(gcs_address)
    try:
        head = next(node for node in ray.nodes() if node["Alive"] and _is_head(node))
        actor_class = ray.remote(Exporter).options(
            name=ACTOR_NAME,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_restarts=-1,
            # On the head: it lives as long as the cluster, whatever workers come and go.
            scheduling_strategy=NodeAffinitySchedulingStrategy(head["NodeID"], soft=False),
        )
        actor: Any = actor_class.remote(
            dashboard_url, auth_mode, registry_uri, interval_s, registry_interval_s
        )
        # get_if_exists hands back a running exporter as it was made: give it this config's.
        ray.get(actor.set_intervals.remote(interval_s, registry_interval_s), timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while ray.get(actor.ping.remote(), timeout=timeout_s) < 1:
            if time.monotonic() > deadline:
                raise TimeoutError("the exporter made no poll")
            time.sleep(0.2)
    finally:
        ray.shutdown()


def stop(gcs_address: str) -> bool:
    """Kill the exporter actor; False when none ran."""
    import ray

    _connect(gcs_address)
    try:
        try:
            actor = ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
        except ValueError:
            return False
        ray.kill(actor, no_restart=True)
        return True
    finally:
        ray.shutdown()


def _is_head(node: dict[str, Any]) -> bool:
    return any(key == "node:__internal_head__" for key in node.get("Resources", {}))


def _connect(gcs_address: str) -> None:
    import ray

    ray.init(
        address=gcs_address, namespace=NAMESPACE, logging_level=logging.ERROR, log_to_driver=False
    )
