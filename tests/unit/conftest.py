"""Unit tests run without Ray: starting it here is a mistake (as Ray Serve's disallow_ray_init)."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _disallow_ray_init(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("unit tests must not start Ray; move this test to tests/integration")

    monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture(autouse=True)
def _restore_environ() -> Any:
    """Commands under test point the process at a cluster's Ray auth (ray_auth.use): undo it."""
    import os

    from aiaas import settings

    saved = dict(os.environ)
    settings.current.cache_clear()  # read again: tests set the variables they need
    yield
    os.environ.clear()
    os.environ.update(saved)
    settings.current.cache_clear()
