"""Every shipped config validates, so `aiaas validate configs/**/*.yaml` passes."""

from __future__ import annotations

from pathlib import Path

import pytest

from aiaas.config import loader

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*.yaml"))


def test_configs_are_shipped() -> None:
    assert CONFIGS, "configs/ holds no YAML files"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: str(path.relative_to(path.parents[1])))
def test_shipped_config_validates(path: Path) -> None:
    loader.check(path)
