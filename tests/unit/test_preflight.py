"""`cluster up` refuses to start on a taken port or a bad temp dir, before any Ray process runs."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import psutil
import pytest

from aiaas import errors
from aiaas.config import loader
from aiaas.config.cluster import ClusterConfig
from cluster import environment, launcher, state
from tests import support


def _config(tmp_path: Path, **overrides: object) -> tuple[ClusterConfig, Path]:
    path = support.write_cluster_config(tmp_path, "pre", workers=1, **overrides)
    return loader.load(path, ClusterConfig), path


def test_taken_port_names_field_file_and_holder(tmp_path: Path) -> None:
    config, path = _config(tmp_path)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", config.ports.dashboard))
        holder.listen()
        with pytest.raises(errors.PortInUseError) as caught:
            launcher.up(config, path)
    assert str(caught.value) == (
        f"port {config.ports.dashboard} (ports.dashboard in {path}) is in use by pid {os.getpid()} "
        f"({psutil.Process().name()})\nStop that process, or set another port under "
        f"'ports: dashboard:' in {path}. Nothing was started."
    )
    assert state.load(config) is None
    assert not environment.cluster_dir(config).exists()


def test_long_temp_root_is_refused(tmp_path: Path) -> None:
    config, path = _config(tmp_path, temp_root="/tmp/" + "x" * 40)
    with pytest.raises(errors.ConfigError) as caught:
        launcher.up(config, path)
    assert "Ray's socket paths need them under 43" in str(caught.value)


def test_a_temp_root_too_long_for_haproxys_sockets_is_refused_before_anything_starts(
    tmp_path: Path,
) -> None:
    # Short enough for Ray's node dirs, too long for HAProxy's 97-character socket paths.
    config, path = _config(tmp_path, temp_root="/tmp/" + "h" * 15)
    with pytest.raises(errors.ConfigError) as caught:
        launcher.up(config, path)
    assert f"temp_root in {path} gives Serve's HAProxy socket paths of" in str(caught.value)
    assert "serve_ingress: proxy" in (caught.value.hint or "")
    assert state.load(config) is None
    proxy, _ = _config(tmp_path, temp_root="/tmp/" + "h" * 15, serve_ingress="proxy")
    assert "HAPROXY" not in " ".join(environment.node_env(proxy))


def test_each_cluster_gets_its_own_haproxy_files_and_ports(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one, _ = _config(tmp_path / "one")
    two, _ = _config(tmp_path / "two")
    first, second = environment.node_env(one), environment.node_env(two)
    assert first["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert first["RAY_SERVE_HAPROXY_BINARY_PATH"].endswith("/aiaas-haproxy")
    for key in (
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC",
        "RAY_SERVE_HAPROXY_SOCKET_PATH",
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH",
        "RAY_SERVE_HAPROXY_STATS_PORT",
        "RAY_SERVE_HAPROXY_METRICS_PORT",
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    ):
        assert first[key] != second[key], key
    assert first["RAY_SERVE_HAPROXY_SOCKET_PATH"].startswith(str(environment.haproxy_dir(one)))


def test_haproxy_logs_and_parses_no_line_per_request_unless_configured(tmp_path: Path) -> None:
    (tmp_path / "lean").mkdir()
    (tmp_path / "logged").mkdir()
    lean, _ = _config(tmp_path / "lean")
    env = environment.node_env(lean)
    assert env["RAY_SERVE_HAPROXY_METRICS_ENABLED"] == "0"
    assert env["AIAAS_HAPROXY_ACCESS_LOG"] == "0"
    assert "RAY_SERVE_HAPROXY_LOG_TARGET" not in env
    assert env["RAY_SERVE_HAPROXY_RETRY_ON"] == "conn-failure empty-response"
    logged, _ = _config(
        tmp_path / "logged", haproxy_access_log="/dev/log", haproxy_request_metrics=True
    )
    env = environment.node_env(logged)
    assert env["RAY_SERVE_HAPROXY_METRICS_ENABLED"] == "1"
    assert env["AIAAS_HAPROXY_ACCESS_LOG"] == "1"
    assert env["RAY_SERVE_HAPROXY_LOG_TARGET"] == "/dev/log"


def test_picked_ports_are_free_on_the_machines_own_address_too() -> None:
    from cluster import ports

    address = ray_node_address()
    held = []
    try:
        # Ray's servers listen on the machine's address; a probe on 127.0.0.1 alone would hand
        # out their ports (it did: a restarted worker's metrics exporter failed to bind).
        for _ in range(2000):
            listener = socket.socket()
            listener.bind((address, 0))
            listener.listen()
            held.append(listener)
        taken = {listener.getsockname()[1] for listener in held}
        picked = ports.pick_free(200)
        assert not taken & set(picked)
        assert all(ports.is_free(port) for port in picked[:20])
    finally:
        for listener in held:
            listener.close()


def ray_node_address() -> str:
    import ray.util

    return str(ray.util.get_node_ip_address())


def test_ray_polls_less_on_every_node_unless_the_config_says_otherwise(tmp_path: Path) -> None:
    (tmp_path / "quiet").mkdir()
    (tmp_path / "chatty").mkdir()
    quiet, _ = _config(tmp_path / "quiet")
    env = environment.node_env(quiet)
    for key, value in environment.QUIET_ENV.items():
        assert env[key] == value, key
    chatty, _ = _config(tmp_path / "chatty", env={"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1"})
    assert environment.node_env(chatty)["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "0.1"
