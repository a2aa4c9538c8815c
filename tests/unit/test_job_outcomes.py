"""The pieces of the jobs that run without Ray: gate decisions on typed metrics, outcomes
through the job record and back, and the progress marker's lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aiaas import progress
from aiaas.config.optimize import OptimizeGate
from aiaas.config.train import RegisterSpec
from aiaas.storage import Storage
from jobs import entrypoint, gate, outcomes, records

_TEST = outcomes.TestMetrics(accuracy=0.9125, loss=0.31, rows=360)


def _figures(accuracy: float, p50: float) -> outcomes.PredictorFigures:
    return outcomes.PredictorFigures(
        accuracy=accuracy, p50_single_ms=p50, p99_single_ms=p50 * 2, batched_rows_per_s=1000.0
    )


def _report(delta_points: float, latency_ratio: float) -> outcomes.OptimizeReport:
    return outcomes.OptimizeReport(
        parent=_figures(0.95, 1.0),
        optimized=_figures(0.95 + delta_points / 100, latency_ratio),
        accuracy_delta_points=delta_points,
        latency_ratio_single=latency_ratio,
        throughput_ratio_batched=1.5,
        test_rows=360,
        batch_size=256,
        rounds=3,
        threads=1,
    )


def _trained() -> outcomes.TrainingOutcome:
    return outcomes.TrainingOutcome(
        run="digits",
        train_seconds=12.5,
        test=_TEST,
        epochs_run=1,
        history=[outcomes.EpochMetrics(epoch=0.0, train_loss=0.5, val_accuracy=0.9)],
        checkpoint="/runs/digits/checkpoint_000000",
    )


def test_training_gate_names_each_broken_condition() -> None:
    spec = RegisterSpec(model_name="digits", gate={"accuracy": ">= 0.95", "loss": "<= 0.5"})
    broken = gate.training_failures(spec, _TEST)
    assert broken == ["test accuracy 0.9125 is not >= 0.95"]
    assert gate.verdict(broken) == "failed: test accuracy 0.9125 is not >= 0.95"
    assert gate.verdict(gate.training_failures(RegisterSpec(model_name="digits"), _TEST)) == (
        "passed"
    )


@pytest.mark.parametrize(
    ("delta", "ratio", "expected"),
    [
        (-0.2, 0.8, []),
        (-1.0, 0.8, ["test accuracy dropped 1.00 points (allowed: 0.5)"]),
        (0.0, 1.3, ["p50 single-request latency is 1.30x the parent's (allowed: 1.2x)"]),
    ],
)
def test_optimize_gate_judges_the_report(delta: float, ratio: float, expected: list[str]) -> None:
    limits = OptimizeGate(max_accuracy_drop=0.5, max_latency_ratio=1.2)
    assert gate.optimize_failures(limits, _report(delta, ratio)) == expected


def test_a_failed_gate_is_refused_with_its_outcome() -> None:
    report = _report(-1.0, 0.8)
    with pytest.raises(entrypoint.GateFailed) as failed:
        gate.refuse("optimize", ["test accuracy dropped 1.00 points"], report)
    assert str(failed.value) == (
        "optimize gate failed: test accuracy dropped 1.00 points; nothing was registered"
    )
    assert failed.value.outcome is report


def test_training_outcome_keeps_its_file_form(tmp_path: Path) -> None:
    """Fields a job did not produce stay out of result.json, in the order it always had."""
    storage = Storage(str(tmp_path))
    outcome = _trained()
    outcome.registered = outcomes.RegisteredVersion(model="digits", version="3")
    outcome.gate = "passed"
    records.save_outcome(storage, "job-1", "train", Path("c.yaml"), outcome, "SUCCEEDED")
    written = json.loads(storage.read_text("jobs/job-1/result.json") or "")
    assert list(written) == [
        "run",
        "train_seconds",
        "test",
        "epochs_run",
        "history",
        "checkpoint",
        "registered",
        "gate",
    ]
    assert written["history"] == [{"epoch": 0.0, "train_loss": 0.5, "val_accuracy": 0.9}]
    assert written["registered"] == {"model": "digits", "version": "3"}
    record = records.load(storage, "job-1")
    assert record is not None and record.result == written and record.outcome == outcome


def test_each_kind_of_outcome_reads_back_as_its_model() -> None:
    report = _report(0.0, 0.9)
    report.registered = outcomes.RegisteredVersion(model="digits", version="4")
    assert outcomes.parse(report.record()) == report
    assert outcomes.parse(_trained().record()) == _trained()
    assert outcomes.parse({"error": "boom"}) == outcomes.JobFailure(error="boom")
    assert outcomes.parse({"something": "else"}) is None


def test_progress_events_round_trip_among_log_lines() -> None:
    line = progress.format_event({"epoch": 1, "val_accuracy": 0.5})
    assert line == 'aiaas-progress {"epoch": 1, "val_accuracy": 0.5}'
    lines = [
        "(RayTrainWorker pid=12) " + line,
        "plain output",
        "aiaas-progress {broken",
        'aiaas-progress ["not", "an", "event"]',
        progress.format_event({"phase": "fit_done"}),
    ]
    assert list(progress.events(lines)) == [
        {"epoch": 1, "val_accuracy": 0.5},
        {"phase": "fit_done"},
    ]
    assert progress.parse_line("plain output") is None
