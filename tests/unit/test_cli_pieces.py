"""The plain functions under the commands: the registry check, `models show`'s lineage walk,
`models optimize`'s staged config, and the submit/follow/report block of the job commands."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from aiaas import errors, model_card, registry
from aiaas.config import loader
from aiaas.config.cluster import ClusterConfig
from aiaas.storage import Storage
from tests import support

REPO = Path(__file__).resolve().parents[2]


def _version(number: str, fmt: str = "torch", **lineage: str) -> registry.Version:
    tags = {registry.FORMAT_TAG: fmt, registry.READY_TAG: "true"}
    tags.update({f"{registry.LINEAGE_PREFIX}{key}": value for key, value in lineage.items()})
    return registry.Version(
        name="digits-mlp", version=number, run_id=f"r{number}", created=0.0, tags=tags
    )


def _cluster(**mlflow: Any) -> ClusterConfig:
    config = loader.load(REPO / "configs/cluster/local.yaml", ClusterConfig)
    return config.model_copy(update={"mlflow": config.mlflow.model_copy(update=mlflow)})


def test_the_registry_check_returns_the_url_and_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(errors.ClusterError) as disabled:
        registry.server_url(_cluster(enabled=False))
    assert str(disabled.value) == (
        "the cluster 'local' has MLflow disabled, so it has no model registry\n"
        "Set mlflow.enabled: true in the cluster config and run 'aiaas cluster up'."
    )
    port = support.free_ports(1)[0]
    with pytest.raises(errors.ClusterError) as silent:
        registry.server_url(_cluster(port=port))
    assert str(silent.value) == (
        f"the model registry (MLflow) at http://127.0.0.1:{port} is not answering\n"
        "Start the cluster (it starts MLflow): aiaas cluster up"
    )
    assert "MLFLOW_TRACKING_URI" not in os.environ
    # Pointing this process at it is its own, explicit call.
    registry.use_server(f"http://127.0.0.1:{port}")
    assert registry.tracking_uri() == f"http://127.0.0.1:{port}"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"


def test_lineage_walks_parents_back_to_the_original_and_stops_on_a_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    known = {
        "1": _version("1", job_id="aiaas-train-1"),
        "2": _version("2", "onnx", parent="digits-mlp:1", method="onnx"),
        "3": _version("3", "onnx", parent="digits-mlp:4"),
        "4": _version("4", parent="digits-mlp:3"),
    }
    monkeypatch.setattr(registry, "resolve", lambda ref, uri=None: known[ref.version])
    chain = model_card.lineage(known["2"], "http://registry")
    assert [(step.version, step.format, step.tags) for step in chain] == [
        ("2", "onnx", {"parent": "digits-mlp:1", "method": "onnx"}),
        ("1", "torch", {"job_id": "aiaas-train-1"}),
    ]
    assert [step.version for step in model_card.lineage(known["3"])] == ["3", "4"]


def test_optimize_config_is_checked_and_staged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jobs import staging

    storage = Storage(str(tmp_path))
    parents = {"2": _version("2"), "5": _version("5", "onnx", parent="digits-mlp:2")}
    monkeypatch.setattr(registry, "resolve", lambda ref, uri=None: parents[ref.version])
    staged = staging.optimize_config(
        "digits-mlp:2", "onnx", 0.5, None, None, uri="http://registry", storage=storage
    )
    assert staged.config.name == "digits-mlp-v2-onnx"
    assert staged.parent.version == "2"
    assert staged.path == Path(storage.path("optimize", "digits-mlp-v2-onnx.yaml"))
    assert yaml.safe_load(staged.path.read_text()) == {
        "kind": "optimize",
        "model": "digits-mlp:2",
        "method": "onnx",
        "gate": {"max_accuracy_drop": 0.5, "max_latency_ratio": None},
    }
    with pytest.raises(errors.ConfigError) as refused:
        staging.optimize_config(
            "digits-mlp:5", "dynamic-int8", 0.5, 1.0, "x", uri="u", storage=storage
        )
    assert str(refused.value) == (
        "dynamic-int8 converts an eager PyTorch model, but digits-mlp:5 is 'onnx'\n"
        "Optimize the version it was made from: digits-mlp:2"
    )
    with pytest.raises(errors.ConfigError, match="digits-mlp"):
        staging.optimize_config("digits-mlp", "onnx", 0.5, None, None, uri="u", storage=storage)


class _Record:
    def __init__(self, status: str, result: dict[str, Any] | None = None) -> None:
        self.submission_id = "aiaas-train-x"
        self.address = "http://127.0.0.1:8265"
        self.status = status
        self.result = result
        self.message = None


def test_submit_and_report_prints_next_steps_or_the_outcome(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from aiaas_cli import submission
    from jobs import submit

    calls: list[Any] = []
    monkeypatch.setattr(submit, "submit", lambda *args: calls.append(args) or _Record("PENDING"))
    reported: list[str] = []

    def run(follow: bool, stream: bool = True) -> None:
        submission.submit_and_report(
            "train",
            Path("c.yaml"),
            object(),
            "cluster",  # type: ignore[arg-type]
            follow=follow,
            next_steps=("aiaas jobs status {id}",),
            report=lambda final: reported.append(final.status),
            stream=stream,
        )

    run(follow=False)
    assert capsys.readouterr().out == (
        "Submitted aiaas-train-x to http://127.0.0.1:8265\n\nNext:\n  aiaas jobs status aiaas-train-x\n"
    )
    assert calls[0][0] == "train" and calls[0][4] == ()

    monkeypatch.setattr(submit, "follow", lambda cluster, job, on_line: _Record("SUCCEEDED"))
    run(follow=True)
    assert reported == ["SUCCEEDED"]

    failed = _Record("FAILED", {"error": "boom"})
    monkeypatch.setattr(submit, "wait", lambda cluster, job: failed)
    with pytest.raises(SystemExit) as exited:
        run(follow=True, stream=False)
    assert exited.value.code == 1
    assert capsys.readouterr().err == "Error: job aiaas-train-x FAILED: boom\n"
    assert reported == ["SUCCEEDED", "FAILED"]
