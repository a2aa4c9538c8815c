"""A histogram counted in the process that observes it, exported through Ray as gauges.

Ray 2.60's dashboard agent rebuilds every histogram observation a process reported as one
OpenTelemetry ``record()`` call (``record_histogram_aggregated_batch``; ray-project/ray#64852):
at a few thousand requests a second that is a second of the agent's CPU in one burst at every
export, which the replicas feel as p99 latency (BENCHMARKS.md). Here an observation is a few
additions in the replica; once a second the cumulative bucket counts, the sum and the count are
set on Ray gauges named as Prometheus names a histogram's series (``NAME_bucket{le=...}``,
``NAME_sum``, ``NAME_count``), so ``histogram_quantile()`` over ``rate()`` reads them exactly as it
reads a histogram, and the agent's work no longer grows with traffic. Written here because Ray's
metrics API has no way to hand it bucket counts.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

#: Makes a Ray gauge: (name, description, tag keys) → an object with ``set(value, tags=...)``.
GaugeFactory = Callable[[str, str, tuple[str, ...]], Any]


class ReplicaHistogram:
    """Bucket counts per label set, flushed to Ray gauges every ``interval_s`` by a thread."""

    def __init__(
        self,
        name: str,
        description: str,
        boundaries: Sequence[float],
        labels: tuple[str, ...],
        gauge: GaugeFactory,
        interval_s: float = 1.0,
    ) -> None:
        self.labels = labels
        self.boundaries = [float(b) for b in boundaries]
        # Prometheus spells bucket bounds as floats ("1.0") and the last one "+Inf".
        self._les = [repr(b) for b in self.boundaries] + ["+Inf"]
        self._buckets = gauge(f"{name}_bucket", description, (*labels, "le"))
        self._sum = gauge(f"{name}_sum", description, labels)
        self._count = gauge(f"{name}_count", description, labels)
        self._counts: dict[tuple[str, ...], list[int]] = {}
        self._sums: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()
        self._changed = False
        self._interval_s = interval_s
        threading.Thread(target=self._flush_forever, name=f"{name}-flush", daemon=True).start()

    def observe(self, value: float, tags: dict[str, str]) -> None:
        key = tuple(tags[label] for label in self.labels)
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le is ≤).
        index = bisect.bisect_left(self.boundaries, value)
        with self._lock:
            counts = self._counts.get(key)
            if counts is None:
                counts = self._counts[key] = [0] * (len(self.boundaries) + 1)
            counts[index] += 1
            self._sums[key] = self._sums.get(key, 0.0) + value
            self._changed = True

    def snapshot(self) -> dict[tuple[str, ...], tuple[list[int], float]]:
        """Cumulative counts per bucket (the last is +Inf, the count) and the sum, per key."""
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> dict[tuple[str, ...], tuple[list[int], float]]:
        return {key: (_cumulative(counts), self._sums[key]) for key, counts in self._counts.items()}

    def flush(self) -> None:
        # One hold of the lock: the counts set are the ones the change flag was cleared for.
        with self._lock:
            if not self._changed:
                return
            self._changed = False
            found = self._snapshot()
        for key, (cumulative, total) in found.items():
            tags = dict(zip(self.labels, key, strict=True))
            for le, count in zip(self._les, cumulative, strict=True):
                self._buckets.set(count, tags={**tags, "le": le})
            self._sum.set(total, tags=tags)
            self._count.set(cumulative[-1], tags=tags)

    def _flush_forever(self) -> None:
        while True:
            time.sleep(self._interval_s)
            self.flush()


def _cumulative(counts: list[int]) -> list[int]:
    total, found = 0, []
    for count in counts:
        total += count
        found.append(total)
    return found
