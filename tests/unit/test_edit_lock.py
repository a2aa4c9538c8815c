"""The Serve edit lock: two processes editing one cluster's Serve config take turns, through a
real Redis (as `cluster up` starts it) and through the file lock without one."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aiaas.config.cluster import ClusterConfig
from cluster import processes, redis_service
from tests import support

_HOLD = """
import sys, time
from aiaas.config.cluster import ClusterConfig
from aiaas.serving import edit_lock
config = ClusterConfig.model_validate_json(sys.argv[1])
with edit_lock.held(config):
    print("got", time.time(), flush=True)
    time.sleep(float(sys.argv[2]))
    print("done", time.time(), flush=True)
"""


def _config(tmp_path: Path, fault_tolerance: bool) -> ClusterConfig:
    return ClusterConfig.model_validate(
        {
            "kind": "cluster",
            "name": "locks",
            "storage_root": str(tmp_path / "storage"),
            "temp_root": tempfile.mkdtemp(prefix="l", dir="/tmp"),
            "head": {"num_cpus": 1, "memory": "1GiB", "object_store_memory": "100MiB"},
            "ports": {"redis": support.free_ports(1)[0]},
            "gcs_fault_tolerance": {"enabled": fault_tolerance},
        }
    )


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[ClusterConfig]:
    if redis_service.available() is None:
        pytest.fail("redis-server is missing: make test installs it (Debian's redis-server)")
    config = _config(tmp_path, fault_tolerance=True)
    service = redis_service.start(config)
    try:
        redis_service.wait_ready(config, service, time.monotonic() + 30)
        yield config
    finally:
        processes.stop_sessions([service.pid])


def _race(config: ClusterConfig) -> list[tuple[str, float]]:
    holders = [
        subprocess.Popen(
            [sys.executable, "-c", _HOLD, config.model_dump_json(), "1.5"],
            stdout=subprocess.PIPE,
            text=True,
            cwd=support.REPO,
            env=support.env(),
        )
        for _ in range(2)
    ]
    events = []
    for holder in holders:
        out, _ = holder.communicate(timeout=60)
        assert holder.returncode == 0
        events += [(word, float(at)) for word, at in (line.split() for line in out.splitlines())]
    return sorted(events, key=lambda event: event[1])


def test_two_processes_take_turns_through_redis(redis_cluster: ClusterConfig) -> None:
    from aiaas import redis_store

    assert redis_store.in_use(redis_cluster)
    assert [word for word, _ in _race(redis_cluster)] == ["got", "done", "got", "done"]
    # Nothing is left behind: the key is gone once both released it.
    with redis_store.client(redis_cluster) as connection:
        assert connection.keys("aiaas:*") == []


def test_redis_refuses_a_client_without_the_password(redis_cluster: ClusterConfig) -> None:
    import redis

    stranger = redis.Redis(port=redis_cluster.ports.redis, socket_timeout=2)
    with stranger, pytest.raises(redis.AuthenticationError):
        stranger.ping()
    password = Path(redis_cluster.local_storage_root() or "") / "clusters/locks/redis/password"
    assert password.stat().st_mode & 0o077 == 0


def test_two_processes_take_turns_through_the_file_lock_without_redis(tmp_path: Path) -> None:
    config = _config(tmp_path, fault_tolerance=False)
    assert [word for word, _ in _race(config)] == ["got", "done", "got", "done"]
