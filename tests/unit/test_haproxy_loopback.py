"""Serve's HAProxy config, as Ray 2.60 renders it, pinned to loopback by ``aiaas-haproxy`` and
accepted by the HAProxy binary Serve runs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import ray.util
from ray.serve._private.haproxy import BackendConfig, HAProxyApi, HAProxyConfig, ServerConfig
from ray.serve.config import HTTPOptions

from cluster import haproxy_loopback
from tests import support

#: TEST-NET-3: never an address of this machine.
REMOTE = "203.0.113.7"


def _render(directory: Path) -> Path:
    """The config Serve's HAProxy manager writes for one app with a local and a remote replica."""
    stats, metrics, http = support.free_ports(3)
    config = HAProxyConfig(
        http_options=HTTPOptions(host="127.0.0.1", port=http),
        socket_path=str(directory / "admin.sock"),
        server_state_base=str(directory),
        server_state_file=str(directory / "server-state"),
        stats_port=stats,
        metrics_port=metrics,
        metrics_socket_path=str(directory / "metrics.sock"),
    )
    backend = BackendConfig(
        name="http-digits",
        path_prefix="/v1/models",
        app_name="digits",
        servers=[
            ServerConfig("SERVE_REPLICA-digits-local", ray.util.get_node_ip_address(), 30000),
            ServerConfig("SERVE_REPLICA-digits-remote", REMOTE, 30001),
        ],
    )
    path = directory / "haproxy.cfg"
    api = HAProxyApi(config, {"digits": backend}, config_file_path=str(path))
    api.cfg.error_file_path = None
    api._generate_config_file_internal()
    return path


def test_every_listener_is_pinned_to_loopback_and_haproxy_accepts_the_result(
    tmp_path: Path,
) -> None:
    path = _render(tmp_path)
    rendered = path.read_text()
    # What this program exists for: Ray binds its stats and metrics listeners everywhere.
    assert re.search(r"^\s*bind \*?:\d+", rendered, re.MULTILINE), rendered

    checked = subprocess.run(
        [str(support.BIN / "aiaas-haproxy"), "-c", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr

    pinned = path.read_text()
    binds = re.findall(r"^\s*bind\s+(\S+)", pinned, re.MULTILINE)
    assert len(binds) == 3 and all(b.startswith("127.0.0.1:") for b in binds), binds
    servers = dict(re.findall(r"^\s*server\s+(\S+)\s+(\S+)", pinned, re.MULTILINE))
    assert servers["SERVE_REPLICA-digits-local"] == "127.0.0.1:30000"
    assert servers["SERVE_REPLICA-digits-remote"] == f"{REMOTE}:30001"
    # Nothing else changed.
    assert len(pinned.splitlines()) == len(rendered.splitlines())


def test_the_access_log_is_dropped_unless_configured_and_metrics_logging_stays(
    tmp_path: Path,
) -> None:
    path = _render(tmp_path)
    rendered = path.read_text()
    access = re.compile(r"^\s*log 127\.0\.0\.1:514 local0", re.MULTILINE)
    assert access.search(rendered), rendered
    checked = subprocess.run(
        [str(support.BIN / "aiaas-haproxy"), "-c", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**support.env(), "AIAAS_HAPROXY_ACCESS_LOG": "0"},
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    pinned = path.read_text()
    assert not access.search(pinned), pinned
    # Serve's own log lines stay: the metrics socket (local1) and every `log global`.
    assert pinned.count("metrics.sock len") == rendered.count("metrics.sock len") == 1
    assert pinned.count("log global") == rendered.count("log global")
    assert len(pinned.splitlines()) == len(rendered.splitlines()) - 1


def test_only_addresses_of_this_machine_count_as_local() -> None:
    assert haproxy_loopback.is_local_address("127.0.0.1")
    assert haproxy_loopback.is_local_address(ray.util.get_node_ip_address())
    assert not haproxy_loopback.is_local_address(REMOTE)


def test_a_rewrite_keeps_serves_own_loopback_and_ipv6_lines() -> None:
    text = "  bind 127.0.0.1:8000\n  bind [::1]:9000\n  server a [fe80::1]:30000 check\n"
    assert haproxy_loopback.loopback_config(text, lambda _: True) == text
