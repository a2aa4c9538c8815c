"""Where an idle cluster's CPU goes: every process's CPU time over a window, grouped by what the
process is (GCS, raylet, dashboard agent, Serve controller, a replica, Prometheus, ...).

Read from ``/proc`` by hand: psutil would do the same reads and is not worth a dependency of
the benchmarks for two fields of ``/proc/PID/stat``. The machine must be otherwise quiet: every
process is counted except this benchmark's own.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")

# First match wins: (what a process's command line contains, the kind it is shown as). Ray's
# actors and agents rename themselves ``ray::NAME``; those are shown by that name.
_KINDS = (
    ("ray::IDLE", "Ray idle workers"),
    ("gcs_server", "GCS"),
    ("raylet/raylet", "raylet"),
    ("log_monitor.py", "log monitor"),
    ("autoscaler/_private/monitor.py", "autoscaler monitor"),
    ("ray.util.client.server", "Ray client server"),
    ("ray-dashboard-", "dashboard (head) modules"),
    ("ray.dashboard", "dashboard (head) modules"),
    ("dashboard/dashboard.py", "dashboard (head)"),
    ("ray start --block", "ray start --block (node launcher)"),
    ("haproxy", "HAProxy"),
    ("prometheus", "Prometheus"),
    ("redis-server", "Redis"),
    ("cluster.supervisor", "aiaas supervisor"),
    ("mlflow", "MLflow"),
)


def _kind(cmdline: str) -> str:
    first = cmdline.split()[0] if cmdline.split() else ""
    if first.startswith("ray::ServeReplica:"):
        # ray::ServeReplica:APP:DEPLOYMENT
        return f"Serve replica ({first.split(':')[3]})"
    if first.startswith("ray::") and first != "ray::IDLE":
        return first
    for needle, kind in _KINDS:
        if needle in cmdline:
            return kind
    return "other"


def _snapshot(skip: set[int]) -> dict[int, tuple[str, float]]:
    found: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
        except OSError:
            continue  # ended while being read
        fields = stat[stat.rindex(")") + 2 :].split()
        seconds = (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime
        if not cmdline.strip():
            continue  # kernel threads
        found[int(entry.name)] = (_kind(cmdline), seconds)
    return found


def _busy_seconds() -> float:
    """Every CPU's non-idle time since boot, from ``/proc/stat``."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / _TICKS


def measure(seconds: float) -> dict[str, float]:
    """Cores used per process kind over ``seconds`` (and ``total``, the whole machine's)."""
    skip = {os.getpid(), os.getppid()}
    before, busy_before = _snapshot(skip), _busy_seconds()
    started = time.monotonic()
    time.sleep(seconds)
    after, busy_after = _snapshot(skip), _busy_seconds()
    elapsed = time.monotonic() - started
    cores: dict[str, float] = {}
    for pid, (kind, spent) in after.items():
        # A process that started inside the window counts from zero.
        used = spent - before[pid][1] if pid in before else spent
        cores[kind] = cores.get(kind, 0.0) + used / elapsed
    cores = dict(sorted(cores.items(), key=lambda item: -item[1]))
    cores["total"] = (busy_after - busy_before) / elapsed
    return cores
