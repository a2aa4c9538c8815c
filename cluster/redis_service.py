"""The Redis that keeps the GCS's tables (Ray's GCS fault tolerance), started beside the head.

Debian's ``redis-server`` on 127.0.0.1 with a random password, appending every write to a log
under the storage root (fsynced every second) so a restarted Redis, too, gives the GCS its state
back. The password lives in a 0600 file; ``redis-server`` reads it from a 0600 config file so it
is on no command line of ours (Ray's own GCS process is told it on its command line; see README).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from aiaas import errors, redis_store
from aiaas.config.cluster import ClusterConfig
from aiaas.redis_store import NAME, address, password
from cluster import environment, processes, state

__all__ = ["NAME", "address", "available", "password", "start", "wait_ready"]


def available() -> str | None:
    """The ``redis-server`` executable, or None."""
    return shutil.which("redis-server")


def start(config: ClusterConfig) -> state.NodeRecord:
    """Start ``redis-server`` in a session of its own; returns its record.

    Raises:
        ClusterError: There is no ``redis-server`` on this machine.
    """
    executable = available()
    if executable is None:
        raise errors.ClusterError(
            "gcs_fault_tolerance is on but there is no redis-server on this machine",
            "Install it (make install does: Debian's redis-server), or set "
            "'gcs_fault_tolerance: {enabled: false}' in the cluster config.",
        )
    where = redis_store.data_dir(config)
    where.mkdir(parents=True, exist_ok=True)
    conf = where / "redis.conf"
    lines = [
        "bind 127.0.0.1",
        f"port {config.ports.redis}",
        "protected-mode yes",
        f"requirepass {password(config)}",
        f"dir {where}",
        "appendonly yes",
        "appendfsync everysec",
        'save ""',
        "daemonize no",
        'logfile ""',
    ]
    descriptor = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    log_path = environment.cluster_dir(config) / "redis.log"
    leader = processes.spawn([executable, str(conf)], dict(os.environ), log_path)
    return state.NodeRecord(
        name=NAME,
        role="service",
        group=NAME,
        pid=leader.pid,
        create_time=leader.create_time(),
        temp_dir=str(where),
        log_path=str(log_path),
        url=f"redis://{address(config)}",
    )


def wait_ready(config: ClusterConfig, service: state.NodeRecord, deadline: float) -> None:
    """Wait until Redis answers PING; a ClusterError with its log if it exits first."""
    import redis

    with redis_store.client(config) as connection:
        while True:
            if processes.leader(service.pid, service.create_time) is None:
                raise errors.ClusterError(
                    f"redis-server exited while starting; the last lines of "
                    f"{service.log_path}:\n{processes.log_tail(Path(service.log_path))}"
                )
            try:
                if connection.ping():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise errors.ClusterError(
                    f"timed out waiting for redis-server on {address(config)}; its log: "
                    f"{service.log_path}",
                    "Raise 'startup_timeout_s' in the cluster config if this machine is slow.",
                )
            time.sleep(0.2)
