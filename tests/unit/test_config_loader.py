"""The config loader's user-facing messages, exactly as users see them."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from aiaas import errors
from aiaas.config import loader
from aiaas.config.cluster import ClusterConfig

VALID = """\
kind: cluster
head:
  num_cpus: 1
  memory: 2GiB
  object_store_memory: 200MiB
worker_groups:
  - name: cpu
    replicas: 2
    num_cpus: 2
    memory: 1GiB
    object_store_memory: 100MiB
"""


def _write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _error(path: Path) -> str:
    with pytest.raises(errors.ConfigError) as caught:
        loader.load(path)
    return str(caught.value)


def test_valid_file_loads_with_parsed_sizes(tmp_path: Path) -> None:
    config = loader.load(_write(tmp_path, VALID), ClusterConfig)
    assert config.head.memory == 2 * 2**30
    assert config.worker_groups[0].object_store_memory == 100 * 2**20
    assert config.node_count == 3
    assert config.dashboard_url() == "http://127.0.0.1:8265"


def test_typo_gets_did_you_mean_with_path_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, VALID.replace("    replicas: 2", "    replicaz: 2"))
    assert _error(path) == (
        f"{path}: not a valid cluster config (1 problem):\n"
        "  • worker_groups[0].replicaz (line 8): unknown field; did you mean 'replicas'?"
    )


def test_unknown_key_without_close_match_lists_allowed_fields(tmp_path: Path) -> None:
    path = _write(tmp_path, VALID + "ports:\n  zzz: 1\n")
    assert _error(path).splitlines()[1] == (
        "  • ports.zzz (line 13): unknown field; allowed fields: gcs, dashboard, client_server, "
        "metrics_export, prometheus, haproxy_stats, haproxy_metrics, serve_fallback_http, "
        "serve_fallback_grpc, redis"
    )


def test_every_problem_is_listed(tmp_path: Path) -> None:
    text = VALID.replace("num_cpus: 1", "num_cpus: -1").replace("num_cpus: 2", "num_cpus: two")
    path = _write(tmp_path, text)
    assert _error(path) == (
        f"{path}: not a valid cluster config (2 problems):\n"
        "  • head.num_cpus (line 3): Input should be greater than or equal to 0\n"
        "  • worker_groups[0].num_cpus (line 9): Input should be a valid integer, unable to parse "
        "string as an integer"
    )


def test_validator_messages_say_the_fix(tmp_path: Path) -> None:
    text = VALID.replace(
        "object_store_memory: 200MiB", "object_store_memory: 10MiB\n  resources: {GPU: 1}"
    )
    message = _error(_write(tmp_path, text))
    assert (
        "  • head.object_store_memory (line 5): 10.0MiB is below Ray's minimum object store of "
        "75MiB; set at least '75MiB'" in message
    )
    assert (
        "  • head.resources (line 6): 'GPU' is a built-in Ray resource; set it with the node's "
        "'num_gpus' field instead of under 'resources'" in message
    )


def test_bad_name_and_duplicate_ports(tmp_path: Path) -> None:
    text = VALID + "name: My_Cluster\nports:\n  gcs: 7000\n  dashboard: 7000\n"
    message = _error(_write(tmp_path, text))
    assert (
        "  • name (line 12): 'My_Cluster' is not a valid name; use 1-40 lower-case letters, "
        "digits and '-', starting and ending with a letter or digit (e.g. 'cpu-workers')" in message
    )
    assert (
        "  • ports (line 13): 'dashboard' and 'gcs' both use port 7000; give each its own port"
        in message
    )


def test_missing_required_field(tmp_path: Path) -> None:
    path = _write(tmp_path, "kind: cluster\nhead:\n  num_cpus: 1\n  memory: 1GiB\n")
    assert _error(path) == (
        f"{path}: not a valid cluster config (1 problem):\n"
        "  • head.object_store_memory (line 3): required field is missing"
    )


def test_unknown_kind_suggests_the_right_one(tmp_path: Path) -> None:
    path = _write(tmp_path, "kind: clustr\n")
    assert (
        _error(path)
        == f"{path}: unknown kind 'clustr'; did you mean 'cluster'? known kinds: cluster, dataset, finetune, monitoring, optimize, train, tune"
    )


def test_missing_kind(tmp_path: Path) -> None:
    path = _write(tmp_path, "head: {}\n")
    assert _error(path).startswith(f"{path}: missing 'kind:'\nAdd 'kind: <kind>' at the top;")


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    path = _write(tmp_path, "kind: cluster\nhead: [1\n")
    assert _error(path) == (
        f"{path}: not valid YAML at line 3, column 1: expected ',' or ']', but got '<stream end>'\n"
        "Fix the YAML syntax (indentation, ':' after keys, quotes)."
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "the file is empty\nStart it with 'kind: <kind>'."),
        ("- a\n- b\n", "expected a mapping of keys to values at the top, got list"),
    ],
)
def test_empty_or_not_a_mapping(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    assert _error(path).startswith(f"{path}: {expected}")


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert (
        _error(missing)
        == f"{missing}: no such file\nCheck the path; shipped configs live under configs/."
    )
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00kind")
    assert _error(binary).startswith(f"{binary}: cannot be read (UnicodeDecodeError:")
    assert _error(tmp_path) == f"{tmp_path}: is a directory, not a YAML file"


def test_ray_serve_files_are_checked_with_serves_schema(tmp_path: Path) -> None:
    good = _write(
        tmp_path,
        "applications:\n  - name: app\n    route_prefix: /\n    import_path: serve_apps.x:build_app\n",
        "serve.yaml",
    )
    assert loader.check(good) == "serve"
    bad = _write(tmp_path, "applications:\n  - name: app\n    import_pathh: x:y\n", "bad.yaml")
    with pytest.raises(errors.ConfigError) as caught:
        loader.check(bad)
    assert str(caught.value).startswith(f"{bad}: not a valid Ray Serve config")
    assert "applications[0].import_path (line 2): required field is missing" in str(caught.value)


def test_storage_root_schemes(tmp_path: Path) -> None:
    message = _error(_write(tmp_path, VALID + "storage_root: ftp://host/x\n"))
    assert (
        "storage_root (line 12): scheme 'ftp://' is not supported; use a local path, file://, "
        "s3:// or gs://" in message
    )
    remote = loader.load(
        _write(
            tmp_path,
            VALID
            + "storage_root: s3://bucket/p\nmlflow: {backend_store_uri: 'postgresql://db/mlflow'}\n",
            "s3.yaml",
        ),
        ClusterConfig,
    )
    assert remote.local_storage_root() is None
    local = loader.load(
        _write(tmp_path, VALID + f"storage_root: file://{tmp_path}\n", "f.yaml"), ClusterConfig
    )
    assert local.local_storage_root() == tmp_path.resolve()


def test_labels_follow_kubernetes_syntax(tmp_path: Path) -> None:
    message = _error(
        _write(
            tmp_path,
            VALID.replace("    replicas: 2", "    replicas: 2\n    labels: {'bad key': x}"),
        )
    )
    assert "label key 'bad key' is not a valid Kubernetes label key" in message


def test_max_replicas_below_replicas(tmp_path: Path) -> None:
    message = _error(
        _write(tmp_path, VALID.replace("    replicas: 2", "    replicas: 2\n    max_replicas: 1"))
    )
    assert (
        "  • worker_groups[0] (line 7): max_replicas (1) is below replicas (2); raise max_replicas "
        "or lower replicas" in message
    )
