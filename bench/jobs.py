"""Job submission: submit → RUNNING for a trivial entrypoint, and the wall time of 8 concurrent
1-second jobs, through aiaas's submission (``jobs.submit.submit_entrypoint``: the project as
working_dir less the excludes, env, metadata, a driver holding no CPU) against Ray Jobs used
directly (``JobSubmissionClient.submit_job`` with the same working_dir, as ``ray job submit
--working-dir .`` does). Median of 3 alternating rounds on a head-only cluster.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from bench import report, serving
from tests import support

TRIVIAL = "python -c 'import time; time.sleep(2)'"
ONE_SECOND = "python -c 'import time; time.sleep(1)'"
CONCURRENT = 8
_ACTIVE = ("PENDING",)
_DONE = ("SUCCEEDED", "FAILED", "STOPPED")


def _submitters(config_path: Path) -> dict[str, Callable[[str, str], None]]:
    from aiaas.config import loader
    from aiaas.config.cluster import ClusterConfig
    from jobs import submit

    cluster = loader.load(config_path, ClusterConfig)
    direct = submit.client(cluster)

    def ours(entrypoint: str, submission_id: str) -> None:
        submit.submit_entrypoint(cluster, entrypoint, submission_id)

    def ray_jobs(entrypoint: str, submission_id: str) -> None:
        direct.submit_job(
            entrypoint=entrypoint,
            submission_id=submission_id,
            runtime_env={"working_dir": str(submit.PROJECT), "excludes": submit.EXCLUDES},
        )

    return {"aiaas": ours, "ray": ray_jobs}


def _status(client: Any, submission_id: str) -> str:
    return str(client.get_job_status(submission_id))


def _to_running(client: Any, submit: Callable[[str, str], None]) -> tuple[float, float]:
    """Seconds from submit to RUNNING, and how many of them the submit call itself took
    (packaging and hashing the working dir, checking the upload, the HTTP request)."""
    submission_id = f"bench-{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    submit(TRIVIAL, submission_id)
    call = time.perf_counter() - started
    while _status(client, submission_id).rsplit(".", 1)[-1] in _ACTIVE:
        time.sleep(0.02)
    took = time.perf_counter() - started
    while _status(client, submission_id).rsplit(".", 1)[-1] not in _DONE:
        time.sleep(0.2)
    return took, call


def _concurrent(client: Any, submit: Callable[[str, str], None]) -> float:
    ids = [f"bench-{uuid.uuid4().hex[:8]}" for _ in range(CONCURRENT)]
    started = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENT) as pool:
        list(pool.map(lambda submission_id: submit(ONE_SECOND, submission_id), ids))
    waiting = set(ids)
    while waiting:
        waiting = {i for i in waiting if _status(client, i).rsplit(".", 1)[-1] not in _DONE}
        time.sleep(0.05)
    took = time.perf_counter() - started
    failed = [i for i in ids if not _status(client, i).endswith("SUCCEEDED")]
    if failed:
        raise RuntimeError(f"jobs failed: {failed}")
    return took


def run() -> list[dict[str, Any]]:
    directory = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    env = yaml.safe_load((support.REPO / "configs/cluster/local.yaml").read_text())["env"]
    bench = serving.Bench(directory, "bench-jobs", {k: str(v) for k, v in env.items()})
    found: dict[tuple[str, str], list[float]] = {}
    try:
        bench.running = True  # set first: stop() then takes down a cluster that half started
        support.run("aiaas", "cluster", "up", str(bench.config), timeout=600).check_returncode()
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(bench.dashboard, headers=bench.headers())
        submitters = _submitters(bench.config)
        _to_running(client, submitters["ray"])  # the first upload of the package is cached
        for round_number in range(serving.ROUNDS):
            order = ["aiaas", "ray"] if round_number % 2 == 0 else ["ray", "aiaas"]
            for who in order:
                latency, call = _to_running(client, submitters[who])
                wall = _concurrent(client, submitters[who])
                print(
                    f"  {who}: to RUNNING {latency:.2f} s (call {call:.2f} s), 8 jobs {wall:.2f} s",
                    flush=True,
                )
                found.setdefault((who, "latency"), []).append(latency)
                found.setdefault((who, "call"), []).append(call)
                found.setdefault((who, "wall"), []).append(wall)
    finally:
        bench.stop()
        shutil.rmtree(directory, ignore_errors=True)

    def med(who: str, what: str) -> float:
        return report.median(found[(who, what)])

    return [
        serving._row(
            "submit → RUNNING, trivial entrypoint",
            med("aiaas", "latency"),
            med("ray", "latency"),
            "Ray Jobs SDK, same working_dir",
            "s",
            0.4,
        ),
        serving._row(
            "  of which: the submit call (working-dir package, upload check)",
            med("aiaas", "call"),
            med("ray", "call"),
            "the same call, Ray Jobs SDK",
            "s",
            None,
        ),
        serving._row(
            f"wall time of {CONCURRENT} concurrent 1-second jobs",
            med("aiaas", "wall"),
            med("ray", "wall"),
            "Ray Jobs SDK, same working_dir",
            "s",
            0.45,
        ),
    ]
