"""The cluster's Ray token, and what a node's processes (and so every job) get to see."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from aiaas import errors, ray_auth
from aiaas.config import loader
from aiaas.config.cluster import ClusterConfig
from cluster import environment
from tests import support


def _config(tmp_path: Path, **overrides: object) -> ClusterConfig:
    return loader.load(
        support.write_cluster_config(tmp_path, "auth", 1, **overrides), ClusterConfig
    )


def test_token_auth_is_the_default_and_the_token_is_a_private_file(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert config.auth_mode == "token"
    path = ray_auth.ensure_token(config)
    assert path == tmp_path / "storage" / "clusters" / "auth" / "auth_token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = ray_auth.read_token(config)
    assert len(token) == 64 and int(token, 16) >= 0  # 256 random bits, as Ray makes them
    # Made once: a second `cluster up` keeps the token every node and client already uses.
    assert ray_auth.ensure_token(config) == path
    assert ray_auth.read_token(config) == token
    assert ray_auth.headers(config) == {"Authorization": f"Bearer {token}"}


def test_a_token_others_can_read_is_refused(tmp_path: Path) -> None:
    config = _config(tmp_path)
    path = ray_auth.ensure_token(config)
    path.chmod(0o644)
    with pytest.raises(errors.StorageError) as caught:
        ray_auth.read_token(config)
    assert str(caught.value).startswith(
        f"the Ray token {path} is readable by other users or owned by someone else (mode -rw-r--r--"
    )
    assert f"chmod 600 {path}" in str(caught.value)


def test_a_process_finds_the_token_by_path_and_an_inherited_token_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path)
    path = ray_auth.ensure_token(config)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "another-clusters-token")
    ray_auth.use(config)
    assert "RAY_AUTH_TOKEN" not in os.environ
    assert os.environ["RAY_AUTH_MODE"] == "token"
    assert os.environ["RAY_AUTH_TOKEN_PATH"] == str(path)
    assert ray_auth.token_from_env() == ray_auth.read_token(config)
    assert ray_auth.export_line(config) == (
        f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={path}; unset RAY_AUTH_TOKEN"
    )


def test_nodes_take_an_allow_list_of_the_operators_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "leaked")
    monkeypatch.setenv("AIAAS_DEBUG", "1")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    env = environment.node_env(_config(tmp_path))
    assert "GITHUB_TOKEN" not in env
    assert "AWS_SECRET_ACCESS_KEY" not in env  # a local storage root needs no cloud credentials
    assert "RAY_AUTH_TOKEN" not in env  # the token is read from its file, never inherited
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN_PATH"].endswith("/clusters/auth/auth_token")
    assert (env["AIAAS_DEBUG"], env["LC_ALL"]) == ("1", "C.UTF-8")
    assert env["PATH"].startswith(str(environment.venv_bin()))
    # The cluster config's own env: still passed, as the operator chose it.
    assert env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.2"


def test_a_remote_storage_root_brings_its_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/creds.json")
    config = ClusterConfig.model_validate(
        {
            "kind": "cluster",
            "storage_root": "s3://bucket/aiaas",
            "mlflow": {"backend_store_uri": "postgresql://db/mlflow"},
            "head": {"num_cpus": 1, "memory": "1GiB", "object_store_memory": "100MiB"},
        }
    )
    inherited = environment.inherited(config, dict(os.environ))
    assert inherited["AWS_SECRET_ACCESS_KEY"] == "aws-secret"
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in inherited


def test_auth_settings_in_env_are_refused(tmp_path: Path) -> None:
    path = support.write_cluster_config(tmp_path, "auth", 0, env={"RAY_AUTH_MODE": "disabled"})
    with pytest.raises(errors.ConfigError) as caught:
        loader.load(path, ClusterConfig)
    assert str(caught.value).endswith(
        "  • env (line 23): 'RAY_AUTH_MODE' is set by aiaas from 'auth_mode' (the same in every "
        "process, the token by file); remove it from 'env' and set 'auth_mode' instead"
    )


def test_cluster_env_prints_the_line_for_rays_own_clis(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from aiaas_cli.main import cli

    path = support.write_cluster_config(tmp_path, "auth", 0)
    result = CliRunner().invoke(cli, ["cluster", "env", str(path)])
    assert result.exit_code == 0, result.output
    token_path = tmp_path / "storage" / "clusters" / "auth" / "auth_token"
    assert result.output == (
        f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token_path}; unset RAY_AUTH_TOKEN\n"
    )
