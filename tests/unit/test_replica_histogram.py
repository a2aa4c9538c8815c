"""The in-replica histogram: Prometheus's bucket rules, and what it hands Ray's gauges."""

from __future__ import annotations

from typing import Any

from aiaas.replica_histogram import ReplicaHistogram


class Recorded:
    """Stands in for a Ray gauge: keeps the last value set per tag set."""

    def __init__(self, name: str, tag_keys: tuple[str, ...]) -> None:
        self.name, self.tag_keys, self.values = name, tag_keys, {}

    def set(self, value: float, tags: dict[str, str]) -> None:
        assert set(tags) == set(self.tag_keys)
        self.values[tuple(sorted(tags.items()))] = value


def _histogram() -> tuple[ReplicaHistogram, dict[str, Recorded]]:
    gauges: dict[str, Recorded] = {}

    def gauge(name: str, description: str, tag_keys: tuple[str, ...]) -> Any:
        gauges[name] = Recorded(name, tag_keys)
        return gauges[name]

    # A long interval: the test flushes by hand.
    return ReplicaHistogram("lat", "d", (1, 5), ("model",), gauge, interval_s=3600), gauges


def test_buckets_are_cumulative_and_a_bound_belongs_to_its_own_bucket() -> None:
    histogram, _ = _histogram()
    for value in (0.2, 1, 1.5, 5, 7, 900):
        histogram.observe(value, {"model": "a"})
    histogram.observe(3, {"model": "b"})
    found = histogram.snapshot()
    assert found[("a",)] == ([2, 4, 6], 914.7)
    assert found[("b",)] == ([0, 1, 1], 3.0)


def test_flush_sets_the_series_prometheus_reads_as_a_histogram() -> None:
    histogram, gauges = _histogram()
    assert sorted(gauges) == ["lat_bucket", "lat_count", "lat_sum"]
    histogram.observe(2, {"model": "a"})
    histogram.observe(6, {"model": "a"})
    histogram.flush()
    buckets = {dict(k)["le"]: v for k, v in gauges["lat_bucket"].values.items()}
    assert buckets == {"1.0": 0, "5.0": 1, "+Inf": 2}
    assert list(gauges["lat_count"].values.values()) == [2]
    assert list(gauges["lat_sum"].values.values()) == [8.0]


def test_flush_without_new_observations_sets_nothing() -> None:
    histogram, gauges = _histogram()
    histogram.flush()
    assert gauges["lat_bucket"].values == {}
    histogram.observe(1, {"model": "a"})
    histogram.flush()
    gauges["lat_bucket"].values.clear()
    histogram.flush()
    assert gauges["lat_bucket"].values == {}
