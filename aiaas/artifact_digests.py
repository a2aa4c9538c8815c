"""SHA-256 manifests of model artifacts, and the private directory replicas cache them in.

Registration writes ``aiaas_manifest.json`` (the digest of every other file of the artifact) into
the logged model directory and records the manifest's own digest as the version's
``aiaas.artifact_sha256`` tag. A replica checks its local copy against both before anything in it
is opened, so what loads is byte for byte what was registered.

Standard library only: the ONNX path of a replica's start must not import torch or MLflow.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

from aiaas import errors

#: The manifest's file name, at the top of the artifact.
MANIFEST = "aiaas_manifest.json"
_BLOCK = 1 << 20


def file_sha256(path: Path) -> str:
    """The SHA-256 hex digest of one file, read in blocks (artifacts reach hundreds of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> str:
    """Write the manifest of every file under ``directory``; returns the manifest's digest.

    The file holds the canonical JSON (sorted keys, no spaces), so the digest of its bytes is the
    digest of the manifest itself and a reader needs no JSON to check it.

    Raises:
        StorageError: The directory holds a symbolic link (an artifact holds plain files only).
    """
    files = {name: file_sha256(directory / name) for name in _files(directory, "registration")}
    files.pop(MANIFEST, None)
    body = json.dumps({"files": files, "version": 1}, sort_keys=True, separators=(",", ":"))
    (directory / MANIFEST).write_bytes(body.encode())
    return hashlib.sha256(body.encode()).hexdigest()


def verify(directory: Path, expected: str, label: str) -> None:
    """Check a local copy against its manifest and the manifest against the recorded digest.

    On any mismatch the copy is removed, so the next load downloads it again.

    Args:
        directory: The local copy of the artifact.
        expected: The manifest digest recorded at registration.
        label: ``NAME:VERSION``, for the message.

    Raises:
        StorageError: A file is missing, extra, a link, or differs from what was registered.
    """
    problem = _problem(directory, expected)
    if problem is None:
        return
    shutil.rmtree(directory, ignore_errors=True)
    raise errors.StorageError(
        f"{label}: {problem} (cached copy in {directory}); nothing of it was loaded",
        "The damaged copy was removed, so the next load downloads the artifact again; if this "
        "error comes back, the registry's copy is damaged: register the model again.",
    )


def _problem(directory: Path, expected: str) -> str | None:
    manifest = directory / MANIFEST
    if not manifest.is_file() or manifest.is_symlink():
        return f"the artifact has no {MANIFEST}"
    body = manifest.read_bytes()
    if hashlib.sha256(body).hexdigest() != expected:
        return f"{MANIFEST} does not match the SHA-256 recorded at registration"
    recorded: dict[str, str] = json.loads(body)["files"]
    try:
        present = set(_files(directory, "load")) - {MANIFEST}
    except errors.StorageError as exc:
        return exc.message
    extra, missing = sorted(present - recorded.keys()), sorted(recorded.keys() - present)
    if extra:
        return f"file '{extra[0]}' is not part of the registered artifact"
    if missing:
        return f"file '{missing[0]}' of the registered artifact is missing"
    for name in sorted(recorded):
        if file_sha256(directory / name) != recorded[name]:
            return f"file '{name}' does not match the SHA-256 recorded at registration"
    return None


def _files(directory: Path, stage: str) -> list[str]:
    """Every regular file below ``directory``, as POSIX paths relative to it."""
    found = []
    for parent, subdirectories, names in os.walk(directory):
        for name in [*subdirectories, *names]:
            path = Path(parent) / name
            if path.is_symlink():
                # A link could point anywhere on the machine; its target was never registered.
                raise errors.StorageError(
                    f"'{path.relative_to(directory).as_posix()}' is a symbolic link",
                    f"Artifacts hold plain files only (found at {stage}).",
                )
        found += [(Path(parent) / name).relative_to(directory).as_posix() for name in names]
    return sorted(found)


def private_root(root: Path) -> Path:
    """The model cache root, created ``0700``; refused when another user could write to it.

    The default root sits in the machine's shared temp directory, where anyone may create
    ``aiaas-models`` first and plant artifacts in it for our replicas to load.

    Raises:
        StorageError: The directory (or the link it is) belongs to another user, is writable by
            group or others, or is not a directory.
    """
    try:
        root.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    else:
        os.chmod(root, 0o700)  # mkdir's mode is reduced by the umask, never widened
    me = os.geteuid()
    hint = (
        "Set AIAAS_MODEL_CACHE to a directory only this user can write (it is created with "
        f"mode 0700), or remove {root} so it is created again."
    )
    link = root.lstat()
    if stat.S_ISLNK(link.st_mode) and link.st_uid != me:
        raise errors.StorageError(
            f"model cache {root} is a symbolic link owned by uid {link.st_uid}, not by this "
            f"user (uid {me})",
            hint,
        )
    found = root.stat()
    if not stat.S_ISDIR(found.st_mode):
        raise errors.StorageError(f"model cache {root} is not a directory", hint)
    if found.st_uid != me:
        raise errors.StorageError(
            f"model cache {root} is owned by uid {found.st_uid}, not by this user (uid {me})",
            hint,
        )
    if found.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise errors.StorageError(
            f"model cache {root} is writable by other users "
            f"(mode {stat.S_IMODE(found.st_mode):04o})",
            hint,
        )
    return root
