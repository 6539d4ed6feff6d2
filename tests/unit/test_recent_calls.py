"""The last minute of data calls per namespace (workers/metrics.py's RecentCalls), which `monim status`
shows as requests/s and p99: counts, window, and quantiles as Prometheus's histogram_quantile computes them."""

from __future__ import annotations

import pytest
from monim.workers.metrics import LATENCY_BUCKETS_S, RecentCalls, bucket_quantile


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_bucket_quantile_interpolates_within_the_bucket():
    bounds = (0.01, 0.1, 1.0)
    # 100 observations: 50 in (0, 0.01], 40 in (0.01, 0.1], 10 in (0.1, 1.0].
    counts = [50, 40, 10, 0]
    assert bucket_quantile(0.5, counts, bounds) == pytest.approx(0.01)
    assert bucket_quantile(0.7, counts, bounds) == pytest.approx(0.01 + 0.09 * 20 / 40)
    assert bucket_quantile(0.99, counts, bounds) == pytest.approx(0.1 + 0.9 * 9 / 10)
    assert bucket_quantile(0.99, [0, 0, 0, 5], bounds) == 1.0  # past the last bound: that bound
    assert bucket_quantile(0.99, [0, 0, 0, 0], bounds) is None


def test_rate_and_p99_cover_the_last_minute_only():
    clock = Clock()
    recent = RecentCalls(clock=clock)
    clock.now += 120  # the front end has run two minutes; calls come in seconds 1120..1149
    for _ in range(30):  # 30 s of 4 calls a second on "a": 3 fast and 1 slow
        for seconds in (0.002, 0.002, 0.002, 0.4):
            recent.observe("a", seconds)
        clock.now += 1
    recent.observe("b", 0.02)
    rate, p99 = recent.summary()["a"]
    assert rate == pytest.approx(120 / 60)
    expected = bucket_quantile(0.99, [0, 90, 0, 0, 0, 0, 0, 0, 30, 0, 0, 0, 0, 0, 0, 0, 0], LATENCY_BUCKETS_S)
    assert p99 == pytest.approx(expected) and 0.25 < p99 <= 0.5
    assert recent.summary()["b"] == (pytest.approx(1 / 60), pytest.approx(0.01 + 0.015 * 0.99))  # in (0.01, 0.025]
    clock.now += 44  # now 1194: the calls of seconds 1120..1134, 60 s old or more, have left the window
    assert recent.summary()["a"][0] == pytest.approx(60 / 60)
    clock.now += 60  # all of it has: the namespace is forgotten
    assert recent.summary() == {}


def test_a_young_front_end_divides_by_its_age():
    clock = Clock()
    recent = RecentCalls(clock=clock)
    clock.now += 10
    for _ in range(50):
        recent.observe("a", 0.001)
    assert recent.summary()["a"][0] == pytest.approx(5.0)


def test_rates_of_several_places_add_per_second_and_pool_their_latencies():
    """The shards' read endpoints each count their calls over their own span; a deployment's rate is
    the sum of theirs, its p99 that of all their calls."""
    from monim.workers.metrics import rates

    bounds = (0.01, 0.1, 1.0)
    first = (60.0, {"a": [60, 0, 0, 0], "b": [0, 6, 0, 0]})  # an endpoint up for a minute or more
    second = (2.0, {"a": [0, 0, 4, 0]})                       # one started 2 s ago
    found = rates([first, second], 0.99, bounds)
    assert found["a"][0] == pytest.approx(60 / 60 + 4 / 2)
    assert found["a"][1] == bucket_quantile(0.99, [60, 0, 4, 0], bounds)
    assert found["b"] == (pytest.approx(0.1), bucket_quantile(0.99, [0, 6, 0, 0], bounds))
    assert rates([]) == {}
