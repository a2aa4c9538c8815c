"""Serve's HAProxy config, as Ray 2.60 renders it, pinned to loopback and hardened by
``aiaas-haproxy`` and accepted by the HAProxy binary Serve runs; a live HAProxy on 127.0.0.1
answers its own errors in aiaas's JSON shape."""

from __future__ import annotations

import json
import re
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import ray.util
from ray.serve._private.haproxy import BackendConfig, HAProxyApi, HAProxyConfig, ServerConfig
from ray.serve.config import HTTPOptions

from cluster import haproxy_loopback
from tests import support

#: TEST-NET-3: never an address of this machine.
REMOTE = "203.0.113.7"


def _render(
    directory: Path,
    servers: dict[str, list[ServerConfig]] | None = None,
    http: int | None = None,
) -> Path:
    """The config Serve's HAProxy manager writes, by default for one app with a local and a
    remote replica; ``servers`` gives other apps (route prefix → replicas)."""
    stats, metrics, free = support.free_ports(3)
    http = http or free
    config = HAProxyConfig(
        http_options=HTTPOptions(host="127.0.0.1", port=http),
        socket_path=str(directory / "admin.sock"),
        server_state_base=str(directory),
        server_state_file=str(directory / "server-state"),
        stats_port=stats,
        metrics_port=metrics,
        metrics_socket_path=str(directory / "metrics.sock"),
    )
    servers = servers or {
        "/v1/models": [
            ServerConfig("SERVE_REPLICA-digits-local", ray.util.get_node_ip_address(), 30000),
            ServerConfig("SERVE_REPLICA-digits-remote", REMOTE, 30001),
        ]
    }
    backends = {
        f"app{i}": BackendConfig(
            name=f"http-app{i}", path_prefix=prefix, app_name=f"app{i}", servers=replicas
        )
        for i, (prefix, replicas) in enumerate(servers.items())
    }
    path = directory / "haproxy.cfg"
    api = HAProxyApi(config, backends, config_file_path=str(path))
    api.cfg.has_received_routes = api.cfg.has_received_servers = True
    api._generate_config_file_internal()
    return path


def _check(path: Path, **env: str) -> str:
    """``aiaas-haproxy -c``: rewrites the file and has HAProxy check it; the rewritten text."""
    checked = subprocess.run(
        [str(support.BIN / "aiaas-haproxy"), "-c", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**support.env(), **env},
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    return path.read_text()


def test_every_listener_is_pinned_to_loopback_and_haproxy_accepts_the_result(
    tmp_path: Path,
) -> None:
    path = _render(tmp_path)
    rendered = path.read_text()
    # What this program exists for: Ray binds its stats and metrics listeners everywhere.
    assert re.search(r"^\s*bind \*?:\d+", rendered, re.MULTILINE), rendered

    pinned = _check(path)
    binds = re.findall(r"^\s*bind\s+(\S+)", pinned, re.MULTILINE)
    assert len(binds) == 3 and all(b.startswith("127.0.0.1:") for b in binds), binds
    servers = dict(re.findall(r"^\s*server\s+(\S+)\s+(\S+)", pinned, re.MULTILINE))
    assert servers["SERVE_REPLICA-digits-local"] == "127.0.0.1:30000"
    assert servers["SERVE_REPLICA-digits-remote"] == f"{REMOTE}:30001"
    # The pinning changes no other line.
    loopback = haproxy_loopback.loopback_config(rendered, haproxy_loopback.is_local_address)
    assert len(loopback.splitlines()) == len(rendered.splitlines())


def test_the_access_log_is_dropped_unless_configured_and_metrics_logging_stays(
    tmp_path: Path,
) -> None:
    path = _render(tmp_path)
    rendered = path.read_text()
    access = re.compile(r"^\s*log 127\.0\.0\.1:514 local0", re.MULTILINE)
    assert access.search(rendered), rendered
    pinned = _check(path, AIAAS_HAPROXY_ACCESS_LOG="0")
    assert not access.search(pinned), pinned
    # Serve's own log lines stay: the metrics socket (local1) and every `log global`.
    assert pinned.count("metrics.sock len") == rendered.count("metrics.sock len") == 1
    assert pinned.count("log global") == rendered.count("log global")


def test_only_addresses_of_this_machine_count_as_local() -> None:
    assert haproxy_loopback.is_local_address("127.0.0.1")
    assert haproxy_loopback.is_local_address(ray.util.get_node_ip_address())
    assert not haproxy_loopback.is_local_address(REMOTE)


def test_a_rewrite_keeps_serves_own_loopback_and_ipv6_lines() -> None:
    text = "  bind 127.0.0.1:8000\n  bind [::1]:9000\n  server a [fe80::1]:30000 check\n"
    assert haproxy_loopback.loopback_config(text, lambda _: True) == text


def test_the_admin_socket_is_private_and_haproxy_answers_json_errors(tmp_path: Path) -> None:
    path = _render(tmp_path)
    rendered = path.read_text()
    assert "mode 666 level admin" in rendered  # Ray 2.60's template
    hardened = _check(path, AIAAS_HAPROXY_HTTP_REQUEST_TIMEOUT_S="7")
    assert re.search(r"^\s*stats socket \S+ mode 600 level admin", hardened, re.MULTILINE)
    assert "mode 666" not in hardened
    assert "timeout http-request 7s" in hardened and "option http-buffer-request" in hardened
    # Ray's own errorfile (a text 500 for 502, 503 and 504) is replaced by JSON pages.
    assert "500.http" not in hardened.replace("aiaas-errors/500.http", "")
    for status in (400, 408, 502, 503, 504):
        page = (tmp_path / "aiaas-errors" / f"{status}.http").read_bytes()
        head, _, body = page.partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status} ".encode()), head
        assert b"Content-Type: application/json" in head
        assert f"Content-Length: {len(body)}".encode() in head
        error = json.loads(body)["error"]
        assert error["code"] and error["message"] and error["type"]
    assert 'content-type text/plain lf-string "Path' not in hardened
    # Rewriting a rewritten file changes nothing.
    again = haproxy_loopback.hardened_config(hardened, str(tmp_path / "aiaas-errors"), 7)
    assert again == hardened
    # The directory of the admin and metrics sockets is this user's alone.
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700


class _Replica(BaseHTTPRequestHandler):
    """A stand-in replica: answers every GET with the request headers it received."""

    def do_GET(self) -> None:
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class LiveHAProxy:
    port: int
    directory: Path

    def send(self, raw: bytes, pause_s: float = 0, timeout_s: float = 10) -> tuple[int, dict]:
        """One raw HTTP exchange on 127.0.0.1; the status and the JSON body."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout_s) as conn:
            conn.sendall(raw)
            time.sleep(pause_s)
            data = b""
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                if length and len(body) >= int(length[1]):
                    break
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(body)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveHAProxy]:
    replica = ThreadingHTTPServer(("127.0.0.1", 0), _Replica)
    threading.Thread(target=replica.serve_forever, daemon=True).start()
    dead, http = support.free_ports(2)
    path = _render(
        tmp_path,
        {
            "/live": [ServerConfig("SERVE_REPLICA-live", "127.0.0.1", replica.server_port)],
            "/dead": [ServerConfig("SERVE_REPLICA-dead", "127.0.0.1", dead)],
        },
        http=http,
    )
    process = subprocess.Popen(
        [str(support.BIN / "aiaas-haproxy"), "-db", "-f", str(path)],
        env={**support.env(), "AIAAS_HAPROXY_HTTP_REQUEST_TIMEOUT_S": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", http), timeout=1).close()
                break
            except OSError:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                assert time.monotonic() < deadline, "HAProxy did not start listening"
                time.sleep(0.1)
        yield LiveHAProxy(http, tmp_path)
    finally:
        process.terminate()
        process.wait(timeout=30)
        replica.shutdown()
        replica.server_close()


def test_a_live_haproxy_answers_its_own_errors_as_json(live: LiveHAProxy) -> None:
    admin = live.directory / "admin.sock"
    assert stat.S_IMODE(admin.stat().st_mode) == 0o600

    status, body = live.send(b'GET /no/such"path\\ HTTP/1.1\r\nHost: x\r\n\r\n')
    assert status in (400, 404) and body["error"]["code"] in ("bad_request", "not_found")
    status, body = live.send(b"GET /no/such%22path HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (status, body["error"]["code"]) == (404, "not_found")
    assert "/no/such%22path" in body["error"]["message"]

    status, body = live.send(b"GET /live/x HTTP/1.1\r\nHost: x\r\nX-Request-Id: \xff\r\n\r\n")
    assert (status, body["error"]["code"]) == (400, "invalid_header")
    status, body = live.send(
        b"GET /live/x HTTP/1.1\r\nHost: x\r\nX-Request-Id: abc-1\r\n"
        b"X-Request-Timeout-Seconds: 0\r\nConnection: close\r\n\r\n"
    )
    assert status == 200 and body["x-request-id"] == "abc-1"
    assert "x-request-timeout-seconds" not in body  # Serve's own timeout stays Serve's

    status, body = live.send(b"GET /dead/x HTTP/1.1\r\nHost: x\r\n\r\n", timeout_s=30)
    assert (status, body["error"]["code"]) == (503, "unavailable")

    started = time.monotonic()
    status, body = live.send(
        b"POST /live/x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789"
    )
    assert (status, body["error"]["code"]) == (408, "request_timeout")
    assert time.monotonic() - started < 5
    # Only what HAProxy's HTTP/1 parser cannot read at all gets its built-in page: that
    # answer comes before any errorfile applies (HAProxy 2.8).
    with pytest.raises(json.JSONDecodeError):
        live.send(b"BAD\r\n\r\n")
