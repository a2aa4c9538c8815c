"""Job records: the job's own outcome settles a status its lost cluster never reported."""

from __future__ import annotations

import time
from pathlib import Path

from aiaas.storage import Storage
from jobs import outcomes, records

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
