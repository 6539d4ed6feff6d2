"""`monim status` with several front ends (workers/cli_status.py _merged): the front ends' own calls
are summed, the reads the shards' read endpoints answered, which every front end reports alike, are
added once."""

from __future__ import annotations

import pytest
from monim.workers.cli_status import _merged


def _scrape(own_per_s: float, own_p99: float) -> dict:
    return {"shards": {0: {"node": "n0", "state": "serving"}},
            "namespaces": {"mem": {"bytes": {0: 1024}, "requests_per_s": own_per_s, "p99_latency_s": own_p99,
                                   "endpoint_requests_per_s": 5.0, "endpoint_p99_latency_s": 0.004}}}


def test_front_ends_are_summed_and_the_endpoints_counted_once():
    merged = _merged([_scrape(2.0, 0.010), _scrape(3.0, 0.002)])
    namespace = merged["namespaces"]["mem"]
    assert namespace["requests_per_s"] == pytest.approx(2.0 + 3.0 + 5.0)
    assert namespace["p99_latency_s"] == 0.010
    assert set(namespace) == {"bytes", "requests_per_s", "p99_latency_s"}
    alone = _merged([{"shards": {}, "namespaces": {"mem": {"bytes": {}, "endpoint_requests_per_s": 1.5,
                                                           "endpoint_p99_latency_s": 0.02}}}])
    assert alone["namespaces"]["mem"]["requests_per_s"] == 1.5 and alone["namespaces"]["mem"]["p99_latency_s"] == 0.02
