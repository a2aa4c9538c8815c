"""The model cache root is private, and an artifact's manifest accounts for each of its files."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from aiaas import artifact_digests, artifacts, errors, registry

HINT = (
    "Set AIAAS_MODEL_CACHE to a directory only this user can write (it is created with mode "
    "0700), or remove {root} so it is created again."
)
OTHER_UID = 54321


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_cache_root_is_created_private(tmp_path: Path) -> None:
    root = tmp_path / "shared" / "aiaas-models"
    old = os.umask(0)  # even where files are created world-writable by default
    try:
        assert artifact_digests.private_root(root) == root
    finally:
        os.umask(old)
    assert _mode(root) == 0o700
    assert artifact_digests.private_root(root) == root  # an existing private root is fine


def test_a_cache_root_others_can_write_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "aiaas-models"
    root.mkdir()
    os.chmod(root, 0o777)
    with pytest.raises(errors.StorageError) as refused:
        artifact_digests.private_root(root)
    assert refused.value.message == f"model cache {root} is writable by other users (mode 0777)"
    assert refused.value.hint == HINT.format(root=root)
    os.chmod(root, 0o770)
    with pytest.raises(errors.StorageError, match="writable by other users"):
        artifact_digests.private_root(root)


def test_a_cache_root_someone_else_owns_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    root = tmp_path / "aiaas-models"
    root.mkdir(mode=0o700)
    os.chown(root, OTHER_UID, OTHER_UID)
    with pytest.raises(errors.StorageError) as refused:
        artifact_digests.private_root(root)
    assert refused.value.message == (
        f"model cache {root} is owned by uid {OTHER_UID}, not by this user (uid 0)"
    )
    # A link someone else planted, even to a directory of ours.
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    link = tmp_path / "linked"
    link.symlink_to(mine)
    os.lchown(link, OTHER_UID, OTHER_UID)
    with pytest.raises(errors.StorageError, match="is a symbolic link owned by uid 54321"):
        artifact_digests.private_root(link)


def test_loading_refuses_a_shared_cache_before_downloading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "open"
    root.mkdir()
    os.chmod(root, 0o777)
    monkeypatch.setenv("AIAAS_MODEL_CACHE", str(root))
    version = registry.Version(
        name="m",
        version="1",
        run_id="r",
        created=0.0,
        tags={registry.FORMAT_TAG: "onnx", registry.ARTIFACT_DIGEST_TAG: "0" * 64},
    )
    with pytest.raises(errors.StorageError, match="writable by other users"):
        artifacts.load(version)
    assert list(root.iterdir()) == []


def test_downloads_are_staged_privately_then_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    source = tmp_path / "registered"
    source.mkdir()
    (source / "model.onnx").write_bytes(b"graph")
    digest = artifact_digests.write_manifest(source)
    seen: dict[str, Any] = {}

    def download(artifact_uri: str, tracking_uri: str, dst_path: str) -> str:
        seen["mode"] = _mode(Path(dst_path))
        for file in source.iterdir():
            (Path(dst_path) / file.name).write_bytes(file.read_bytes())
        (Path(dst_path) / "registered_model_meta").write_text("model_name: m\n")  # as MLflow
        return dst_path

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", download)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///unused.db")
    monkeypatch.setenv("AIAAS_MODEL_CACHE", str(tmp_path / "cache"))
    version = registry.Version(
        name="m",
        version="1",
        run_id="r",
        created=0.0,
        tags={registry.FORMAT_TAG: "onnx", registry.ARTIFACT_DIGEST_TAG: digest},
        source="s",
    )
    copy = artifacts.verified_copy(version)
    assert seen["mode"] == 0o700
    assert sorted(p.name for p in copy.iterdir()) == ["aiaas_manifest.json", "model.onnx"]


def _artifact(tmp_path: Path) -> tuple[Path, str]:
    artifact = tmp_path / "artifact"
    (artifact / "data").mkdir(parents=True)
    (artifact / "MLmodel").write_text("flavors: {}\n")
    (artifact / "data" / "weights.safetensors").write_bytes(b"weights")
    return artifact, artifact_digests.write_manifest(artifact)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            lambda a: (a / "data" / "extra.pth").write_bytes(b"x"),
            "file 'data/extra.pth' is not part of the registered artifact",
        ),
        (
            lambda a: (a / "MLmodel").unlink(),
            "file 'MLmodel' of the registered artifact is missing",
        ),
        (
            lambda a: (a / "MLmodel").write_text("flavors: {x: 1}\n"),
            "file 'MLmodel' does not match the SHA-256 recorded at registration",
        ),
        (lambda a: (a / "aiaas_manifest.json").unlink(), "the artifact has no aiaas_manifest.json"),
        (lambda a: (a / "link").symlink_to("/etc/passwd"), "'link' is a symbolic link"),
    ],
)
def test_each_difference_from_the_manifest_is_refused_and_the_copy_removed(
    tmp_path: Path, change: Any, problem: str
) -> None:
    artifact, digest = _artifact(tmp_path)
    artifact_digests.verify(artifact, digest, "m:1")  # intact
    change(artifact)
    with pytest.raises(errors.StorageError) as refused:
        artifact_digests.verify(artifact, digest, "m:1")
    assert refused.value.message == (
        f"m:1: {problem} (cached copy in {artifact}); nothing of it was loaded"
    )
    assert not artifact.exists()
