"""What every job's ``main`` shares: run the work, keep its outcome with the job's record under
the storage root, and end with ``Error: ...`` and exit 1 on a failure we can explain."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from aiaas import errors, settings
from aiaas.storage import Storage
from jobs import outcomes, records

#: An outcome that a gate judged.
Judged = outcomes.TrainingOutcome | outcomes.FinetuneOutcome | outcomes.OptimizeReport
#: The outcome model a job's work returns (a tune job's: either search's).
Outcome = TypeVar("Outcome", bound=Judged)


class GateFailed(errors.JobError):
    """A model missed its gate; ``outcome`` holds the measurements that say by how much."""

    def __init__(self, message: str, outcome: Judged) -> None:
        super().__init__(message)
        self.outcome = outcome


def storage() -> Storage:
    """The cluster's storage root, which ``aiaas cluster up`` gives every node.

    Raises:
        ClusterError: The job runs outside an aiaas cluster.
    """
    return Storage(settings.current().require_storage_root())


def run_job(
    kind: str, config_path: Path, work: Callable[[], Outcome]
) -> tuple[int, Outcome | None]:
    """Run ``work``; returns the exit code and, on success, the outcome."""
    try:
        outcome = work()
    except GateFailed as exc:
        record(kind, config_path, exc.outcome.model_copy(update={"error": exc.message}), "FAILED")
        print(f"Error: {exc}", file=sys.stderr)
        return 1, None
    except errors.AiaasError as exc:
        record(kind, config_path, outcomes.JobFailure(error=str(exc)), "FAILED")
        print(f"Error: {exc}", file=sys.stderr)
        return 1, None
    record(kind, config_path, outcome, "SUCCEEDED")
    return 0, outcome


def record(kind: str, config_path: Path, outcome: outcomes.JobOutcome, status: str) -> None:
    """Keep the job's outcome (nowhere to keep it outside an aiaas cluster)."""
    root = settings.current().storage_root
    if root:
        # Asked only now: after ray.init the id of a job submitted with Ray's CLI is known.
        records.save_outcome(
            Storage(root), records.current_job_id(), kind, config_path, outcome, status
        )
