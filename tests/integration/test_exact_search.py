"""Acceptance: 100,000 entries of dim 64 through `monim serve --shards 2`; 1,000 queries at k=10
return exactly the numpy brute-force top-10 (ties aside), for l2 and ip."""

import numpy as np
import pytest

from tests.conftest import assert_same_neighbours, brute_force


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_service_search_is_exact(remote_client, namespace_name, metric):
    rng = np.random.default_rng(7)
    keys = rng.standard_normal((100_000, 64)).astype(np.float32)
    tokens = rng.integers(0, 50_000, 100_000)
    queries = rng.standard_normal((1_000, 64)).astype(np.float32)
    remote_client.create_namespace(namespace_name, dim=64, metric=metric)
    try:
        ids = np.concatenate([remote_client.add(namespace_name, keys[i:i + 25_000], tokens[i:i + 25_000])
                              for i in range(0, 100_000, 25_000)])
        assert ids.tolist() == list(range(100_000))
        description = remote_client.describe_namespace(namespace_name)
        assert description.rows == 100_000 and [s["rows"] for s in description.shards] == [50_000, 50_000]
        result = remote_client.search(namespace_name, queries, k=10)
        oracle_d, oracle_rows = brute_force(queries, keys, 10, metric)
        assert_same_neighbours(result.ids, result.distances, oracle_d, ids[oracle_rows], rtol=1e-4, atol=1e-3)
        exact = (result.ids == ids[oracle_rows]).mean()
        assert exact > 0.999, f"only {exact:.4%} of ids equal the oracle's"
        np.testing.assert_array_equal(result.tokens, tokens[result.ids].astype(np.int32))
    finally:
        remote_client.drop_namespace(namespace_name)
