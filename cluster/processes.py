"""Start ``ray start --block`` nodes in sessions of their own, and stop exactly those.

Each node runs in a new session whose id is the pid of its ``ray start`` process; everything Ray
forks for the node (GCS, raylet, dashboard, agents, workers, the log monitor that outlives a
killed raylet) keeps that session id. Stopping by session never touches another user's Ray.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import psutil


def spawn(command: list[str], env: dict[str, str], log_path: Path) -> psutil.Process:
    """Start ``command`` as the leader of a new session, with output appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return psutil.Process(popen.pid)


def leader(pid: int, create_time: float) -> psutil.Process | None:
    """The recorded session leader if it still runs (and is not a reused pid)."""
    try:
        process = psutil.Process(pid)
        if (
            abs(process.create_time() - create_time) > 1.0
            or process.status() == psutil.STATUS_ZOMBIE
        ):
            return None
        return process
    except psutil.Error:
        return None


def session_members(session_ids: Iterable[int]) -> list[psutil.Process]:
    """Every process in the given sessions, plus their descendants that left the session.

    Descendants matter because Ray starts job drivers in sessions of their own.
    """
    wanted = set(session_ids)
    members: dict[int, psutil.Process] = {}
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) in wanted:
                members[process.pid] = process
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    for process in list(members.values()):
        try:
            for child in process.children(recursive=True):
                members.setdefault(child.pid, child)
        except psutil.Error:
            continue
    return list(members.values())


def stop_sessions(session_ids: list[int], grace_s: float = 10.0) -> int:
    """Stop every process of the given sessions: SIGTERM to the leaders, then SIGKILL to the rest.

    ``ray start --block`` tears its node down on SIGTERM; whatever is left after ``grace_s``
    (a hung raylet, an orphaned log monitor, job drivers) is killed.

    Returns:
        How many processes were stopped.
    """
    members = session_members(session_ids)
    for sid in session_ids:
        try:
            os.kill(sid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    _, alive = psutil.wait_procs(members, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue
    _, still = psutil.wait_procs(alive, timeout=5)
    # Anything forked while we were waiting.
    late = session_members(session_ids)
    for process in late:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(late, timeout=5)
    return len(members) + len(late) - len(still)


def wait_gone(session_ids: list[int], timeout_s: float = 5.0) -> bool:
    """True once no process of the sessions is left."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not session_members(session_ids):
            return True
        time.sleep(0.2)
    return not session_members(session_ids)


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.strip().splitlines()[-lines:]) or "(empty log)"


def wait_answering(
    name: str, pid: int, create_time: float, url: str, log_path: str, deadline: float, fix: str
) -> None:
    """Wait until a service we started answers 200 at ``url``; a ClusterError with the last
    lines of its log if it exits first, or naming the log and ``fix`` at ``deadline``
    (``time.monotonic()``)."""
    import httpx

    from aiaas import errors

    while True:
        if leader(pid, create_time) is None:
            raise errors.ClusterError(
                f"{name} exited while starting; the last lines of {log_path}:\n"
                f"{log_tail(Path(log_path))}"
            )
        try:
            if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise errors.ClusterError(
                f"timed out waiting for {name} at {url}; its log: {log_path}", fix
            )
        time.sleep(0.3)
