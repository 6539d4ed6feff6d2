"""NeighborStore against the numpy brute-force oracle, for both kernels and both metrics."""

import numpy as np
import pytest
from monim.datastore import NamespaceConfig, NeighborStore
from monim.protos.errors import AlreadyExists, IdsNotFound, InvalidArgument

from tests.conftest import assert_same_neighbours, brute_force

BACKENDS = ["faiss", "torch"]
METRICS = ["l2", "ip"]


def make_store(metric="l2", backend="faiss", dim=16, value_dim=4, max_k=64):
    return NeighborStore(NamespaceConfig("ns", dim=dim, metric=metric, value_dim=value_dim, max_k=max_k),
                         backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", METRICS)
def test_search_matches_brute_force(rng, backend, metric):
    store = make_store(metric, backend)
    keys = rng.standard_normal((5000, 16)).astype(np.float32)
    ids = store.add(keys, np.arange(5000) % 97)
    queries = rng.standard_normal((200, 16)).astype(np.float32)
    result = store.search(queries, 20)
    oracle_d, oracle_rows = brute_force(queries, keys, 20, metric)
    assert_same_neighbours(result.ids, result.distances, oracle_d, ids[oracle_rows])
    np.testing.assert_array_equal(result.tokens, (ids[oracle_rows] % 97).astype(np.int32))
    assert result.ids.dtype == np.int64 and result.distances.dtype == np.float32 and result.tokens.dtype == np.int32


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_kernel_chunks_over_rows(rng, backend, monkeypatch):
    from monim.datastore import flat_index

    monkeypatch.setattr(flat_index, "_SCORE_BLOCK_BYTES", 4 * 8 * 1000)  # forces 1024-row chunks
    monkeypatch.setattr(flat_index, "_SMALL_SCORE_BLOCK_BYTES", 0)  # chunks even for small searches
    store = make_store("l2", backend)
    keys = rng.standard_normal((4500, 16)).astype(np.float32)
    store.add(keys, np.zeros(4500, np.int32))
    queries = rng.standard_normal((8, 16)).astype(np.float32)
    result = store.search(queries, 50)
    oracle_d, oracle_rows = brute_force(queries, keys, 50, "l2")
    assert_same_neighbours(result.ids, result.distances, oracle_d, oracle_rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fewer_rows_than_k_pads_with_minus_one_and_inf(backend):
    store = make_store(backend=backend)
    store.add(np.eye(16, dtype=np.float32)[:3], np.array([5, 6, 7]))
    result = store.search(np.eye(16, dtype=np.float32)[:2], 5, return_weights=True, return_values=True)
    assert result.ids[0, 0] == 0 and set(result.ids[0, :3].tolist()) == {0, 1, 2}
    assert (result.ids[:, 3:] == -1).all() and np.isinf(result.distances[:, 3:]).all()
    assert (result.tokens[:, 3:] == -1).all() and (result.weights[:, 3:] == 0).all()
    assert result.values.shape == (2, 5, 4)


def test_empty_store_returns_only_missing_slots():
    result = make_store().search(np.zeros((2, 16), np.float32), 4)
    assert (result.ids == -1).all() and np.isinf(result.distances).all()


def test_add_get_delete_round_trip(rng):
    store = make_store()
    keys = rng.standard_normal((10, 16)).astype(np.float32)
    values = rng.standard_normal((10, 4)).astype(np.float32)
    ids = store.add(keys, np.arange(10), values=values, weights=np.full(10, 2.0, np.float32), source="day-1")
    assert ids.tolist() == list(range(10))
    rows = store.get(ids[[7, 2]])
    np.testing.assert_array_equal(rows.keys, keys[[7, 2]])
    np.testing.assert_array_equal(rows.values, values[[7, 2]])
    assert rows.tokens.tolist() == [7, 2] and rows.weights.tolist() == [2.0, 2.0] and rows.sources == ["day-1"] * 2
    assert store.delete(ids=np.array([2, 3, 999])) == 2  # unknown ids are ignored
    assert len(store) == 8
    with pytest.raises(IdsNotFound, match=r"\[2\]"):
        store.get(np.array([2]))
    # Moved rows are still found by id and by search.
    rows = store.get(ids[[9, 8]])
    np.testing.assert_array_equal(rows.keys, keys[[9, 8]])
    assert store.search(keys[9:10], 1).ids[0, 0] == 9
    later = store.add(keys[:2], np.arange(2), source="day-2")
    assert later.tolist() == [10, 11]  # ids are never reused
    assert store.delete(source="day-1") == 8 and len(store) == 2


def test_values_default_to_zero_and_weights_to_one():
    store = make_store()
    ids = store.add(np.ones((2, 16), np.float32), np.arange(2))
    rows = store.get(ids)
    assert (rows.values == 0).all() and (rows.weights == 1).all()


def test_caller_chosen_ids_must_be_new():
    store = make_store()
    store.add(np.ones((2, 16), np.float32), np.arange(2), ids=np.array([10, 20]))
    with pytest.raises(AlreadyExists):
        store.add(np.ones((1, 16), np.float32), np.arange(1), ids=np.array([20]))
    assert len(store) == 2 and store.next_id == 21


def test_growth_past_initial_capacity(rng):
    store = make_store()
    keys = rng.standard_normal((3000, 16)).astype(np.float32)
    for start in range(0, 3000, 700):
        store.add(keys[start:start + 700], np.arange(min(700, 3000 - start)))
    assert len(store) == 3000
    np.testing.assert_array_equal(store.get(np.array([2999])).keys, keys[2999:])


def test_float16_keys_are_accepted():
    store = make_store()
    ids = store.add(np.ones((2, 16), np.float16), np.arange(2))
    assert store.search(np.ones((1, 16), np.float16), 1).ids[0, 0] in ids


@pytest.mark.parametrize("call, fragment", [
    (lambda s: s.add(np.ones((2, 8), np.float32), np.arange(2)), "width 8 but the namespace's dim is 16"),
    (lambda s: s.add(np.ones((2, 16), np.float64), np.arange(2)), "dtype float64"),
    (lambda s: s.add(np.ones((2, 16), np.float32), np.arange(3)), "different lengths"),
    (lambda s: s.add(np.ones((0, 16), np.float32), np.arange(0)), "empty batch"),
    (lambda s: s.add(np.full((2, 16), np.nan, np.float32), np.arange(2)), "NaN or Inf"),
    (lambda s: s.add(np.ones((2, 16), np.float32), np.arange(2), values=np.ones((2, 3), np.float32)), "value_dim"),
    (lambda s: s.add(np.ones((2, 16), np.float32), np.arange(2), weights=np.zeros(2, np.float32)), "> 0"),
    (lambda s: s.search(np.ones((1, 16), np.float32), 0), "k must be in"),
    (lambda s: s.search(np.ones((1, 16), np.float32), 65), "k must be in"),
    (lambda s: s.search(np.full((1, 16), np.inf, np.float32), 1), "NaN or Inf"),
    (lambda s: s.delete(), "either ids or a source"),
])
def test_bad_input_changes_nothing(call, fragment):
    store = make_store()
    store.add(np.ones((3, 16), np.float32), np.arange(3))
    before = store.get(np.arange(3))
    with pytest.raises(InvalidArgument, match=fragment):
        call(store)
    after = store.get(np.arange(3))
    assert len(store) == 3 and store.next_id == 3
    np.testing.assert_array_equal(before.keys, after.keys)


def test_remove_answers_the_ids_that_went_each_once(rng):
    """NeighborStore.remove (what a shard remembers for a delete's retries): the ids of the rows it removed;
    an id named twice or not stored counts once or not at all, as delete counts."""
    store = make_store()
    ids = store.add(rng.standard_normal((10, 16)).astype(np.float32), np.arange(10), source="a")
    store.add(rng.standard_normal((5, 16)).astype(np.float32), np.arange(5), source="b")
    removed = store.remove(ids=np.array([ids[3], ids[3], ids[7], 10_000]))
    assert sorted(removed.tolist()) == sorted([int(ids[3]), int(ids[7])]) and removed.dtype == np.int64
    assert sorted(store.remove(source="a").tolist()) == sorted(int(i) for i in ids if i not in (ids[3], ids[7]))
    assert store.remove(source="a").size == 0 and store.remove(ids=np.array([ids[3]])).size == 0
    assert len(store) == 5 and store.delete(source="b") == 5
