"""Submit aiaas jobs through Ray's Jobs API and keep their records under the storage root."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from aiaas import errors, ray_auth, settings
from aiaas import progress as aiaas_progress
from aiaas.config.cluster import ClusterConfig
from aiaas.storage import Storage
from jobs import records

#: The project root: the working dir every job is submitted with.
PROJECT = Path(__file__).resolve().parent.parent
#: Kept out of the working-dir upload (Ray caps it at 100 MiB) besides what .gitignore names.
EXCLUDES = [
    ".venv",
    ".git",
    "data",
    "**/__pycache__",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    "bench/results",
    "*.egg-info",
]


def address_in_use(config: ClusterConfig) -> str:
    """The Jobs API address Ray's client will really use: RAY_API_SERVER_ADDRESS and
    RAY_ADDRESS override the cluster config's, as in Ray's own SDK."""
    return (
        os.environ.get("RAY_API_SERVER_ADDRESS")
        or os.environ.get("RAY_ADDRESS")
        or config.dashboard_url()
    )


def client(config: ClusterConfig) -> Any:
    """A JobSubmissionClient of the cluster, or a ClusterError saying how to start it."""
    from ray.job_submission import JobSubmissionClient

    address = address_in_use(config)
    try:
        # The token explicitly, not only through Ray's env lookup: an inherited RAY_AUTH_TOKEN
        # of another cluster must not be what this client sends.
        return JobSubmissionClient(address, headers=ray_auth.headers(config))
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise errors.ClusterError(
            f"cannot reach the Ray Jobs API at {address}: {exc}",
            "Start the cluster: aiaas cluster up",
        ) from None


def submit(
    kind: str,
    config_path: Path,
    config: Any,
    cluster: ClusterConfig,
    extra_args: tuple[str, ...] = (),
) -> records.JobRecord:
    """Submit ``python -m jobs.<kind> CONFIG [EXTRA_ARGS]`` and record it.

    Configs inside the project are passed by their relative path (they are in the upload);
    others are staged under the storage root first.
    """
    storage = Storage(cluster.storage_root)
    submission_id = (
        f"aiaas-{kind}-{config.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    )
    entry_config = _config_argument(config_path, storage, submission_id)
    entrypoint = " ".join(["python", "-m", f"jobs.{kind}", entry_config, *extra_args])
    config_data = config.model_dump(mode="json")
    record = records.JobRecord(
        submission_id=submission_id,
        kind=kind,
        config_name=config.name,
        config_path=str(config_path),
        config_hash=records.config_hash(config_data),
        config=config_data,
        entrypoint=entrypoint,
        address=address_in_use(cluster),
        submitted_at=time.time(),
    )
    submit_entrypoint(
        cluster,
        entrypoint,
        submission_id,
        env_vars={settings.SUBMISSION_ID: submission_id},
        metadata={
            "aiaas_kind": kind,
            "config_name": config.name,
            "config_hash": record.config_hash,
        },
    )
    records.save(storage, record)
    return record


def submit_entrypoint(
    cluster: ClusterConfig,
    entrypoint: str,
    submission_id: str,
    env_vars: dict[str, str] | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Submit an entrypoint as aiaas submits every job: the project as working_dir (less the
    excludes), the git commit in the env, no CPU held by the driver, a retry while the head's
    job agent registers."""
    jobs_client = client(cluster)
    _quiet_ray_logs()
    deadline = time.monotonic() + 60
    while True:
        try:
            jobs_client.submit_job(
                entrypoint=entrypoint,
                submission_id=submission_id,
                runtime_env={
                    "working_dir": str(PROJECT),
                    "excludes": EXCLUDES,
                    "env_vars": {
                        settings.GIT_COMMIT: records.git_commit(PROJECT),
                        **(env_vars or {}),
                    },
                },
                # The driver only orchestrates and evaluates: it must not hold a CPU the
                # workers need.
                entrypoint_num_cpus=0,
                metadata=metadata or {},
            )
            return
        except Exception as exc:  # the SDK raises RuntimeError/ConnectionError/HTTP errors alike
            # Right after `cluster up` the head's job agent may not have registered yet.
            if "No available agent" in str(exc) and time.monotonic() < deadline:
                time.sleep(1)
                continue
            raise errors.JobError(
                f"submitting {entrypoint} to {address_in_use(cluster)} failed: {exc}",
                "Check the cluster with 'aiaas cluster status'.",
            ) from None


def refresh(cluster: ClusterConfig, record: records.JobRecord) -> records.JobRecord:
    """Bring a record up to date from Ray while the cluster runs; keep it otherwise."""
    if record.status == records.DAMAGED:
        return record
    if record.status in records.TERMINAL and record.log_tail is not None:
        return record
    try:
        jobs_client = client(cluster)
        info = jobs_client.get_job_info(record.submission_id)
    except Exception:  # cluster down or job unknown to this cluster: the record stands
        return record
    status = str(getattr(info.status, "value", info.status))
    update: dict[str, Any] = {"status": status, "message": info.message}
    if status in ("PENDING", "RUNNING") and _driver_node_dead(cluster, info.driver_node_id):
        # Ray 2.60 keeps such a job RUNNING for good after a head restart (its supervisor
        # actor died with the node, and nothing marks it): aiaas says what happened.
        update = {"status": "FAILED", "message": lost_with_head(record, info.driver_node_id)}
    if update["status"] in records.TERMINAL:
        update["ended_at"] = (info.end_time or 0) / 1000 or time.time()
        try:
            logs = jobs_client.get_job_logs(record.submission_id)
        except Exception:  # the driver's node (which serves its log) is gone
            logs = "(the job's log was on the node that died)"
        update["log_tail"] = "\n".join(logs.splitlines()[-40:])
    fresh = record.model_copy(update=update)
    if fresh != record:
        # Only on change: `wait` polls every second and need not rewrite an unchanged record.
        records.save(Storage(cluster.storage_root), fresh.model_copy(update={"result": None}))
    return fresh


def lost_with_head(record: records.JobRecord, node_id: str | None) -> str:
    """The cause recorded for a job whose driver's node died under it."""
    again = f"aiaas {record.kind} {record.config_path}" if record.kind != "?" else "it"
    return (
        f"lost with the head node: its driver ran on node {(node_id or '?')[:12]}, which died "
        f"while the job ran; submit {again} again (training resumes from its latest checkpoint)"
    )


def _driver_node_dead(cluster: ClusterConfig, node_id: str | None) -> bool:
    if not node_id:
        return False
    from aiaas.dashboard import Dashboard

    try:
        with Dashboard(cluster.dashboard_url(), cluster.auth_mode) as dashboard:
            states = {node["node_id"]: node["state"] for node in dashboard.nodes()}
    except errors.ClusterError:
        return False
    return states.get(node_id) == "DEAD"


def wait(cluster: ClusterConfig, submission_id: str, timeout_s: float = 3600) -> records.JobRecord:
    """Block until the job ends; returns its refreshed record."""
    storage = Storage(cluster.storage_root)
    deadline = time.monotonic() + timeout_s
    while True:
        record = find(cluster, submission_id)
        if record.status in records.TERMINAL:
            return records.load(storage, submission_id) or record
        if time.monotonic() > deadline:
            raise errors.JobError(f"job {submission_id} did not finish in {timeout_s:.0f}s")
        time.sleep(1)


def find(cluster: ClusterConfig, submission_id: str) -> records.JobRecord:
    """The refreshed record of one job, or a JobError listing what exists."""
    storage = Storage(cluster.storage_root)
    record = records.load(storage, submission_id)
    if record is None:
        known = [r.submission_id for r in records.all_records(storage)[:5]]
        raise errors.JobError(
            f"no job '{submission_id}' is recorded under {cluster.storage_root}",
            f"Recent jobs: {', '.join(known) or 'none'} (aiaas jobs list)",
        )
    fresh = refresh(cluster, record)
    return fresh.model_copy(update={"result": record.result})


def stop(cluster: ClusterConfig, submission_id: str) -> records.JobRecord:
    """Ask Ray to stop the job and wait until it has stopped."""
    find(cluster, submission_id)
    client(cluster).stop_job(submission_id)
    return wait(cluster, submission_id, timeout_s=120)


def follow(
    cluster: ClusterConfig, submission_id: str, on_line: Callable[[str], None]
) -> records.JobRecord:
    """Stream the job's log lines to ``on_line`` until it ends."""
    jobs_client = client(cluster)

    async def stream() -> None:
        async for chunk in jobs_client.tail_job_logs(submission_id):
            for line in chunk.splitlines():
                on_line(line)

    asyncio.run(stream())
    return wait(cluster, submission_id)


def progress(lines: Iterator[str] | list[str]) -> Iterator[dict[str, Any]]:
    """The structured progress events among a job's log lines (see :mod:`aiaas.progress`)."""
    return aiaas_progress.events(lines)


def _quiet_ray_logs() -> None:
    # Ray logs each ignored file of the working-dir upload at INFO; the record says what was sent.
    for name in list(logging.root.manager.loggerDict):
        if name == "ray" or name.startswith("ray."):
            logging.getLogger(name).setLevel(logging.ERROR)


def _config_argument(config_path: Path, storage: Storage, submission_id: str) -> str:
    resolved = config_path.resolve()
    if resolved.is_relative_to(PROJECT):
        return str(resolved.relative_to(PROJECT))
    if not storage.is_local:
        raise errors.ConfigError(
            f"{config_path} is outside the project ({PROJECT}) and the storage root is remote",
            "Put the config under configs/ so it is uploaded with the job.",
        )
    staged = Path(storage.path("jobs", submission_id, resolved.name))
    staged.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(resolved, staged)
    return str(staged)
