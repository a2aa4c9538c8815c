"""The storage root: atomic writes, reads of missing files, local paths and file:// URIs."""

from __future__ import annotations

from pathlib import Path

import pytest

from aiaas import errors
from aiaas.storage import Storage


@pytest.mark.parametrize("as_uri", [False, True])
def test_write_read_delete(tmp_path: Path, as_uri: bool) -> None:
    storage = Storage(f"file://{tmp_path}" if as_uri else str(tmp_path))
    assert storage.is_local
    assert storage.read_text("a/b/state.json") is None
    written = storage.write_text("a/b/state.json", '{"x": 1}')
    assert written == str(tmp_path / "a" / "b" / "state.json")
    assert storage.read_text("a/b/state.json") == '{"x": 1}'
    storage.write_text("a/b/state.json", '{"x": 2}')
    assert storage.read_text("a/b/state.json") == '{"x": 2}'
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == [
        "state.json"
    ]  # no temp left
    storage.delete("a/b/state.json")
    storage.delete("a/b/state.json")  # deleting what is gone is fine
    assert storage.read_text("a/b/state.json") is None


def test_home_is_expanded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Storage("~/.aiaas").path("x") == f"{tmp_path}/.aiaas/x"


def test_unwritable_root_is_a_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(errors.StorageError) as caught:
        Storage(str(blocker)).write_text("clusters/x/state.json", "{}")
    assert str(caught.value).startswith(f"cannot write {blocker}/clusters/x/state.json:")


@pytest.mark.parametrize(
    "relative",
    ["../escape.json", "jobs/../../etc/passwd", "/etc/passwd", "~/x", "a\\..\\b", "a\0b"],
)
def test_paths_that_leave_the_storage_root_are_refused(tmp_path: Path, relative: str) -> None:
    from aiaas.storage import Storage

    with pytest.raises(errors.StorageError) as caught:
        Storage(str(tmp_path)).read_text(relative)
    assert str(caught.value).startswith(f"'{relative}' is not a path under the storage root")
