"""Deploy, switch, undo, rollback and delete against a fake dashboard and fake app status routes
(tests/serve_dashboard.py), with the registry and its aliases faked in memory: no Ray, no MLflow.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from aiaas import aliases, errors, ray_auth, registry, serving
from aiaas.config import loader
from aiaas.config.cluster import ClusterConfig
from aiaas.serving import control_plane
from tests import support
from tests.serve_dashboard import ServeDouble

DIGITS = Path("configs/serve/digits.yaml")
OTHER_APP = {"name": "other", "route_prefix": "/other", "import_path": "other_pkg.app:build"}


@dataclass
class FakeRegistry:
    """digits-mlp versions 1..5, all ONNX; ``production`` on 3; every alias move recorded."""

    holders: dict[tuple[str, str], str] = field(
        default_factory=lambda: {("digits-mlp", "production"): "3"}
    )
    moves: list[tuple[str, str, str]] = field(default_factory=list)  # action, alias, to

    def resolve(self, ref: registry.ModelRef, uri: str | None = None, **_: Any) -> registry.Version:
        number = ref.version or self.holders[(ref.name, str(ref.alias))]
        return registry.Version(
            name=ref.name,
            version=number,
            run_id=f"r{number}",
            created=0.0,
            tags={
                registry.FORMAT_TAG: "onnx",
                registry.READY_TAG: "true",
                registry.ARTIFACT_DIGEST_TAG: f"sha-{number}",
            },
            source=f"models:/m-{number}",
        )

    def holder(self, name: str, alias: str, uri: str | None = None) -> str | None:
        return self.holders.get((name, alias))

    def move(self, action: str, name: str, alias: str, version: str) -> aliases.Move:
        before = self.holders.get((name, alias))
        self.holders[(name, alias)] = version
        self.moves.append((action, alias, version))
        return aliases.Move(alias, version, before, action, "test", time.time())


@pytest.fixture
def fake_registry(monkeypatch: pytest.MonkeyPatch) -> FakeRegistry:
    fake = FakeRegistry()
    monkeypatch.setattr(registry, "resolve", fake.resolve)
    monkeypatch.setattr(aliases, "holder", fake.holder)
    monkeypatch.setattr(
        aliases, "move_back", lambda n, a, v, uri=None: fake.move("move_back", n, a, v)
    )

    def rollback(name: str, alias: str = "production", uri: str | None = None) -> aliases.Move:
        return fake.move("rollback", name, alias, str(int(fake.holders[(name, alias)]) - 1))

    monkeypatch.setattr(aliases, "rollback", rollback)
    return fake


@pytest.fixture
def serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[ServeDouble, ClusterConfig]]:
    config = loader.load(support.write_cluster_config(tmp_path, "srv", workers=0), ClusterConfig)
    cluster = config.model_copy(
        update={
            "auth_mode": "token",
            "ports": config.ports.model_copy(update={"dashboard": 0}),
        }
    )
    ray_auth.ensure_token(cluster)
    token = ray_auth.read_token(cluster)
    double = ServeDouble(token=token)
    cluster = cluster.model_copy(
        update={"ports": cluster.ports.model_copy(update={"dashboard": double.port})}
    )
    monkeypatch.setenv(ray_auth.TOKEN_VAR, token)  # what the CLI's ray_auth.use sets
    monkeypatch.setattr(control_plane, "SETTLE_S", 0.0)
    monkeypatch.setattr(control_plane, "POLL_S", 0.01)
    try:
        yield double, cluster
    finally:
        double.close()


def _pins(body: dict[str, Any], app: str) -> dict[str, Any]:
    found = next(a for a in body["applications"] if a["name"] == app)
    entry = next(d for d in found["deployments"] if d["name"] == "ModelServer")
    user_config: dict[str, Any] = entry["user_config"]
    return user_config


def _deployed(double: ServeDouble, cluster: ClusterConfig) -> None:
    double.apply({"applications": [OTHER_APP]})
    assert serving.deploy(cluster, DIGITS, timeout_s=5) == ["digits"]


def test_deploy_pins_resolved_versions_beside_running_apps(
    serve: tuple[ServeDouble, ClusterConfig], fake_registry: FakeRegistry
) -> None:
    double, cluster = serve
    _deployed(double, cluster)
    body = double.puts[-1]
    assert [a["name"] for a in body["applications"]] == ["other", "digits"]
    # Serve keeps its first HTTP options: the running ones are sent, not the file's.
    assert body["http_options"] == {"host": "127.0.0.1", "port": double.port}
    user_config = _pins(body, "digits")
    assert user_config["versions"] == {"digits": "3"}
    assert (
        user_config["version_records"]["digits"]
        == fake_registry.resolve(registry.ModelRef("digits-mlp", version="3")).pin()
    )
    # The file's own settings go as written, nothing Serve would default.
    digits = body["applications"][1]
    assert digits["args"]["max_batch_size"] == 32 and "docs_path" not in digits

    url, apps = serving.status(cluster)
    assert url == f"http://127.0.0.1:{double.port}"
    row = next(a for a in apps if a.name == "digits")
    assert (row.status, row.route_prefix, row.replicas, row.last_failure) == (
        "RUNNING",
        "/v1/models",
        {"RUNNING": 1},
        None,
    )
    [model] = row.models
    assert (model["version"], model["pinned"], model["url"]) == (
        "3",
        "3",
        f"POST {url}/v1/models/digits:predict",
    )
    # Key-protected status routes are asked with the cluster's Ray token.
    assert double.status_asks[-1] == ("/v1/models/digits", f"Bearer {double.token}")
    assert serving.apps_serving(cluster, "digits-mlp", "3") == ["digits/digits"]


def test_deploy_dry_run_resolves_and_sends_nothing(
    serve: tuple[ServeDouble, ClusterConfig], fake_registry: FakeRegistry
) -> None:
    double, cluster = serve
    assert serving.deploy(cluster, DIGITS, dry_run=True) == ["digits"]
    assert double.puts == []


def test_a_deploy_that_fails_puts_the_previous_apps_back(
    serve: tuple[ServeDouble, ClusterConfig], fake_registry: FakeRegistry
) -> None:
    double, cluster = serve
    double.failing["3"] = "The deployment failed to start 3 times in a row."
    double.apply({"applications": [OTHER_APP]})
    with pytest.raises(errors.DeployError) as caught:
        serving.deploy(cluster, DIGITS, timeout_s=5)
    assert caught.value.message == (
        "Serve app 'digits' is DEPLOY_FAILED: The deployment failed to start 3 times in a row. "
        "The deployment failed to start 3 times in a row."
    )
    assert [a["name"] for a in double.puts[-1]["applications"]] == ["other"]


def test_promote_switches_the_apps_that_follow_the_alias(
    serve: tuple[ServeDouble, ClusterConfig], fake_registry: FakeRegistry
) -> None:
    double, cluster = serve
    _deployed(double, cluster)
    fake_registry.holders[("digits-mlp", "production")] = "4"
    assert serving.follow_alias(cluster, "digits-mlp", "production", "4", timeout_s=5) == ["digits"]
    assert _pins(double.puts[-1], "digits")["versions"] == {"digits": "4"}
    assert double.served[("digits", "digits")] == "4"
    # The app that serves no registered model goes back as it ran.
    assert double.puts[-1]["applications"][0] == OTHER_APP
    # An alias no app follows switches nothing.
    assert serving.follow_alias(cluster, "digits-mlp", "staging", "5") == []


def test_a_switch_a_replica_cannot_load_is_undone(
    serve: tuple[ServeDouble, ClusterConfig], fake_registry: FakeRegistry
) -> None:
    double, cluster = serve
    _deployed(double, cluster)
    double.broken["5"] = "weights digest mismatch"
    fake_registry.holders[("digits-mlp", "production")] = "5"  # models promote moved it
    with pytest.raises(errors.DeployError) as caught:
        serving.follow_alias(cluster, "digits-mlp", "production", "5", timeout_s=5)
    assert caught.value.message == (
        "app 'digits' could not load digits version 5: weights digest mismatch; the apps went "
        "back to the versions they served and digits-mlp@production was rolled back"
    )
    # The previous config was PUT back, the alias moved back, the failure recorded.
    assert _pins(double.puts[-1], "digits")["versions"] == {"digits": "3"}
    assert double.puts[-1] == double.puts[-3]
    assert fake_registry.moves == [("move_back", "production", "3")]
    _, apps = serving.status(cluster)
    failure = next(a for a in apps if a.name == "digits").last_failure
    assert failure is not None
    assert (failure["model"], failure["error"]) == (
        "digits-mlp:5",
        "app 'digits' could not load digits version 5: weights digest mismatch",
    )


def test_rollback_moves_the_alias_back_and_the_app_follows(
    serve: tuple[ServeDouble, ClusterConfig], fake_registry: FakeRegistry
) -> None:
    double, cluster = serve
    _deployed(double, cluster)
    fake_registry.holders[("digits-mlp", "production")] = "4"
    serving.follow_alias(cluster, "digits-mlp", "production", "4", timeout_s=5)
    assert serving.rollback(cluster, "digits") == ["digits-mlp@production: 4 → 3"]
    assert double.served[("digits", "digits")] == "3"
    with pytest.raises(errors.ConfigError) as caught:
        serving.rollback(cluster, "other")
    assert caught.value.message == (
        "Serve app 'other' serves no registered model; roll it back with its own config"
    )


def test_delete_keeps_the_other_apps(
    serve: tuple[ServeDouble, ClusterConfig], fake_registry: FakeRegistry
) -> None:
    double, cluster = serve
    _deployed(double, cluster)
    serving.delete(cluster, "other")
    assert [a["name"] for a in double.puts[-1]["applications"]] == ["digits"]
    with pytest.raises(errors.ConfigError) as caught:
        serving.delete(cluster, "nope")
    assert caught.value.message == "no Serve app 'nope' (apps: digits)"


def test_an_app_on_a_running_apps_route_prefix_is_refused_before_serve_sees_it(
    serve: tuple[ServeDouble, ClusterConfig], fake_registry: FakeRegistry, tmp_path: Path
) -> None:
    double, cluster = serve
    double.apply({"applications": [{**OTHER_APP, "route_prefix": "/v1/models"}]})
    with pytest.raises(errors.ConfigError) as refused:
        serving.deploy(cluster, DIGITS, timeout_s=5)
    assert "app 'digits' wants route prefix /v1/models, which app 'other' holds" in str(
        refused.value.message
    )
    assert "aiaas serve delete other" in refused.value.hint
    assert double.puts == []


def _llm_registry(monkeypatch: pytest.MonkeyPatch, adapter_parent: str) -> None:
    """smollm2:1 (a causal LM), iso-dates:1 (an adapter trained on ``adapter_parent``) and
    digits-mlp:3 (a classifier)."""
    formats = {"smollm2": "hf-causal-lm", "iso-dates": "hf-lora-adapter", "digits-mlp": "onnx"}

    def resolve(ref: registry.ModelRef, uri: str | None = None, **_: Any) -> registry.Version:
        tags = {registry.FORMAT_TAG: formats[ref.name], registry.READY_TAG: "true"}
        if ref.name == "iso-dates":
            tags[registry.LINEAGE_PREFIX + "parent"] = adapter_parent
        return registry.Version(
            name=ref.name, version=ref.version or "1", run_id="r", created=0.0, tags=tags
        )

    monkeypatch.setattr(registry, "resolve", resolve)


def _llm_config(tmp_path: Path, models: list[dict[str, str]]) -> Path:
    import yaml

    config = yaml.safe_load((support.REPO / "configs/serve/llm_adapters.yaml").read_text())
    config["applications"][0]["args"]["models"] = models
    path = tmp_path / "llm.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


BASE = {"name": "smollm2", "model": "smollm2@production"}
ADAPTER = {"name": "iso-dates", "model": "iso-dates@production", "adapter_of": "smollm2"}


def test_an_adapter_is_pinned_beside_the_base_model_it_was_trained_on(
    serve: tuple[ServeDouble, ClusterConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, cluster = serve
    _llm_registry(monkeypatch, "smollm2:1")
    assert serving.deploy(cluster, _llm_config(tmp_path, [BASE, ADAPTER]), dry_run=True) == ["llm"]


@pytest.mark.parametrize(
    ("models", "parent", "message"),
    [
        (
            [BASE, {**ADAPTER, "adapter_of": None}],
            "smollm2:1",
            "model 'iso-dates': iso-dates:1 is a 'hf-lora-adapter' model; a base model entry "
            "needs a 'hf-causal-lm' one",
        ),
        (
            [BASE, {**ADAPTER, "model": "smollm2:1"}],
            "smollm2:1",
            "model 'iso-dates': smollm2:1 is a 'hf-causal-lm' model; adapter_of needs a "
            "'hf-lora-adapter' one",
        ),
        (
            [BASE, ADAPTER],
            "llama:2",
            "model 'iso-dates': iso-dates:1 was trained on llama:2 base model, but 'smollm2' "
            "serves smollm2:1",
        ),
    ],
)
def test_an_adapter_that_does_not_fit_its_entry_is_refused_before_serve_sees_it(
    serve: tuple[ServeDouble, ClusterConfig],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    models: list[dict[str, Any]],
    parent: str,
    message: str,
) -> None:
    double, cluster = serve
    _llm_registry(monkeypatch, parent)
    with pytest.raises(errors.ConfigError) as refused:
        serving.deploy(cluster, _llm_config(tmp_path, models), dry_run=True)
    assert message in refused.value.message
    assert double.puts == []


def test_an_adapter_of_no_base_entry_is_a_config_error_naming_the_field(tmp_path: Path) -> None:
    path = _llm_config(tmp_path, [BASE, {**ADAPTER, "adapter_of": "smollm3"}])
    with pytest.raises(errors.ConfigError) as refused:
        serving.read_config(path)
    text = str(refused.value)
    assert "models" in text and "'iso-dates' is an adapter of 'smollm3', which is no base" in text
