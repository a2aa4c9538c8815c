"""The cluster's Ray token: made once by ``cluster up``, used by every aiaas process.

Ray's GCS, raylets, dashboard agents and Ray Client server listen on the machine's address even
when the dashboard is on 127.0.0.1, so only Ray's token auth (``RAY_AUTH_MODE=token``) keeps
strangers from running code there (CVE-2023-48022). Ray looks the token up in ``RAY_AUTH_TOKEN``,
then the file ``RAY_AUTH_TOKEN_PATH`` names, then ``~/.ray/auth_token`` (``_raylet``'s
``AuthenticationTokenLoader``); aiaas keeps one file per cluster and always names it by path, so
the token never sits in a process environment or a log, and two clusters never share one.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from aiaas import errors
from aiaas.config.cluster import ClusterConfig

MODE_VAR = "RAY_AUTH_MODE"
TOKEN_VAR = "RAY_AUTH_TOKEN"
TOKEN_PATH_VAR = "RAY_AUTH_TOKEN_PATH"


def token_path(config: ClusterConfig) -> Path:
    """Where the cluster's token lives: under a local storage root, else under ``~/.aiaas``
    (an object store cannot hold a 0600 file)."""
    root = config.local_storage_root() or Path("~/.aiaas").expanduser()
    return root / "clusters" / config.name / "auth_token"


def ensure_token(config: ClusterConfig) -> Path:
    """Create the cluster's token unless it exists; returns its path.

    The token is 256 random bits in hex, as Ray's own ``ray get-auth-token --generate`` makes
    them, written with mode 0600 from the first byte (``O_EXCL``: two ``up``s never race).

    Raises:
        StorageError: The file cannot be written, or it is readable by others.
    """
    path = token_path(config)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        _check_private(path)
        return path
    except OSError as exc:
        raise errors.StorageError(
            f"cannot create the cluster's Ray token at {path}: {exc}",
            "Make the storage root writable, or set another 'storage_root'.",
        ) from None
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(32))
        handle.flush()
        os.fsync(handle.fileno())
    return path


def read_token(config: ClusterConfig) -> str:
    """The cluster's token.

    Raises:
        ClusterError: There is none yet (the cluster was never started from this config).
    """
    path = token_path(config)
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        raise errors.ClusterError(
            f"cluster '{config.name}' has no Ray token at {path} (it uses auth_mode: token)",
            "Start the cluster first: aiaas cluster up",
        ) from None
    _check_private(path)
    return token


def process_env(config: ClusterConfig) -> dict[str, str]:
    """What a process of this cluster (a node, a job, a CLI) needs to find the token."""
    if config.auth_mode != "token":
        return {MODE_VAR: config.auth_mode}
    return {MODE_VAR: "token", TOKEN_PATH_VAR: str(token_path(config))}


def use(config: ClusterConfig) -> None:
    """Make this process talk to the cluster as Ray's own clients do: every Ray client it
    creates later (Jobs SDK, ``ray.init``, the state API) finds the cluster's token.

    An inherited ``RAY_AUTH_TOKEN`` (another cluster's) would win over the path: it goes.
    """
    os.environ.pop(TOKEN_VAR, None)
    os.environ.pop(TOKEN_PATH_VAR, None)
    os.environ.update(process_env(config))


def export_line(config: ClusterConfig) -> str:
    """The shell line that makes Ray's CLIs (``ray job submit``, ``serve deploy``,
    ``ray status``) authenticate to this cluster."""
    env = process_env(config)
    line = "export " + " ".join(f"{key}={value}" for key, value in env.items())
    return line + (f"; unset {TOKEN_VAR}" if config.auth_mode == "token" else "")


def headers(config: ClusterConfig) -> dict[str, str]:
    """HTTP headers for Ray's dashboard REST API (Jobs, Serve, state)."""
    if config.auth_mode != "token":
        return {}
    return {"Authorization": f"Bearer {read_token(config)}"}


def token_from_env() -> str | None:
    """The token a process on the cluster finds as Ray would (env, then the path it names)."""
    token = os.environ.get(TOKEN_VAR)
    if token:
        return token.strip()
    named = os.environ.get(TOKEN_PATH_VAR)
    path = Path(named).expanduser() if named else Path("~/.ray/auth_token").expanduser()
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _check_private(path: Path) -> None:
    info = path.stat()
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO) or info.st_uid != os.getuid():
        raise errors.StorageError(
            f"the Ray token {path} is readable by other users or owned by someone else "
            f"(mode {stat.filemode(info.st_mode)}, uid {info.st_uid})",
            f"Make it private (chown $(id -u) {path} && chmod 600 {path}) or delete it "
            "and run 'aiaas cluster down' and 'aiaas cluster up' to make a new one.",
        )
