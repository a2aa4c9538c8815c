"""One Serve config edit at a time per cluster: ``serve deploy``, ``models promote``, ``serve
rollback`` and ``serve delete`` each read Serve's whole config and write it back, so two at once
would lose one's app or pin.

On a cluster that keeps its state in Redis the lock is redis-py's ``Lock`` (any machine that
reaches that Redis is serialized), with a short expiry that a thread keeps extending while the
edit runs: a CLI killed mid-edit frees it within ``_TTL_S``. Without Redis it is an ``flock`` on a
file beside the cluster's temp files, which the kernel frees when its holder dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from aiaas import errors, redis_store
from aiaas.config.cluster import ClusterConfig

_TTL_S = 30
#: How long an edit waits for the one before it (a promote may wait minutes for replicas).
WAIT_S = 900


@contextmanager
def held(cluster: ClusterConfig, wait_s: float = WAIT_S) -> Iterator[None]:
    """Hold the cluster's Serve edit lock.

    Raises:
        DeployError: Another edit held it for longer than ``wait_s``.
    """
    if redis_store.in_use(cluster):
        with _redis_lock(cluster, wait_s):
            yield
        return
    with _file_lock(cluster):
        yield


def _busy(cluster: ClusterConfig, wait_s: float) -> errors.DeployError:
    return errors.DeployError(
        f"another Serve edit on cluster '{cluster.name}' held the lock for over {wait_s:.0f}s",
        "Wait for it to finish (aiaas serve status), then run this again.",
    )


@contextmanager
def _redis_lock(cluster: ClusterConfig, wait_s: float) -> Iterator[None]:
    import redis

    connection = redis_store.client(cluster, timeout_s=5)
    lock = connection.lock(
        f"aiaas:{cluster.name}:serve-edit", timeout=_TTL_S, blocking_timeout=wait_s
    )
    try:
        if not lock.acquire():
            raise _busy(cluster, wait_s)
    except redis.RedisError as exc:
        connection.close()
        raise errors.ClusterError(
            f"cannot reach the cluster's Redis at {redis_store.address(cluster)} for the Serve "
            f"edit lock: {exc}",
            "Check 'aiaas cluster status'; the supervisor restarts a lost Redis.",
        ) from None
    done = threading.Event()

    def keep() -> None:
        while not done.wait(_TTL_S / 3):
            try:
                lock.extend(_TTL_S, replace_ttl=True)
            except redis.RedisError:
                continue  # Redis restarting: try again before the expiry

    keeper = threading.Thread(target=keep, name="serve-edit-lock", daemon=True)
    keeper.start()
    try:
        yield
    finally:
        done.set()
        keeper.join()
        with contextlib.suppress(redis.RedisError):  # expired or Redis gone: free either way
            lock.release()
        connection.close()


@contextmanager
def _file_lock(cluster: ClusterConfig) -> Iterator[None]:
    path = Path(cluster.temp_root).expanduser() / f"{cluster.name}.serve-edit.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
