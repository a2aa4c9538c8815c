"""The storage root: a local directory or an s3:// / gs:// URI, reached through pyarrow.fs.

Everything that must outlive a cluster (data sets, checkpoints, job records, the registry, the
cluster's own record of what it started) lives here, under relative paths such as
``clusters/local/state.json``.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from urllib.parse import urlparse

from pyarrow import fs as pafs

from aiaas import errors


class Storage:
    """Files under one storage root.

    Args:
        root: A local path (``~`` is expanded), ``file://``, ``s3://`` or ``gs://`` URI.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        parsed = urlparse(root)
        if parsed.scheme in ("s3", "gs"):
            try:
                self._fs, self._base = pafs.FileSystem.from_uri(root)
            except Exception as exc:  # pyarrow raises several types for bad URIs/credentials
                raise errors.StorageError(
                    f"storage root {root} cannot be opened: {exc}",
                    "Check the URI and the credentials in the environment.",
                ) from None
        else:
            local = parsed.path if parsed.scheme == "file" else root
            self._fs = pafs.LocalFileSystem()
            self._base = os.path.abspath(os.path.expanduser(local))

    @property
    def is_local(self) -> bool:
        """True when the root is a directory on this machine."""
        return isinstance(self._fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        """The full path of a file under the root, as the filesystem names it.

        Raises:
            StorageError: A part would leave the root (``..``, an absolute path, a NUL): parts
                are built from names and ids that users type.
        """
        for part in parts:
            _check_inside(part)
        return "/".join([self._base.rstrip("/"), *parts])

    def read_text(self, relative: str) -> str | None:
        """The file's text, or None when it does not exist."""
        full = self.path(relative)
        if self._fs.get_file_info(full).type == pafs.FileType.NotFound:
            return None
        with self._fs.open_input_stream(full) as stream:
            return bytes(stream.read()).decode("utf-8")

    def write_text(self, relative: str, text: str) -> str:
        """Write a file so readers see the old or the new content, never half of it.

        Returns:
            The full path written.
        """
        return self.write_bytes(relative, text.encode("utf-8"))

    def write_bytes(self, relative: str, data: bytes) -> str:
        """Write a file atomically (see :meth:`write_text`); returns the full path."""
        full = self.path(relative)
        parent = full.rsplit("/", 1)[0]
        try:
            self._fs.create_dir(parent, recursive=True)
            if self.is_local:
                _replace_durably(full, data)
            else:
                # Object stores replace whole objects on write, which is already atomic.
                with self._fs.open_output_stream(full) as stream:
                    stream.write(data)
        except OSError as exc:
            raise errors.StorageError(
                f"cannot write {full}: {exc}",
                "Make the storage root writable, or set another 'storage_root' in the "
                "cluster config.",
            ) from None
        return full

    def children(self, relative: str) -> list[str]:
        """Names of the entries directly under a directory; empty when it does not exist."""
        selector = pafs.FileSelector(self.path(relative), allow_not_found=True)
        return sorted(info.base_name for info in self._fs.get_file_info(selector))

    def delete(self, relative: str) -> None:
        """Remove a file if it exists."""
        full = self.path(relative)
        if self._fs.get_file_info(full).type != pafs.FileType.NotFound:
            self._fs.delete_file(full)


def _replace_durably(full: str, data: bytes) -> None:
    """Write a temporary file, fsync it, rename it over ``full`` and fsync the directory: after
    a crash (a killed head, a lost machine) readers find the old file or the new one, whole."""
    temporary = f"{full}.{uuid.uuid4().hex}.tmp"
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, full)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    directory = os.open(os.path.dirname(full), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _check_inside(part: str) -> None:
    segments = part.replace("\\", "/").split("/")
    if part.startswith(("/", "~")) or "\0" in part or ".." in segments:
        raise errors.StorageError(
            f"'{part}' is not a path under the storage root: names, ids and key files must not "
            "contain '..', start with '/' or '~', or hold a NUL character",
            "Use a plain name (e.g. 'digits') or the id 'aiaas jobs list' shows; key files are "
            "relative to the storage root (e.g. serve/keys.json).",
        )
