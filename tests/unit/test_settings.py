"""The variables `cluster up` writes into every node are the ones aiaas's processes read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aiaas import errors, settings
from aiaas.config import loader
from aiaas.config.cluster import ClusterConfig
from cluster import environment
from tests import support


def test_a_node_environment_reads_back_as_the_clusters_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = loader.load(support.write_cluster_config(tmp_path, "env", 0), ClusterConfig)
    monkeypatch.setattr(os, "environ", environment.node_env(config))
    settings.current.cache_clear()
    found = settings.current()
    assert found.storage_root == config.storage_root
    assert found.cluster_name == "env"
    assert found.model_cache == str(environment.cluster_dir(config) / "models")
    assert found.haproxy_access_log is False  # no access-log target in the config
    assert found.require_storage_root() == config.storage_root


def test_outside_a_cluster_the_storage_root_is_refused_with_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(settings.STORAGE_ROOT, raising=False)
    settings.current.cache_clear()
    with pytest.raises(errors.ClusterError) as caught:
        settings.current().require_storage_root()
    assert str(caught.value) == (
        "AIAAS_STORAGE_ROOT is not set on this node\nRun the job on a cluster started with "
        "'aiaas cluster up' (it sets the storage root)."
    )
