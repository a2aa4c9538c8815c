"""Job records under the storage root, so `aiaas jobs list` outlives the cluster.

``jobs/<id>/record.json`` is written by the submitter and refreshed from Ray while the cluster
runs; ``jobs/<id>/result.json`` is written by the job itself (metrics, registered version), as
one of the models of :mod:`jobs.outcomes`. Two files, two writers: neither overwrites the
other's facts.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from aiaas import settings
from aiaas.storage import Storage
from jobs import outcomes

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
#: A record whose files cannot be read; shown as such, never refreshed or rewritten.
DAMAGED = "DAMAGED"


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
    # The job's result.json as written (what `aiaas jobs status --json` prints); read it typed
    # through `outcome`.
    result: dict[str, Any] | None = None

    @property
    def outcome(self) -> outcomes.JobOutcome | None:
        """The job's own result as its outcome model, or None before the job wrote one."""
        return outcomes.parse(self.result) if self.result is not None else None


def config_hash(config: dict[str, Any]) -> str:
    """A stable hash of a config's content."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def current_job_id() -> str:
    """The id of the running job: the submission id aiaas gave it, else Ray's job id."""
    submission_id = settings.current().submission_id
    if submission_id:
        return submission_id
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


def save_outcome(
    storage: Storage,
    job_id: str,
    kind: str,
    config_path: Path,
    outcome: outcomes.JobOutcome,
    status: str,
) -> None:
    """Write the job's own outcome, and a record too when the job was submitted with Ray's CLI
    (so `aiaas jobs list` shows it beside the jobs `aiaas train` submitted)."""
    storage.write_text(f"jobs/{job_id}/result.json", json.dumps(outcome.record(), indent=2))
    if storage.read_text(f"jobs/{job_id}/record.json") is None:
        config_text = config_path.read_text() if config_path.exists() else ""
        save(
            storage,
            JobRecord(
                submission_id=job_id,
                kind=kind,
                config_name=config_path.stem,
                config_path=str(config_path),
                config_hash=config_hash({"text": config_text}),
                config={},
                entrypoint=f"python -m jobs.{kind} {config_path}",
                address="(submitted with Ray's own CLI)",
                submitted_at=time.time(),
                status=status,
                ended_at=time.time(),
            ),
        )


def git_commit(directory: Path | None = None) -> str:
    """The project's git commit: from the submitter (uploads carry no .git), else from git."""
    commit = settings.current().git_commit
    if commit:
        return commit
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


def load(storage: Storage, submission_id: str) -> JobRecord | None:
    """A job's record with the job's own result merged in, or None."""
    text = storage.read_text(f"jobs/{submission_id}/record.json")
    if text is None:
        return None
    try:
        record = JobRecord.model_validate_json(text)
    except ValueError as exc:
        return _damaged(storage, submission_id, "record.json", exc)
    text = storage.read_text(f"jobs/{submission_id}/result.json")
    if text is None:
        return record
    try:
        result = json.loads(text)
        if not isinstance(result, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        if record.status in TERMINAL:
            return record
        return _damaged(storage, submission_id, "result.json", exc, record)
    update: dict[str, Any] = {"result": result}
    if record.status not in TERMINAL:
        # The job wrote its outcome but its cluster went away before the record was refreshed.
        # A result no outcome model reads is no evidence of success.
        outcome = outcomes.parse(result)
        update["status"] = "FAILED" if outcome is None or outcome.error else "SUCCEEDED"
    return record.model_copy(update=update)


def _damaged(
    storage: Storage,
    submission_id: str,
    name: str,
    error: ValueError,
    record: JobRecord | None = None,
) -> JobRecord:
    """A record that says which of its files cannot be read (a half-written or edited file),
    so that one damaged job never hides the others."""
    path = storage.path(f"jobs/{submission_id}/{name}")
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    message = f"{path} cannot be read ({first_line}); move it away or restore it from a backup"
    if record is not None:
        return record.model_copy(update={"status": DAMAGED, "message": message})
    return JobRecord(
        submission_id=submission_id,
        kind="?",
        config_name="?",
        config_path="?",
        config_hash="?",
        config={},
        entrypoint="?",
        address="?",
        submitted_at=0.0,
        status=DAMAGED,
        message=message,
    )


def all_records(storage: Storage) -> list[JobRecord]:
    """Every recorded job, newest first."""
    found = [load(storage, name) for name in storage.children("jobs")]
    return sorted(
        (record for record in found if record is not None),
        key=lambda record: record.submitted_at,
        reverse=True,
    )
