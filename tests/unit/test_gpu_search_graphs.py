"""A GPU store's small searches replayed from CUDA graphs (datastore/search_graphs.py) answer as the
eager search does, and never with a stale view of the store. Skipped without a GPU."""

import threading

import numpy as np
import pytest
import torch
from monim.datastore import NamespaceConfig, NeighborStore, search_graphs

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")]

DIM, VALUE_DIM, ROWS = 96, 48, 30_000


def make_store(metric="l2", key_dtype="auto", rows=ROWS, seed=0):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((rows, DIM)).astype(np.float32)
    values = rng.standard_normal((rows, VALUE_DIM)).astype(np.float32)
    store = NeighborStore(NamespaceConfig("g", dim=DIM, value_dim=VALUE_DIM, metric=metric, key_dtype=key_dtype),
                          device="cuda")
    store.add(keys, np.arange(rows) % 5000, values=values, weights=rng.random(rows).astype(np.float32))
    return store, keys, rng


def assert_same_answer(found, expected):
    for name in ("ids", "distances", "tokens", "keys", "values", "weights"):
        a, b = getattr(found, name), getattr(expected, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, name
            np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("key_dtype", ["float16", "float32"])
@pytest.mark.parametrize("batch,k", [(1, 32), (4, 100), (16, 1)])
def test_a_replayed_search_answers_as_the_eager_one(metric, key_dtype, batch, k, monkeypatch):
    store, keys, rng = make_store(metric, key_dtype)
    queries = [rng.standard_normal((batch, DIM)).astype(np.float32) for _ in range(6)]
    columns = dict(return_keys=True, return_values=True, return_weights=True)
    answers = [store.search(q, k, **columns) for q in queries]
    assert store.graphs.captures == 1 and store.graphs.replays == len(queries) - 1
    monkeypatch.setattr(search_graphs, "ENABLED", False)
    for q, answer in zip(queries, answers):
        assert_same_answer(answer, store.search(q, k, **columns))


def test_a_search_after_a_write_sees_it():
    store, keys, rng = make_store()
    query = rng.standard_normal((1, DIM)).astype(np.float32)
    for _ in range(3):
        before = store.search(query, 5, return_values=True)
    assert store.graphs.replays >= 1
    # An added row equal to the query: a new shape, answered eagerly, then captured again.
    (new_id,) = store.add(query, np.array([7]), values=np.full((1, VALUE_DIM), 3.0, np.float32))
    for _ in range(3):
        found = store.search(query, 5, return_values=True)
        assert found.ids[0, 0] == new_id and found.distances[0, 0] == pytest.approx(0.0, abs=1e-3)
        np.testing.assert_array_equal(found.values[0, 0], np.full(VALUE_DIM, 3.0, np.float32))
    assert store.graphs.captures == 2
    # Values stepped in place (same rows, same shape): the graph reads them where they are.
    store.step(np.array([new_id]), np.ones((1, VALUE_DIM), np.float32))
    stepped = store.get(np.array([new_id])).values[0]
    assert not np.array_equal(stepped, np.full(VALUE_DIM, 3.0, np.float32))
    np.testing.assert_array_equal(store.search(query, 5, return_values=True).values[0, 0], stepped)
    # Deleted: gone from the next answer (fewer rows: a new shape).
    store.delete(np.array([new_id]))
    for _ in range(3):
        found = store.search(query, 5, return_values=True)
        np.testing.assert_array_equal(found.ids, before.ids)


def test_graphs_are_dropped_when_the_columns_move():
    store, keys, rng = make_store(rows=1000)  # capacity 1024
    query = keys[:1] + 0.01
    for _ in range(3):
        store.search(query, 8)
    layout, captured = store.rows.layout, store.graphs.captures
    more = rng.standard_normal((5000, DIM)).astype(np.float32)
    ids = store.add(more, np.arange(5000))  # the columns grow: reallocated
    assert store.rows.layout != layout
    for _ in range(3):
        found = store.search(more[4321:4322], 8)
        assert found.ids[0, 0] == ids[4321]
        # The graph over the old columns went at the first search after they moved.
        assert [key[0] for key in store.graphs._graphs] in ([], [6000])
    assert store.graphs.captures == captured + 1


def test_large_batches_and_answers_stay_eager(monkeypatch):
    store, keys, rng = make_store()
    monkeypatch.setattr(search_graphs, "MAX_ANSWER_BYTES", 1 << 15)
    for _ in range(3):
        store.search(keys[:search_graphs.MAX_BATCH + 1], 4)
        store.search(keys[:1], 200, return_values=True)  # 200 x (16 + 4 x 48) bytes: > 32 KiB
    assert store.graphs.captures == 0
    store.search(keys[:1], 200)
    store.search(keys[:1], 200)  # 200 x 16 bytes
    assert store.graphs.captures == 1


def test_a_capture_that_fails_leaves_searches_answered_eagerly(monkeypatch):
    store, keys, rng = make_store()

    def broken(queries, k, columns):
        if torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize()  # not allowed while capturing
        return NeighborStore._device_answer(store, queries, k, columns)

    monkeypatch.setattr(store.graphs, "_answer", broken)
    answers = [store.search(keys[:2] + 0.01, 3) for _ in range(4)]
    assert store.graphs.failure is not None and store.graphs.captures == 0
    for answer in answers:
        np.testing.assert_array_equal(answer.ids[:, 0], [0, 1])


def test_searches_from_threads_while_another_store_writes():
    store, keys, rng = make_store()
    other, _, _ = make_store(seed=1)
    queries = keys[:64] + 0.001
    errors = []

    def search(offset):
        try:
            for i in range(200):
                j = (offset + i) % 64
                found = store.search(queries[j : j + 1], 4)
                assert found.ids[0, 0] == j, (j, found.ids)
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    def write():
        try:
            for _ in range(50):
                other.add(rng.standard_normal((100, DIM)).astype(np.float32), np.arange(100))
                other.search(queries[:1], 4)
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=search, args=(o,)) for o in (0, 32)] + [threading.Thread(target=write)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert store.graphs.replays > 300
