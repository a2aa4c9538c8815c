"""Where and with what environment the cluster's processes run."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import urlparse

from aiaas import ray_auth, settings
from aiaas.config.cluster import ClusterConfig

#: What a node (and so every job, replica and actor it starts) takes from the operator's
#: environment: what processes need to run, never the operator's other secrets. Anything else
#: a cluster needs goes in the cluster config's ``env:``.
_INHERITED = frozenset(
    {
        "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM",
        # Older OpenBLAS builds compute wrong results on some processors without these.
        "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
        "OMP_NUM_THREADS", "MKL_NUM_THREADS",
        "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "CUDA_HOME",
        "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
    }
)  # fmt: skip
_INHERITED_PREFIXES = ("LC_", "AIAAS_", "NVIDIA_")
#: Credentials an object-store storage root needs on every node (pyarrow's S3/GCS clients).
_STORAGE_CREDENTIALS = {
    "s3": ("AWS_",),
    "gs": ("GOOGLE_", "GCLOUD_", "CLOUDSDK_"),
}


#: Ray's polling that an idle cluster pays for and a user sees no more of (BENCHMARKS.md, "Fast
#: as shipped"): defaults, which the cluster config's ``env:`` overrides. Measured on the shipped
#: cluster with the demo's apps, idle: 0.44 of the machine's 2 cores before, 0.30 with these.
QUIET_ENV = {
    # Serve's controller loop runs 10 times a second; every deploy, health check and autoscaling
    # decision still acts within half a second (replicas report load every 0.5 s).
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    # Replicas hand their cached request metrics to Ray's every 100 ms; Ray exports every 10 s.
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
    # Each node's agent walks every process (psutil) every 5 s for the dashboard's node view.
    "REPORTER_UPDATE_INTERVAL_MS": "10000",
    # Each node's log monitor globs its log directory 10 times a second while it holds under
    # 1,000 files; with the threshold at 0 it looks for new files once a second (and still
    # reads every open file's new lines as they come).
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    "LOG_NAME_UPDATE_INTERVAL_S": "1",
    # Each node's agent checks 2.5 times a second that its raylet lives (it exits after 5 s).
    "RAY_DASHBOARD_AGENT_CHECK_PARENT_INTERVAL_S": "1",
}


def inherited(config: ClusterConfig, environ: dict[str, str]) -> dict[str, str]:
    """The part of ``environ`` a node of this cluster takes (an allow-list)."""
    prefixes = _INHERITED_PREFIXES + _STORAGE_CREDENTIALS.get(
        urlparse(config.storage_root).scheme, ()
    )
    return {
        key: value
        for key, value in environ.items()
        if key in _INHERITED or key.startswith(prefixes)
    }


def node_env(config: ClusterConfig) -> dict[str, str]:
    """The environment of every Ray process of the cluster."""
    env = inherited(config, dict(os.environ))
    env["PATH"] = f"{venv_bin()}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray code that finds "the" cluster by itself (the state API, e.g. Ray Train's placement
    # group cleaner) fails when several clusters run on one machine: name ours.
    env["RAY_ADDRESS"] = f"127.0.0.1:{config.ports.gcs}"
    # The same mode in every process, and the token by path: never in an environment.
    env.update(ray_auth.process_env(config))
    env[settings.STORAGE_ROOT] = config.storage_root
    env[settings.CLUSTER_NAME] = config.name
    # Model artifacts downloaded by replicas and jobs: kept with the cluster's temp files.
    env[settings.MODEL_CACHE] = str(cluster_dir(config) / "models")
    # Models come from the registry, never from the Hugging Face hub (no internet either).
    env.setdefault("HF_HUB_OFFLINE", "1")
    mlflow_url = config.mlflow_url()
    if mlflow_url:
        env["MLFLOW_TRACKING_URI"] = mlflow_url
    # The Ray dashboard's metrics view reads these: our Prometheus, and the user's Grafana when
    # one is configured (its embedded panels are Ray's dashboards provisioned there).
    env["RAY_PROMETHEUS_HOST"] = config.prometheus_url()
    env["RAY_PROMETHEUS_NAME"] = config.grafana.datasource
    if config.grafana.url:
        env["RAY_GRAFANA_HOST"] = config.grafana.url
        env["RAY_GRAFANA_IFRAME_HOST"] = config.grafana.iframe_url or config.grafana.url
    if config.serve_ingress == "haproxy":
        env.update(haproxy_env(config))
    if config.gcs_fault_tolerance.enabled:
        # Raylets, workers and drivers wait this long for a restarted GCS instead of exiting.
        timeout = config.gcs_fault_tolerance.reconnect_timeout_s
        env["RAY_gcs_rpc_server_reconnect_timeout_s"] = str(int(timeout))
    env.update(QUIET_ENV)
    env.update(config.env)
    return env


def haproxy_env(config: ClusterConfig) -> dict[str, str]:
    """Serve's HAProxy ingress, with this cluster's own files and ports.

    Ray's defaults put HAProxy's config, admin socket and state under one fixed /tmp directory
    and its stats/metrics on fixed ports, so two clusters on a machine would share them.
    """
    files = haproxy_dir(config)
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        # Serve's request path without its thread hops and per-request log flushes; it only
        # pays off once HAProxy, not the Python proxy, is what clients talk to (BENCHMARKS.md).
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        # A replica that refuses a connection is gone (they listen on this machine): mark it
        # down at once so the retry goes to a live one, not to it twice more (Ray's default 3).
        "RAY_SERVE_HAPROXY_OBSERVE_ERROR_LIMIT": "1",
        # The controller finds a dead HAProxy after 3 failed proxy health checks: every 10 s by
        # default, so 29 s without an ingress (bench/faults.py); every 2 s, about 6 s.
        "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": "2",
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(venv_bin() / "aiaas-haproxy"),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(files / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(files / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(files),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(files / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(files / "metrics.sock"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(config.ports.haproxy_stats),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(config.ports.haproxy_metrics),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(config.ports.serve_fallback_http),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(config.ports.serve_fallback_grpc),
        # Ray's default log target is a syslog port that nothing here listens on: a datagram
        # and an ICMP error per request for a log nobody reads. aiaas-haproxy drops it if unset.
        settings.HAPROXY_ACCESS_LOG: "1" if config.haproxy_access_log else "0",
        **haproxy_settings_env(config),
    }


def haproxy_settings_env(config: ClusterConfig) -> dict[str, str]:
    """The cluster config's HAProxy settings as Serve reads them (here and in rendered clusters)."""
    return {
        "RAY_SERVE_HAPROXY_RETRY_ON": config.haproxy_retry_on,
        "RAY_SERVE_HAPROXY_METRICS_ENABLED": "1" if config.haproxy_request_metrics else "0",
        **(
            {"RAY_SERVE_HAPROXY_LOG_TARGET": config.haproxy_access_log}
            if config.haproxy_access_log
            else {}
        ),
    }


def cluster_dir(config: ClusterConfig) -> Path:
    """The parent of every node's temp dir."""
    return Path(config.temp_root).expanduser() / f"{config.name}-{config.ports.gcs}"


#: HAProxy refuses unix socket paths over 97 characters; Serve puts each node's sockets in a
#: 56-character subdirectory of the directory we name.
HAPROXY_SOCKET_PATH_MAX = 97
HAPROXY_SOCKET_SUFFIX = 1 + 56 + len("/metrics.sock")


def haproxy_dir(config: ClusterConfig) -> Path:
    """Serve's HAProxy files: kept short, beside (not in) the cluster dir, for the socket paths."""
    return Path(config.temp_root).expanduser() / f"hap-{config.ports.gcs}"


def venv_bin() -> Path:
    """The project's virtualenv bin dir (``ray``, ``mlflow``, ``python``), put first on PATH."""
    return Path(sys.executable).parent
