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


def test_the_demo_serve_file_holds_each_apps_own_file() -> None:
    """configs/serve/demo.yaml is the three apps' files in one (Ray's `serve deploy FILE`
    replaces every running app), differing only where apps must differ beside each other."""
    import yaml

    serve = Path(__file__).resolve().parents[2] / "configs" / "serve"
    demo = yaml.safe_load((serve / "demo.yaml").read_text())
    apps = {app["name"]: app for app in demo["applications"]}
    for name, file in (
        ("digits", "digits.yaml"),
        ("embeddings", "embeddings.yaml"),
        ("llm", "llm.yaml"),
    ):
        own = yaml.safe_load((serve / file).read_text())
        assert own["http_options"] == demo["http_options"]
        expected = dict(own["applications"][0])
        if name == "embeddings":  # the LLM app holds /v1; the embeddings URLs stay the same
            expected["route_prefix"] = "/v1/embeddings"
        assert apps[name] == expected, name
    assert len({app["route_prefix"] for app in apps.values()}) == len(apps)
