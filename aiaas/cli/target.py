"""Which cluster a command talks to: the cluster config names its addresses and storage root."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

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
    """Load and validate the cluster config."""
    return loader.load(path, ClusterConfig)
