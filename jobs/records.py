"""Job records under the storage root, so `aiaas jobs list` outlives the cluster.

``jobs/<id>/record.json`` is written by the submitter and refreshed from Ray while the cluster
runs; ``jobs/<id>/result.json`` is written by the job itself (metrics, registered version).
Two files, two writers: neither overwrites the other's facts.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from pydantic import BaseModel

from aiaas.storage import Storage

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobRecord(BaseModel):
    """What aiaas knows of one submitted job."""

    submission_id: str
    kind: str
    config_name: str
    config_path: str
    config_hash: str
    config: dict[str, Any]
    entrypoint: str
    address: str
    submitted_at: float
    status: str = "PENDING"
    message: str | None = None
    ended_at: float | None = None
    log_tail: str | None = None
    result: dict[str, Any] | None = None


def config_hash(config: dict[str, Any]) -> str:
    """A stable hash of a config's content."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def current_job_id() -> str:
    """The id of the running job: the submission id aiaas gave it, else Ray's job id."""
    if os.environ.get("AIAAS_SUBMISSION_ID"):
        return os.environ["AIAAS_SUBMISSION_ID"]
    try:
        import ray

        if ray.is_initialized():
            return f"ray-{ray.get_runtime_context().get_job_id()}"
    except ImportError:
        pass
    return f"local-{os.getpid()}"


def save(storage: Storage, record: JobRecord) -> None:
    """Write (or refresh) a job's record."""
    storage.write_text(f"jobs/{record.submission_id}/record.json", record.model_dump_json(indent=2))


def save_result(storage: Storage | None, job_id: str, result: dict[str, Any]) -> None:
    """Write the job's own outcome; a job run outside aiaas's cluster has nowhere to write."""
    if storage is not None:
        storage.write_text(f"jobs/{job_id}/result.json", json.dumps(result, indent=2, default=str))


def load(storage: Storage, submission_id: str) -> JobRecord | None:
    """A job's record with the job's own result merged in, or None."""
    text = storage.read_text(f"jobs/{submission_id}/record.json")
    if text is None:
        return None
    record = JobRecord.model_validate_json(text)
    result = storage.read_text(f"jobs/{submission_id}/result.json")
    if result is not None:
        record = record.model_copy(update={"result": json.loads(result)})
    return record


def all_records(storage: Storage) -> list[JobRecord]:
    """Every recorded job, newest first."""
    found = [load(storage, name) for name in storage.children("jobs")]
    return sorted(
        (record for record in found if record is not None),
        key=lambda record: record.submitted_at,
        reverse=True,
    )
