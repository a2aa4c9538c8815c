"""The progress marker: the one owner of the ``aiaas-progress {json}`` lines jobs print.

A job prints one JSON event per line behind the prefix (epochs, phases, test metrics, trial
tables); the CLI's ``--follow``, the benchmarks and the tests find them among Ray's log lines.
Writers call :func:`emit` (or :func:`phase`), readers :func:`events` or :func:`parse_line`, so
the prefix and the encoding are spelled here only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from typing import Any

#: What starts an event, anywhere in a log line (Ray prefixes worker lines with their actor).
PREFIX = "aiaas-progress "


def format_event(event: dict[str, Any]) -> str:
    """One event as its log line (values JSON cannot encode are written as ``str``)."""
    return PREFIX + json.dumps(event, default=str)


def emit(event: dict[str, Any]) -> None:
    """Print one event, flushed so a streamed log shows it while the job runs."""
    print(format_event(event), flush=True)


def parse_line(line: str) -> dict[str, Any] | None:
    """The event of one log line, or None when the line carries none (or a broken one)."""
    marker = line.find(PREFIX)
    if marker < 0:
        return None
    try:
        event = json.loads(line[marker + len(PREFIX) :])
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


def events(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The events among log lines, in order."""
    for line in lines:
        event = parse_line(line)
        if event is not None:
            yield event


def phase(name: str) -> None:
    """A wall-clock mark: where a job's start-up and wrap-up time goes, and the process's peak
    memory so far."""
    emit({"phase": name, "at": round(time.time(), 3), "peak_rss_mb": peak_rss_mb()})


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB."""
    import resource

    # ru_maxrss is in KiB on Linux.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
