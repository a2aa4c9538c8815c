"""Which TCP ports are free, and who holds the ones that are not."""

from __future__ import annotations

import socket

import psutil


def is_free(port: int) -> bool:
    """True when nothing listens on ``port`` on any local address.

    Binds the wildcard address: on Linux that fails if any address of this machine has a
    listener on the port, which is what Ray's servers would run into.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def pick_free(count: int, avoid: set[int] | None = None) -> list[int]:
    """Ports the kernel reports free now, distinct from each other and from ``avoid``.

    Asked on the wildcard address: a port free on 127.0.0.1 may still be held on the machine's
    own address (where Ray's servers listen), and Ray's metrics exporter binds every address.
    """
    avoid = set(avoid or ())
    picked: list[int] = []
    while len(picked) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("0.0.0.0", 0))
            port = int(probe.getsockname()[1])
        if port not in avoid and port not in picked:
            picked.append(port)
    return picked


def holder(port: int) -> str:
    """A short description of the process listening on ``port``, for error messages."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return "another process"
    for connection in connections:
        if (
            connection.status == psutil.CONN_LISTEN
            and connection.laddr
            and connection.laddr.port == port
        ):
            if connection.pid is None:
                return "another process"
            try:
                name = psutil.Process(connection.pid).name()
            except psutil.Error:
                name = "?"
            return f"pid {connection.pid} ({name})"
    return "another process"
