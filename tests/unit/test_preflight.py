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
