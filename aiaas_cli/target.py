"""Which cluster a command talks to: the cluster config names its addresses and storage root."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from aiaas import ray_auth
from aiaas.config import loader
from aiaas.config.cluster import ClusterConfig

DEFAULT_CLUSTER = Path("configs/cluster/local.yaml")


def cluster_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--cluster CONFIG``: the cluster config (default configs/cluster/local.yaml)."""
    return click.option(
        "--cluster",
        "cluster_path",
        type=click.Path(path_type=Path),
        default=DEFAULT_CLUSTER,
        show_default=True,
        help="Cluster config naming the Jobs API address, MLflow URL and storage root.",
    )(func)


def load_cluster(path: Path) -> ClusterConfig:
    """Load and validate the cluster config, and make this process use the cluster's Ray auth
    (mode and token file) for every Ray client it creates from here on."""
    config = loader.load(path, ClusterConfig)
    ray_auth.use(config)
    return config


def registry_uri(cluster: ClusterConfig) -> str:
    """The cluster's MLflow registry URL, checked to answer, set for this process.

    Raises:
        ClusterError: MLflow is disabled in the cluster config or not answering.
    """
    import os

    import httpx

    from aiaas import errors

    url = cluster.mlflow_url()
    if url is None:
        raise errors.ClusterError(
            f"the cluster '{cluster.name}' has MLflow disabled, so it has no model registry",
            "Set mlflow.enabled: true in the cluster config and run 'aiaas cluster up'.",
        )
    try:
        healthy = httpx.get(f"{url}/health", timeout=5, trust_env=False).status_code == 200
    except httpx.HTTPError:
        healthy = False
    if not healthy:
        raise errors.ClusterError(
            f"the model registry (MLflow) at {url} is not answering",
            "Start the cluster (it starts MLflow): aiaas cluster up",
        )
    os.environ["MLFLOW_TRACKING_URI"] = url
    # A command must fail fast, not retry a refused connection for minutes (MLflow's default).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    return url
