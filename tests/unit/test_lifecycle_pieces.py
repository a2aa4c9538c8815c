"""Pure pieces of the model lifecycle and serving: references, alias history, API keys,
optimize and Serve config messages."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest

from aiaas import aliases, api_keys, errors, model_ref
from aiaas.config import loader
from aiaas.config.optimize import OptimizeConfig
from aiaas.config.tune import TuneConfig
from aiaas.storage import Storage


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("digits-mlp", model_ref.ModelRef("digits-mlp")),
        ("digits-mlp:12", model_ref.ModelRef("digits-mlp", version="12")),
        ("digits-mlp@production", model_ref.ModelRef("digits-mlp", alias="production")),
    ],
)
def test_references_parse(text: str, expected: model_ref.ModelRef) -> None:
    assert model_ref.parse_ref(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize("text", ["", "a b", "digits:v1", "digits@", "digits:1@prod"])
def test_bad_references_say_how_to_write_one(text: str) -> None:
    with pytest.raises(errors.ConfigError) as caught:
        model_ref.parse_ref(text)
    assert str(caught.value) == (
        f"'{text}' is not a model reference\n"
        "Write NAME:VERSION (e.g. digits-mlp:3) or NAME@ALIAS (e.g. digits-mlp@production)."
    )


def test_a_bare_name_is_no_version_where_one_is_needed() -> None:
    with pytest.raises(errors.ConfigError):
        model_ref.parse_ref("digits-mlp", needs_version=True)


def _move(action: str, frm: str | None, to: str, at: float) -> aliases.Move:
    return aliases.Move("production", to, frm, action, "me", at)


def test_rollback_replays_the_alias_history_as_a_stack() -> None:
    moves = [
        _move("promote", None, "1", 1),
        _move("promote", "1", "2", 2),
        _move("promote", "2", "3", 3),
        _move("rollback", "3", "2", 4),
    ]
    assert aliases._stack(moves) == ["1", "2"]
    assert aliases._stack([*moves, _move("rollback", "2", "1", 5)]) == ["1"]
    # An alias set outside aiaas before its first recorded move is the bottom of the stack.
    assert aliases._stack([_move("promote", "7", "8", 1)]) == ["7", "8"]


def test_keys_are_stored_hashed_checked_limited_and_revoked(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    key = api_keys.create(storage, "keys.json", "ci", rate_limit_per_s=2)
    other = api_keys.create(storage, "keys.json", "bulk", rate_limit_per_s=None)
    text = (tmp_path / "keys.json").read_text()
    assert key not in text and other not in text and api_keys.digest(key) in text
    ring = api_keys.KeyRing(storage, "keys.json")
    assert ring.check(f"Bearer {key}") == "ci"
    assert ring.check(f"bearer {other}") == "bulk"
    for header, code in [
        (None, "missing_api_key"),
        ("Basic abc", "missing_api_key"),
        ("Bearer aiaas_nope", "invalid_api_key"),
    ]:
        with pytest.raises(api_keys.Denied) as denied:
            ring.check(header)
        assert (denied.value.status, denied.value.code) == (401, code)
    ring.check(f"Bearer {key}")  # the second of the 2 allowed this second
    with pytest.raises(api_keys.Denied) as limited:
        ring.check(f"Bearer {key}")
    assert limited.value.status == 429
    assert "limited to 2 requests/s" in limited.value.message
    with pytest.raises(errors.ConfigError, match="a key named 'ci' already exists"):
        api_keys.create(storage, "keys.json", "ci", None)
    api_keys.revoke(storage, "keys.json", "bulk")
    ring._loaded = time.monotonic() - 10  # as after the reload interval
    with pytest.raises(api_keys.Denied):
        ring.check(f"Bearer {other}")
    with pytest.raises(errors.ConfigError, match="no live key named 'bulk'"):
        api_keys.revoke(storage, "keys.json", "bulk")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_optimize_config_gets_a_default_name_and_checks_the_reference(tmp_path: Path) -> None:
    config = loader.load(
        _write(tmp_path, "kind: optimize\nmodel: digits-mlp:3\nmethod: onnx\n"), OptimizeConfig
    )
    assert config.name == "digits-mlp-v3-onnx"
    assert config.gate.max_accuracy_drop == 0.5 and config.gate.max_latency_ratio is None
    with pytest.raises(errors.ConfigError) as caught:
        loader.load(_write(tmp_path, "kind: optimize\nmodel: digits-mlp\nmethod: fp16\n"))
    message = str(caught.value)
    assert "• model (line 2): 'digits-mlp' is not a model reference" in message
    assert "• method (line 3): Input should be 'dynamic-int8', 'torchscript' or 'onnx'" in message


def test_serve_files_are_checked_against_the_apps_args(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
        applications:
          - name: digits
            route_prefix: /v1/models
            import_path: serve_apps.model_server:build_app
            args:
              models: [{name: digits, model: digits-mlp@production}]
              max_batch_sise: 8
              max_payload_bytes: 10
        """,
    )
    with pytest.raises(errors.ConfigError) as caught:
        loader.check(path)
    assert str(caught.value) == (
        f"{path}: not a valid Ray Serve config (2 problems):\n"
        "  • applications[0].args.max_payload_bytes (line 8): Input should be greater than or "
        "equal to 1024\n"
        "  • applications[0].args.max_batch_sise (line 7): unknown field; did you mean "
        "'max_batch_size'?"
    )


def test_tune_configs_name_each_bad_search(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
        kind: tune
        name: t
        train: configs/train/tiny/digits_mlp.yaml
        search_space:
          optimizer.lr: {loguniform: [0.01, 0.001]}
          optimizer.learning_rate: {uniform: [0.1, 0.2]}
          batch_size: {choice: []}
          model.dropout: {uniform: [0.1, 0.2], choice: [0.1]}
        metric: f1
        """,
    )
    with pytest.raises(errors.ConfigError) as caught:
        loader.load(path)
    message = str(caught.value)
    assert (
        "• search_space.optimizer.lr (line 5): loguniform range [0.01, 0.001] is empty or "
        "inverted; use low < high" in message
    )
    assert "• search_space.batch_size (line 7): choice needs at least one value" in message
    assert (
        "give exactly one of uniform, loguniform, randint, choice, grid (got uniform, "
        "choice)" in message
    )
    assert (
        "• metric (line 9): the training job never reports 'f1'; use one of val_accuracy, "
        "val_loss, train_loss, train_accuracy" in message
    )


def test_tune_search_paths_must_be_train_fields(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
        kind: tune
        name: t
        train: configs/train/tiny/digits_mlp.yaml
        search_space:
          optimizer.learning_rate: {uniform: [0.1, 0.2]}
        """,
    )
    with pytest.raises(errors.ConfigError) as caught:
        loader.load(path)
    assert "'optimizer.learning_rate': optimizer has no field 'learning_rate'" in str(caught.value)


def test_tune_values_are_set_at_their_paths() -> None:
    from aiaas.config.tune import apply

    base = {"optimizer": {"lr": 0.1, "name": "adam"}, "epochs": 3}
    assert apply(base, {"optimizer.lr": 0.5, "epochs": 9}) == {
        "optimizer": {"lr": 0.5, "name": "adam"},
        "epochs": 9,
    }
    assert base["optimizer"]["lr"] == 0.1  # the base is left alone


def _drawn_trials(config: TuneConfig) -> list[dict[str, object]]:
    from ray import tune

    from jobs.tune import search_algorithm

    tune.register_trainable("aiaas_seed_probe", lambda _: None)
    search = search_algorithm(config.model_copy(update={"max_concurrent_trials": 100}))
    search.add_configurations(
        {"probe": {"run": "aiaas_seed_probe", "config": config.param_space(), "num_samples": 8}}
    )
    drawn = []
    while (trial := search.next_trial()) is not None:
        drawn.append(trial.config)
    return drawn


def test_a_tune_seed_draws_the_same_trials_again() -> None:
    config = loader.load("configs/tune/tiny/digits_mlp.yaml", TuneConfig)
    assert config.seed is not None
    first = _drawn_trials(config)
    assert len(first) == 8
    assert _drawn_trials(config) == first
    assert _drawn_trials(config.model_copy(update={"seed": config.seed + 1})) != first


def test_serve_failures_are_told_by_their_exception_not_their_frames() -> None:
    from aiaas.serving import control_plane

    inner = (
        "Traceback (most recent call last):\n"
        '  File "/ray/serve/_private/replica.py", line 4082, in initialize_callable\n'
        "    await self._call_func_or_gen(\n"
        "onnxruntime.capi.onnxruntime_pybind11_state.InvalidProtobuf: [ONNXRuntimeError] : 7 : "
        "INVALID_PROTOBUF : Load model failed: Protobuf parsing failed.\n"
    )
    message = (
        "The deployment failed to start 3 times in a row. See controller logs for details. "
        "Error:\nTraceback (most recent call last):\n"
        '  File "/ray/serve/_private/replica.py", line 1930, in initialize\n'
        f"RuntimeError: {inner}"
    )
    told = control_plane.said(["", message])
    assert told.startswith("The deployment failed to start 3 times in a row.")
    assert told.endswith("INVALID_PROTOBUF : Load model failed: Protobuf parsing failed.")
    assert "File " not in told and "line 4082" not in told
    assert control_plane.said(["plain words"]) == "plain words"


def test_a_replica_loads_a_recorded_pin_without_asking_the_registry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aiaas import registry, serve_http
    from aiaas.serving import apps

    # No registry at all: any question to it fails.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    pinned = registry.Version(
        name="digits-mlp",
        version="3",
        run_id="r3",
        created=0.0,
        tags={registry.FORMAT_TAG: "onnx", registry.READY_TAG: "true"},
        source="models:/m-3",
    )
    served = [apps.ServedModel(name="digits", model="digits-mlp@production")]
    user_config = {"versions": {"digits": "3"}, "version_records": {"digits": pinned.pin()}}
    slots = serve_http.Slots(served, lambda version: version, user_config)
    loaded = slots.loaded["digits"]
    assert (loaded.name, loaded.version, loaded.format, loaded.source, loaded.ready) == (
        "digits-mlp",
        "3",
        "onnx",
        "models:/m-3",
        True,
    )
    assert loaded.uri == "models:/digits-mlp/3"

    # A pin whose record names another version (or no record) goes to the registry.
    stale = {"versions": {"digits": "4"}, "version_records": {"digits": pinned.pin()}}
    with pytest.raises(errors.ClusterError, match="MLFLOW_TRACKING_URI"):
        serve_http.Slots(served, lambda version: version, stale)
    with pytest.raises(errors.ClusterError, match="MLFLOW_TRACKING_URI"):
        serve_http.Slots(served, lambda version: version, {"versions": {"digits": "3"}})


def test_pins_carry_a_record_only_for_versions_given_whole() -> None:
    from ray.serve.schema import ServeApplicationSchema

    from aiaas import registry
    from aiaas.serving import pins

    app = ServeApplicationSchema(import_path="serve_apps.model_server:build_app", name="digits")
    whole = registry.Version(
        name="digits-mlp",
        version="2",
        run_id="r2",
        created=0.0,
        tags={registry.FORMAT_TAG: "torch"},
        source="models:/m-2",
    )
    app = pins.pin(app, "ModelServer", {"digits": whole, "other": whole})
    user_config = app.model_dump(exclude_unset=True)["deployments"][0]["user_config"]
    assert user_config["versions"] == {"digits": "2", "other": "2"}
    assert user_config["version_records"]["digits"] == whole.pin()

    # A bare number (the registry could not be asked) drops the now stale record.
    app = pins.pin(app, "ModelServer", {"digits": "3"})
    user_config = app.model_dump(exclude_unset=True)["deployments"][0]["user_config"]
    assert user_config["versions"] == {"digits": "3", "other": "2"}
    assert set(user_config["version_records"]) == {"other"}
    assert pins.of(app, "ModelServer").versions == {"digits": "3", "other": "2"}
