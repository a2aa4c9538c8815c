"""Job records: the job's own outcome settles a status its lost cluster never reported, and
keeps what a failed gate measured."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from aiaas.storage import Storage
from jobs import entrypoint, gate, outcomes, records

_TEST = outcomes.TestMetrics(accuracy=1.0, loss=0.1, rows=10)


def _trained(**fields: object) -> outcomes.TrainingOutcome:
    return outcomes.TrainingOutcome.model_validate(
        {"run": "r", "test": _TEST, "epochs_run": 0, "history": [], "checkpoint": "/c", **fields}
    )


def _record(storage: Storage, submission_id: str) -> None:
    records.save(
        storage,
        records.JobRecord(
            submission_id=submission_id,
            kind="train",
            config_name="c",
            config_path="c.yaml",
            config_hash="h",
            config={},
            entrypoint="python -m jobs.train c.yaml",
            address="http://127.0.0.1:8265",
            submitted_at=time.time(),
        ),
    )


def test_outcome_settles_the_status(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    _record(storage, "ok")
    _record(storage, "bad")
    _record(storage, "running")
    records.save_outcome(storage, "ok", "train", Path("c.yaml"), _trained(), "SUCCEEDED")
    records.save_outcome(
        storage, "bad", "train", Path("c.yaml"), outcomes.JobFailure(error="gate"), "FAILED"
    )
    found = {record.submission_id: record.status for record in records.all_records(storage)}
    assert found == {"ok": "SUCCEEDED", "bad": "FAILED", "running": "PENDING"}


def test_jobs_from_rays_cli_record_themselves(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    records.save_outcome(storage, "ray-02000000", "train", Path("c.yaml"), _trained(), "SUCCEEDED")
    [record] = records.all_records(storage)
    assert record.address == "(submitted with Ray's own CLI)"
    assert record.status == "SUCCEEDED" and record.outcome == _trained()


def test_a_gate_failure_is_recorded_with_its_measurements(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIAAS_STORAGE_ROOT", str(tmp_path))
    monkeypatch.setenv("AIAAS_SUBMISSION_ID", "job-2")
    storage = Storage(str(tmp_path))
    _record(storage, "job-2")

    def work() -> outcomes.TrainingOutcome:
        outcome = _trained()
        outcome.gate = gate.verdict(["test loss 0.1000 is not <= 0.05"])
        gate.refuse("registration", ["test loss 0.1000 is not <= 0.05"], outcome)

    code, outcome = entrypoint.run_job("train", Path("c.yaml"), work)
    assert (code, outcome) == (1, None)
    record = records.load(storage, "job-2")
    assert record is not None and record.status == "FAILED"
    assert isinstance(record.outcome, outcomes.TrainingOutcome)
    assert record.outcome.gate == "failed: test loss 0.1000 is not <= 0.05"
    assert record.outcome.error == (
        "registration gate failed: test loss 0.1000 is not <= 0.05; nothing was registered"
    )
    assert record.outcome.registered is None


@pytest.mark.parametrize(
    ("name", "text"),
    [("record.json", '{"submission_id": "half'), ("record.json", "[]"), ("result.json", "{oops")],
)
def test_a_damaged_record_is_reported_and_hides_no_other_job(
    tmp_path: Path, name: str, text: str
) -> None:
    storage = Storage(str(tmp_path))
    _record(storage, "good")
    _record(storage, "bad")
    Path(storage.path(f"jobs/bad/{name}")).write_text(text)
    found = {record.submission_id: record for record in records.all_records(storage)}
    assert found["good"].status == "PENDING"
    assert found["bad"].status == records.DAMAGED
    assert found["bad"].message is not None
    assert found["bad"].message.startswith(f"{storage.path(f'jobs/bad/{name}')} cannot be read (")
    assert found["bad"].message.endswith("move it away or restore it from a backup")


def test_a_write_leaves_no_temporary_file_and_replaces_whole(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    _record(storage, "one")
    _record(storage, "one")
    assert sorted(p.name for p in (tmp_path / "jobs" / "one").iterdir()) == ["record.json"]
    assert records.load(storage, "one") is not None
