"""merge_topk: the global top-k of sorted per-shard lists, against a brute-force stable sort."""

import numpy as np
import pytest
from monim.datastore import SearchResult
from monim.workers.merge import merge_topk


def shard_result(rng, batch, k, missing=0, dim=0, value_dim=0, weights=False, start=0):
    """A sorted per-shard list; the last ``missing`` slots of every row are empty (+inf, id -1)."""
    distances = np.sort(rng.integers(0, 50, (batch, k)).astype(np.float32), axis=1)  # many ties
    ids = start + np.arange(batch * k, dtype=np.int64).reshape(batch, k)
    tokens = (ids % 1000).astype(np.int32)
    result = SearchResult(
        ids=ids, distances=distances, tokens=tokens,
        keys=rng.standard_normal((batch, k, dim)).astype(np.float32) if dim else None,
        values=rng.standard_normal((batch, k, value_dim)).astype(np.float32) if value_dim else None,
        weights=rng.random((batch, k), dtype=np.float32) if weights else None)
    if missing:  # as the store fills them: +inf, id -1, token -1, zeros
        distances[:, -missing:], ids[:, -missing:], tokens[:, -missing:] = np.inf, -1, -1
        for array in (result.keys, result.values, result.weights):
            if array is not None:
                array[:, -missing:] = 0
    return result


def reference(results, k):
    """Stable sort of the concatenated lists (shard order, then rank, among equal distances)."""
    distances = np.concatenate([r.distances for r in results], axis=1)
    order = np.array([sorted(range(distances.shape[1]), key=lambda j, row=row: (row[j], j))[:k]
                      for row in distances])
    out = {}
    for name in ("ids", "distances", "tokens", "keys", "values", "weights"):
        if getattr(results[0], name) is None:
            out[name] = None
            continue
        merged = np.concatenate([getattr(r, name) for r in results], axis=1)
        out[name] = merged[np.arange(merged.shape[0])[:, None], order]
    return out


FIELDS = ("ids", "distances", "tokens", "keys", "values", "weights")


def test_two_shards_merge_exactly_like_a_stable_sort(rng):
    # Two shards (a timsort merge): equal distances keep shard order, then rank order.
    for k in (1, 7, 64):
        results = [shard_result(rng, 6, k, missing=min(k - 1, s), dim=3, value_dim=2, weights=True,
                                start=10_000 * s) for s in range(2)]
        merged, expected = merge_topk(results, k), reference(results, k)
        for name in FIELDS:
            got = getattr(merged, name)
            assert got.shape == expected[name].shape and got.dtype == expected[name].dtype, name
            np.testing.assert_array_equal(got, expected[name], err_msg=name)


@pytest.mark.parametrize("shards", [2, 3, 5, 8])
@pytest.mark.parametrize("k", [1, 7, 64])
def test_merge_keeps_the_nearest_whole_entries(rng, shards, k):
    # Any shard count: the distances are those of a sort of all lists, every slot holds one whole
    # entry (all its fields from the same shard slot), and only ties at the k-th distance may differ.
    results = [shard_result(rng, 6, k, missing=min(k - 1, s), dim=3, value_dim=2, weights=True, start=10_000 * s)
               for s in range(shards)]
    merged, expected = merge_topk(results, k), reference(results, k)
    for name in FIELDS:
        got = getattr(merged, name)
        assert got.shape == expected[name].shape and got.dtype == expected[name].dtype, name
    np.testing.assert_array_equal(merged.distances, expected["distances"])
    entries = {}
    for r in results:
        for row in range(r.ids.shape[0]):
            for slot in range(k):
                entries[row, int(r.ids[row, slot])] = tuple(getattr(r, f)[row, slot].tobytes() for f in FIELDS)
    for row in range(merged.ids.shape[0]):
        found = merged.ids[row][merged.ids[row] >= 0]
        assert len(set(found.tolist())) == found.size  # no entry twice
        for slot in range(k):
            assert entries[row, int(merged.ids[row, slot])] == tuple(
                getattr(merged, f)[row, slot].tobytes() for f in FIELDS)
        below = merged.distances[row] < merged.distances[row, -1]
        assert set(merged.ids[row][below].tolist()) == set(expected["ids"][row][below].tolist())


def test_fields_not_asked_for_stay_none(rng):
    merged = merge_topk([shard_result(rng, 4, 5), shard_result(rng, 4, 5, start=100)], 5)
    assert merged.keys is None and merged.values is None and merged.weights is None
    assert merged.ids.shape == merged.tokens.shape == merged.distances.shape == (4, 5)


def test_missing_slots_sort_last_and_stay_missing():
    inf = np.inf
    a = SearchResult(ids=np.array([[5, -1, -1]]), distances=np.array([[0.5, inf, inf]], np.float32),
                     tokens=np.array([[50, -1, -1]], np.int32))
    b = SearchResult(ids=np.array([[-1, -1, -1]]), distances=np.full((1, 3), inf, np.float32),
                     tokens=np.full((1, 3), -1, np.int32))
    merged = merge_topk([b, a], 3)
    assert merged.ids.tolist() == [[5, -1, -1]] and merged.tokens.tolist() == [[50, -1, -1]]
    assert merged.distances[0, 0] == np.float32(0.5) and np.isinf(merged.distances[0, 1:]).all()


def test_equal_distances_keep_shard_order_with_two_shards():
    a = SearchResult(ids=np.array([[1, 3]]), distances=np.array([[0.0, 1.0]], np.float32),
                     tokens=np.array([[1, 3]], np.int32))
    b = SearchResult(ids=np.array([[2, 4]]), distances=np.array([[0.0, 1.0]], np.float32),
                     tokens=np.array([[2, 4]], np.int32))
    assert merge_topk([a, b], 4).ids.tolist() == [[1, 2, 3, 4]]
    assert merge_topk([b, a], 3).ids.tolist() == [[2, 1, 4]]


def test_negative_distances_inner_product():
    a = SearchResult(ids=np.array([[1, 3]]), distances=np.array([[-9.0, -1.0]], np.float32),
                     tokens=np.array([[1, 3]], np.int32))
    b = SearchResult(ids=np.array([[2, 4]]), distances=np.array([[-5.0, 2.0]], np.float32),
                     tokens=np.array([[2, 4]], np.int32))
    merged = merge_topk([a, b], 3)
    assert merged.ids.tolist() == [[1, 2, 3]]
    np.testing.assert_array_equal(merged.distances, [[-9.0, -5.0, -1.0]])


def test_one_shard_is_passed_through(rng):
    only = shard_result(rng, 2, 4)
    assert merge_topk([only], 4) is only
