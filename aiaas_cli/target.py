"""Which cluster and registry a command talks to: the cluster config names its addresses and
storage root."""

from __future__ import annotations

from pathlib import Path

from aiaas import ray_auth
from aiaas.config import loader
from aiaas.config.cluster import ClusterConfig


def load_cluster(path: Path) -> ClusterConfig:
    """Load and validate the cluster config, and make this process use the cluster's Ray auth
    (mode and token file) for every Ray client it creates from here on."""
    config = loader.load(path, ClusterConfig)
    ray_auth.use(config)
    return config


def use_registry(cluster: ClusterConfig) -> str:
    """Check the cluster's MLflow registry answers and point this process's MLflow at it.

    For commands that talk to MLflow in-process (the registry read and write functions of
    :mod:`aiaas` that take no URL read ``MLFLOW_TRACKING_URI``).

    Returns:
        The registry's URL.

    Raises:
        ClusterError: MLflow is disabled in the cluster config or not answering.
    """
    from aiaas import registry

    url = registry.server_url(cluster)
    registry.use_server(url)
    return url
