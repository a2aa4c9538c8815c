"""Where the cluster's Redis is and how to reach it: the store of the GCS's tables (Ray's GCS
fault tolerance) and of aiaas's control-plane lock.

``cluster up`` starts it (cluster/redis_service.py); every process that can read the storage
root can find its address and password here.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from aiaas.config.cluster import ClusterConfig

if TYPE_CHECKING:
    import redis

NAME = "redis"


def data_dir(config: ClusterConfig) -> Path:
    """Where Redis keeps its append-only log and password: with the cluster's other records
    (under ``~/.aiaas`` when the storage root is an object store, which holds no 0600 file)."""
    root = config.local_storage_root() or Path("~/.aiaas").expanduser()
    return root / "clusters" / config.name / NAME


def password_path(config: ClusterConfig) -> Path:
    return data_dir(config) / "password"


def password(config: ClusterConfig) -> str:
    """The password, made once (0600 from the first byte; ``O_EXCL`` so two starts never race)."""
    path = password_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(24))
        handle.flush()
        os.fsync(handle.fileno())
    return path.read_text().strip()


def address(config: ClusterConfig) -> str:
    """host:port of the cluster's Redis."""
    return config.gcs_fault_tolerance.redis_address or f"127.0.0.1:{config.ports.redis}"


def in_use(config: ClusterConfig) -> bool:
    """The cluster keeps its state in a Redis that was started (its password exists)."""
    return config.gcs_fault_tolerance.enabled and password_path(config).exists()


def client(config: ClusterConfig, timeout_s: float = 2.0) -> redis.Redis:
    """A redis-py client of the cluster's Redis."""
    import redis

    host, port = address(config).rsplit(":", 1)
    return redis.Redis(
        host=host,
        port=int(port),
        password=password(config),
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
    )
