"""``kind: cluster`` — the embedded multi-node Ray cluster and how it renders for bigger ones.

The same file describes a head node and groups of worker nodes. ``aiaas cluster up`` starts them
as separate ``ray start`` processes on this machine; ``aiaas cluster render`` turns the same
description into a ``ray up`` cluster YAML or a KubeRay ``RayCluster`` manifest.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import (
    ByteSize,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    field_validator,
    model_validator,
)

from aiaas.config.base import ConfigModel, Name, Port
from aiaas.config.deploy import DeploySpec

#: Ray's plasma store refuses less than 75 MiB.
_MIN_OBJECT_STORE = 75 * 1024 * 1024
_RESERVED_RESOURCES = {
    "CPU": "num_cpus",
    "GPU": "num_gpus",
    "memory": "memory",
    "object_store_memory": "object_store_memory",
}
_STORAGE_SCHEMES = ("file", "s3", "gs")
# Kubernetes label syntax, which Ray enforces for node labels.
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = re.compile(rf"^([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_LABEL_NAME}$")
_LABEL_VALUE = re.compile(rf"^({_LABEL_NAME})?$")


class NodeSpec(ConfigModel):
    """Resources of one Ray node; what ``ray start`` is told the node has."""

    num_cpus: NonNegativeInt = Field(
        description="logical CPUs Ray may schedule on the node (may exceed the cores: they are "
        "scheduling slots, not cores)"
    )
    num_gpus: NonNegativeInt = Field(0, description="GPUs on the node; 0 on CPU-only machines")
    memory: ByteSize = Field(
        description="memory Ray may schedule for tasks and actors, e.g. '4GiB'; set it, or every "
        "node on one machine claims all of the machine's RAM"
    )
    object_store_memory: ByteSize = Field(
        description="shared-memory object store size, e.g. '512MiB' (at least 75MiB)"
    )
    resources: dict[str, NonNegativeFloat] = Field(
        default_factory=dict,
        description="custom resources, e.g. {accelerator_slot: 1}; select nodes with them in "
        "train/serve configs",
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="node labels for label-based scheduling"
    )

    @field_validator("object_store_memory")
    @classmethod
    def _object_store_large_enough(cls, value: ByteSize) -> ByteSize:
        if value < _MIN_OBJECT_STORE:
            raise ValueError(
                f"{value.human_readable()} is below Ray's minimum object store of 75MiB; "
                "set at least '75MiB'"
            )
        return value

    @field_validator("resources")
    @classmethod
    def _no_builtin_resources(cls, value: dict[str, float]) -> dict[str, float]:
        for name in value:
            if name in _RESERVED_RESOURCES:
                raise ValueError(
                    f"'{name}' is a built-in Ray resource; set it with the node's "
                    f"'{_RESERVED_RESOURCES[name]}' field instead of under 'resources'"
                )
        return value

    @field_validator("labels")
    @classmethod
    def _kubernetes_label_syntax(cls, value: dict[str, str]) -> dict[str, str]:
        for key, label in value.items():
            if not _LABEL_KEY.match(key):
                raise ValueError(
                    f"label key '{key}' is not a valid Kubernetes label key (letters, digits, "
                    "'-', '_', '.', at most 63 characters, optional 'prefix/')"
                )
            if not _LABEL_VALUE.match(label):
                raise ValueError(
                    f"label value '{label}' of '{key}' is not a valid Kubernetes label value "
                    "(letters, digits, '-', '_', '.', at most 63 characters)"
                )
        return value


class HeadSpec(NodeSpec):
    """The head node: GCS, dashboard, Jobs API. It also runs tasks unless ``num_cpus`` is 0."""


class WorkerGroup(NodeSpec):
    """A group of identical worker nodes."""

    name: Name = Field(description="group name; node i is called '<name>-<i>'")
    replicas: NonNegativeInt = Field(1, description="worker nodes started by 'aiaas cluster up'")
    max_replicas: NonNegativeInt | None = Field(
        None,
        description="upper bound for the autoscaler in rendered ray-up/KubeRay clusters; "
        "defaults to 'replicas'",
    )

    @model_validator(mode="after")
    def _max_not_below_replicas(self) -> WorkerGroup:
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) is below replicas ({self.replicas}); "
                "raise max_replicas or lower replicas"
            )
        return self

    @property
    def autoscale_max(self) -> int:
        """The largest number of nodes the group may grow to."""
        return self.replicas if self.max_replicas is None else self.max_replicas


class HeadPorts(ConfigModel):
    """Fixed ports of the head node. Worker ports are picked free at start and recorded."""

    gcs: Port = Field(6379, description="GCS port; workers and drivers join the cluster here")
    dashboard: Port = Field(8265, description="Ray dashboard and Jobs API")
    client_server: Port = Field(10001, description="Ray Client server (ray://)")
    metrics_export: Port = Field(
        8090, description="the head's Prometheus metrics endpoint (Ray exports on all interfaces)"
    )
    prometheus: Port = Field(
        9090, description="the Prometheus that 'aiaas monitor up' starts on 127.0.0.1"
    )
    haproxy_stats: Port = Field(
        8404, description="stats page of Serve's HAProxy (serve_ingress: haproxy), on 127.0.0.1"
    )
    haproxy_metrics: Port = Field(
        9101,
        description="Prometheus endpoint of Serve's HAProxy (serve_ingress: haproxy), on 127.0.0.1",
    )
    serve_fallback_http: Port = Field(
        8500,
        description="HTTP port of the Serve proxy HAProxy falls back to while an app has no "
        "ready replica (serve_ingress: haproxy)",
    )
    serve_fallback_grpc: Port = Field(
        9500, description="gRPC port of that fallback proxy (serve_ingress: haproxy)"
    )
    redis: Port = Field(
        6380,
        description="the Redis that keeps the GCS's state (gcs_fault_tolerance), on 127.0.0.1",
    )

    @model_validator(mode="after")
    def _distinct(self) -> HeadPorts:
        seen: dict[int, str] = {}
        for field_name in type(self).model_fields:
            port = getattr(self, field_name)
            if port in seen:
                raise ValueError(
                    f"'{field_name}' and '{seen[port]}' both use port {port}; "
                    "give each its own port"
                )
            seen[port] = field_name
        return self


class MlflowSpec(ConfigModel):
    """The MLflow tracking server and model registry that ``cluster up`` starts beside Ray."""

    enabled: bool = Field(True, description="start an MLflow server with the cluster")
    port: Port = Field(5000, description="port of the MLflow server on 127.0.0.1")
    backend_store_uri: str | None = Field(
        None,
        description="runs and registry database; defaults to SQLite under a local storage root "
        "(a remote storage root needs e.g. postgresql://...)",
    )


class GcsFaultTolerance(ConfigModel):
    """Ray's GCS fault tolerance: the GCS writes its tables to Redis, so a restarted head finds
    the cluster's nodes, jobs, actors and Serve apps where it left them."""

    enabled: bool = Field(
        True,
        description="keep the GCS's state in Redis; 'cluster up' starts Debian's redis-server on "
        "127.0.0.1 with a password (its data under the storage root) and a supervisor that "
        "restarts lost nodes and services; false: a dead head forgets the cluster",
    )
    redis_address: str | None = Field(
        None,
        description="an external Redis (host:port) for rendered clusters (ray up / KubeRay); "
        "the local cluster always starts its own",
    )
    reconnect_timeout_s: PositiveFloat = Field(
        120,
        description="how long worker nodes (raylets) and drivers wait for a restarted GCS before "
        "they give up (Ray's RAY_gcs_rpc_server_reconnect_timeout_s, default 60)",
    )
    supervise_interval_s: PositiveFloat = Field(
        1.0, description="how often the supervisor checks the cluster's processes"
    )

    @field_validator("redis_address")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+:\d{1,5}", value):
            raise ValueError(f"'{value}' is not host:port; write e.g. redis.internal:6379")
        return value


class GrafanaSpec(ConfigModel):
    """A Grafana of the user's (none installs here) that the Ray dashboard embeds panels from."""

    url: str | None = Field(
        None,
        description="Grafana's address as the dashboard server reaches it, e.g. "
        "http://127.0.0.1:3000; unset: the Ray dashboard shows no Grafana panels",
    )
    iframe_url: str | None = Field(
        None, description="Grafana's address as browsers reach it, when it differs from 'url'"
    )
    datasource: str = Field(
        "Prometheus", description="name of the Prometheus data source in that Grafana"
    )

    @field_validator("url", "iframe_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and urlparse(value).scheme not in ("http", "https"):
            raise ValueError(f"'{value}' is not an http(s) URL; write e.g. http://127.0.0.1:3000")
        return value.rstrip("/") if value else value


#: HAProxy 2.8's retry-on keywords and the statuses it may retry on.
_RETRY_ON = (
    "none",
    "conn-failure",
    "empty-response",
    "junk-response",
    "response-timeout",
    "0rtt-rejected",
    "all-retryable-errors",
    *("401", "403", "404", "408", "425", "500", "501", "502", "503", "504"),
)


class ClusterConfig(ConfigModel):
    """A Ray cluster: one head, groups of workers, where data lives, which ports it uses."""

    kind: Literal["cluster"] = Field(description="always 'cluster'")
    name: Name = Field("local", description="cluster name; keys its state and temp dirs")
    storage_root: str = Field(
        "~/.aiaas",
        description="where checkpoints, data sets, job records and the registry live: a local "
        "directory, or an s3:// / gs:// URI for clusters of several machines",
    )
    temp_root: str = Field(
        "/tmp/aiaas",
        description="parent of each node's Ray temp dir; keep it short (Ray's socket paths "
        "must stay under 107 characters)",
    )
    dashboard_host: str = Field(
        "127.0.0.1", description="address the dashboard and Jobs API bind; keep loopback locally"
    )
    auth_mode: Literal["disabled", "token"] = Field(
        "token",
        description="Ray's RAY_AUTH_MODE, the same in every process of the cluster. 'token' "
        "(the default): 'cluster up' makes a random token (a 0600 file under the storage root) "
        "and nothing that runs code answers without it; 'disabled' leaves the GCS, raylets, "
        "dashboard agents and Ray Client open to anyone who reaches this machine's address",
    )
    head: HeadSpec = Field(description="the head node")
    worker_groups: list[WorkerGroup] = Field(
        default_factory=list, description="groups of worker nodes"
    )
    ports: HeadPorts = Field(default_factory=HeadPorts, description="fixed ports of the head")
    mlflow: MlflowSpec = Field(default_factory=MlflowSpec, description="the tracking server")
    gcs_fault_tolerance: GcsFaultTolerance = Field(
        default_factory=GcsFaultTolerance,
        description="survive the head node: the GCS's state in Redis, lost processes restarted",
    )
    grafana: GrafanaSpec = Field(
        default_factory=GrafanaSpec, description="the Grafana the Ray dashboard embeds"
    )
    serve_ingress: Literal["haproxy", "proxy"] = Field(
        "haproxy",
        description="how HTTP reaches Serve's replicas: 'haproxy' (Ray's HAProxy in front of "
        "each ingress replica's own HTTP port; every listener on 127.0.0.1 here) or 'proxy' "
        "(Serve's Python proxy actor)",
    )
    haproxy_request_metrics: bool = Field(
        False,
        description="with serve_ingress: haproxy, take Serve's HTTP ingress metrics "
        "(ray_serve_num_http_requests, ...) from HAProxy's per-request log lines, which a "
        "Python actor parses (~15% of throughput on 2 cores), instead of from the ingress "
        "replicas, which record them by default; only HAProxy's view counts the requests it "
        "answers itself (unknown routes, no replica ready)",
    )
    haproxy_retry_on: str = Field(
        "conn-failure empty-response",
        description="with serve_ingress: haproxy, HAProxy's retry-on: which failures it replays "
        "on another replica. 'empty-response' replays a request whose replica died before "
        "answering (a killed replica then fails few requests or none); it suits aiaas's apps, "
        "whose requests are idempotent inference. Ray's default is 'conn-failure' only",
    )
    haproxy_access_log: str | None = Field(
        None,
        description="with serve_ingress: haproxy, where HAProxy sends its per-request access "
        "log (a syslog address such as 127.0.0.1:514 or a unix socket such as /dev/log); "
        "unset: no access log",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="environment variables for every Ray process of the cluster",
    )
    startup_timeout_s: PositiveFloat = Field(
        90, description="how long 'cluster up' waits for every node to be alive"
    )
    deploy: DeploySpec = Field(
        default_factory=DeploySpec, description="how 'cluster render' targets ray up / KubeRay"
    )

    @field_validator("env")
    @classmethod
    def _no_auth_settings(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if key.startswith("RAY_AUTH_"):
                raise ValueError(
                    f"'{key}' is set by aiaas from 'auth_mode' (the same in every process, the "
                    "token by file); remove it from 'env' and set 'auth_mode' instead"
                )
        return value

    @field_validator("haproxy_retry_on")
    @classmethod
    def _haproxy_retry_keywords(cls, value: str) -> str:
        unknown = [word for word in value.split() if word not in _RETRY_ON]
        if unknown or not value.split():
            raise ValueError(
                f"'{' '.join(unknown) or value}' is not an HAProxy retry-on keyword; use "
                f"space-separated words from: {', '.join(_RETRY_ON)}"
            )
        return value

    @field_validator("storage_root")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme = urlparse(value).scheme
        if scheme and len(scheme) > 1 and scheme not in _STORAGE_SCHEMES:
            raise ValueError(
                f"scheme '{scheme}://' is not supported; use a local path, file://, s3:// or gs://"
            )
        return value

    @model_validator(mode="after")
    def _unique_group_names(self) -> ClusterConfig:
        names = [group.name for group in self.worker_groups]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(
                f"worker group name(s) {', '.join(duplicates)} used more than once; "
                "give every group its own name"
            )
        if "head" in names:
            raise ValueError("'head' is the head node's name; call the worker group something else")
        if self.mlflow.port in self.ports.model_dump().values():
            raise ValueError(
                f"mlflow.port {self.mlflow.port} is also a head port; give MLflow its own port"
            )
        remote = urlparse(self.storage_root).scheme in ("s3", "gs")
        if self.mlflow.enabled and remote and self.mlflow.backend_store_uri is None:
            raise ValueError(
                "a remote storage_root needs mlflow.backend_store_uri (e.g. postgresql://...): "
                "SQLite cannot live in an object store"
            )
        return self

    @property
    def node_count(self) -> int:
        """Nodes ``cluster up`` starts: the head plus every worker replica."""
        return 1 + sum(group.replicas for group in self.worker_groups)

    def local_storage_root(self) -> Path | None:
        """The storage root as a local absolute path, or None when it is a remote URI."""
        parsed = urlparse(self.storage_root)
        if parsed.scheme in ("s3", "gs"):
            return None
        raw = parsed.path if parsed.scheme == "file" else self.storage_root
        return Path(os.path.expanduser(raw)).resolve()

    def mlflow_url(self) -> str | None:
        """The MLflow tracking URI every job and command uses, or None when disabled."""
        return f"http://127.0.0.1:{self.mlflow.port}" if self.mlflow.enabled else None

    def mlflow_backend_uri(self) -> str:
        """Where the MLflow server keeps runs and the registry."""
        if self.mlflow.backend_store_uri:
            return self.mlflow.backend_store_uri
        root = self.local_storage_root()
        return f"sqlite:///{root}/mlflow/mlflow.db"

    def prometheus_url(self) -> str:
        """Where ``aiaas monitor up`` serves Prometheus."""
        return f"http://127.0.0.1:{self.ports.prometheus}"

    def dashboard_url(self) -> str:
        """The HTTP address of the dashboard and Jobs API."""
        return f"http://{self.dashboard_host}:{self.ports.dashboard}"
