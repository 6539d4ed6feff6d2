"""hnsw namespaces (datastore/hnsw_index.py): recall against exact search on clustered data, the
exact -> training -> trained life of a shard's graph, the tail (rows added to a live graph are
answered exactly at once and enter the graph in slices), deletes (out of the tail, tombstones of
the graph, a rebuild past the threshold), adds while another thread searches, learnable memory on
an hnsw namespace, restarts, the shard budget and the in-process client."""

import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from monim.datastore import NeighborStore
from monim.datastore import hnsw_index as hnsw
from monim.protos.config import NamespaceConfig
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime

from tests.unit.test_ivf_index import exact_ids, mixture, recall


def built_store(config: NamespaceConfig, keys: np.ndarray) -> NeighborStore:
    store = NeighborStore(config)
    store.add(keys, np.arange(len(keys)) % 1000)
    assert store.wait_for_index(120)
    assert store.stats()["index_state"] == "trained"
    return store


def exact_distances(keys, queries, ids, metric="l2"):
    if metric == "l2":
        return ((keys[ids] - queries[:, None, :]) ** 2).sum(axis=2)
    return -(keys[ids] * queries[:, None, :]).sum(axis=2)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_hnsw_recall_against_exact_on_clustered_data(metric):
    """The default beam (max(64, k)) finds >= 0.95 of the exact 10 nearest on a mixture of Gaussians,
    a wide one (ef 256) >= 0.99; the distances are the exact ones (the graph keeps float32 keys)."""
    keys, queries = mixture(20_000, 64, 100, seed=31), mixture(300, 64, 100, seed=32)
    store = built_store(NamespaceConfig("h", dim=64, metric=metric, index="hnsw", train_min_rows=5000), keys)
    flat = NeighborStore(NamespaceConfig("exact", dim=64, metric=metric))
    flat.add(keys, np.zeros(len(keys), np.int32))
    truth = flat.search(queries, 10).ids
    default = store.search(queries, 10)
    assert recall(default.ids, truth) >= 0.95
    wide = store.search(queries, 10, ef=256)
    assert recall(wide.ids, truth) >= 0.99
    np.testing.assert_allclose(wide.distances, exact_distances(keys, queries, wide.ids, metric), rtol=1e-4, atol=1e-3)
    assert (np.diff(wide.distances, axis=1) >= 0).all()


def test_a_store_is_exact_until_train_min_rows_then_builds_its_graph_in_the_background():
    keys, queries = mixture(3000, 16, 10, seed=33), mixture(20, 16, 10, seed=34)
    store = NeighborStore(NamespaceConfig("s", dim=16, index="hnsw", hnsw_m=8, train_min_rows=2000))
    store.add(keys[:1999], np.zeros(1999, np.int32))
    assert store.stats()["index_state"] == "exact"
    np.testing.assert_array_equal(store.search(queries, 5, ef=5).ids, exact_ids(keys[:1999], queries, 5))
    store.add(keys[1999:], np.zeros(1001, np.int32))
    assert store.stats()["index_state"] in ("training", "trained")
    assert store.wait_for_index(60)
    stats = store.stats()
    assert stats["index_state"] == "trained" and stats["index_trainings"] == 1 and stats["index_unindexed"] == 0
    assert store.approximate.index.ntotal == 3000
    store.close()


def test_rows_added_to_a_built_graph_are_answered_at_once_from_the_tail_then_enter_the_graph():
    keys = mixture(4000, 16, 10, seed=35)
    store = built_store(NamespaceConfig("t", dim=16, index="hnsw", hnsw_m=8, train_min_rows=3000), keys[:3000])
    gate = threading.Event()
    store.approximate._worker.submit(gate.wait)  # the worker is busy: the new rows stay in the tail
    try:
        new = keys[3000:] + 50.0  # far from every row in the graph
        ids = store.add(new, np.full(1000, 7, np.int32))
        assert store.stats()["index_unindexed"] == 1000 and store.approximate.index.ntotal == 3000
        found = store.search(new[:50], 3)
        np.testing.assert_array_equal(found.ids[:, 0], ids[:50])  # each new row is its own nearest
        np.testing.assert_array_equal(found.distances[:, 0], np.zeros(50, np.float32))
        assert (found.tokens[:, 0] == 7).all()
        mixed = store.search(np.concatenate([keys[:5], new[:5]]), 10)  # graph and tail answers merged
        assert (np.diff(mixed.distances, axis=1) >= 0).all() and all(len(set(r)) == 10 for r in mixed.ids)
        np.testing.assert_array_equal(mixed.ids[:, 0], np.concatenate([np.arange(5), ids[:5]]))
    finally:
        gate.set()
    assert store.wait_for_index(60)
    assert store.stats()["index_unindexed"] == 0 and store.approximate.index.ntotal == 4000
    np.testing.assert_array_equal(store.search(new[:50], 1).ids[:, 0], ids[:50])  # now from the graph
    store.close()


def test_an_add_past_the_tail_limit_inserts_the_excess_itself(monkeypatch):
    monkeypatch.setattr(hnsw, "MAX_TAIL_ROWS", 300)
    keys = mixture(3000, 16, 10, seed=36)
    store = built_store(NamespaceConfig("cap", dim=16, index="hnsw", hnsw_m=8, train_min_rows=2000), keys[:2000])
    gate = threading.Event()
    store.approximate._worker.submit(gate.wait)
    try:
        ids = store.add(keys[2000:], np.zeros(1000, np.int32))
        assert store.stats()["index_unindexed"] == 300  # the newest 300 wait; the oldest 700 were inserted
        assert store.approximate.index.ntotal == 2700
        assert (store.search(keys[2000:], 1, ef=64).ids[:, 0] == ids).mean() >= 0.99  # graph or tail
        np.testing.assert_array_equal(store.search(keys[2700:], 1).ids[:, 0], ids[700:])  # the tail: exact
    finally:
        gate.set()
    assert store.wait_for_index(60) and store.approximate.index.ntotal == 3000
    store.close()


def test_deletes_leave_the_tail_are_tombstones_in_the_graph_and_a_rebuild_clears_them():
    keys, queries = mixture(5000, 16, 10, seed=37), mixture(30, 16, 10, seed=38)
    store = built_store(NamespaceConfig("d", dim=16, index="hnsw", hnsw_m=8, train_min_rows=4000), keys[:4000])
    gate = threading.Event()
    store.approximate._worker.submit(gate.wait)
    try:
        tail_ids = store.add(keys[4000:], np.zeros(1000, np.int32))
        store.delete(ids=tail_ids[:100])  # still in the tail: it just leaves it
        assert store.stats()["index_unindexed"] == 900 and store.stats()["index_tombstones"] == 0
        nearest = store.search(queries, 5).ids
        store.delete(ids=nearest[:, 0])
        assert store.stats()["index_tombstones"] == len(np.setdiff1d(np.unique(nearest[:, 0]), tail_ids))
        again = store.search(queries, 5, ef=100)
        assert not np.isin(again.ids, np.concatenate([nearest[:, 0], tail_ids[:100]])).any()
        assert (again.ids >= 0).all()  # the tombstones take no slot: still 5 answers each
    finally:
        gate.set()
    assert store.wait_for_index(60)
    trainings = store.stats()["index_trainings"]
    store.delete(ids=np.arange(0, 1500))  # past 10% of the graph's rows and 1,024: a rebuild
    assert store.wait_for_index(60)
    stats = store.stats()
    assert stats["index_tombstones"] == 0 and stats["index_trainings"] == trainings + 1
    assert store.approximate.index.ntotal == len(store)
    found = store.search(queries, 5, ef=100).ids
    assert (found >= 1500).all() and not np.isin(found, nearest[:, 0]).any()
    store.close()


def test_adding_20k_rows_while_another_thread_searches_two_shards():
    """Rows added in batches past train_min_rows (the first builds, then the tails and their
    slices into the graph) while a thread searches: every answer is whole (k distinct stored ids,
    sorted distances that are the exact distances to those ids' keys), exact while no graph was
    live, and of high recall after."""
    dim, k, batch = 32, 10, 1000
    keys = mixture(20_000, dim, 50, seed=39)
    queries = mixture(16, dim, 50, seed=40)
    router = Router(LocalRuntime(2))
    router.create_namespace(NamespaceConfig("live", dim=dim, index="hnsw", hnsw_m=16, train_min_rows=4000))
    added = [0]
    answers, errors, states = [], [], []
    done = threading.Event()

    def search_loop():
        while not done.is_set():
            before = added[0]
            built_before = sum(s["index_trainings"] > 0 for s in router.describe_namespace("live")["shards"])
            try:
                found = router.search("live", queries, k, ef=128)
            except Exception as error:  # noqa: BLE001 - the test fails on any
                errors.append(error)
                return
            states.append(tuple(s["index_state"] for s in router.describe_namespace("live")["shards"]))
            answers.append((before, added[0], built_before, found))

    router.add("live", keys[:batch], np.arange(batch, dtype=np.int32))
    added[0] = batch
    searcher = threading.Thread(target=search_loop)
    searcher.start()
    try:
        for start in range(batch, len(keys), batch):
            router.add("live", keys[start:start + batch], np.arange(batch, dtype=np.int32))
            added[0] = start + batch
            time.sleep(0.05)
        for shard in router.runtime.shards:
            assert shard.stores["live"].wait_for_index(120)
        time.sleep(0.3)
    finally:
        done.set()
        searcher.join()
    assert not errors, errors
    shards = router.describe_namespace("live")["shards"]
    assert [s["index_state"] for s in shards] == ["trained", "trained"]
    assert all(s["rows"] == 10_000 and s["index_unindexed"] == 0 for s in shards)
    assert any("exact" in s for s in states) and any(set(s) == {"trained"} for s in states)
    exact_checked = approximate = 0
    for before, after, built_before, found in answers:
        ids = found.ids
        assert ids.shape == (len(queries), k) and (ids >= 0).all() and (ids < after).all()
        assert all(len(set(row)) == k for row in ids)
        assert (np.diff(found.distances, axis=1) >= 0).all()
        np.testing.assert_allclose(found.distances, exact_distances(keys, queries, ids), rtol=1e-4, atol=1e-3)
        if built_before == 0 and before == after:
            np.testing.assert_array_equal(np.sort(ids, axis=1), np.sort(exact_ids(keys[:after], queries, k), axis=1))
            exact_checked += 1
        elif before == after and built_before == 2:
            assert recall(ids, exact_ids(keys[:after], queries, k)) >= 0.9
            approximate += 1
    assert exact_checked >= 1 and approximate >= 1, (exact_checked, approximate)


def test_learnable_memory_works_the_same_on_an_hnsw_namespace():
    """Retrieve, its backward and ApplyGradients act on rows by id, whatever the index: with a beam
    as wide as the graph the answers are those of flat search."""
    keys, queries = mixture(3000, 16, 10, seed=41), mixture(8, 16, 10, seed=42)
    results = {}
    for index in ("flat", "hnsw"):
        options = dict(train_min_rows=1000) if index != "flat" else {}
        router = Router(LocalRuntime(2))
        router.create_namespace(NamespaceConfig("m", dim=16, value_dim=4, index=index, **options))
        router.add("m", keys, np.arange(3000) % 50,
                   values=np.random.default_rng(43).standard_normal((3000, 4)).astype(np.float32))
        for shard in router.runtime.shards:
            assert shard.stores["m"].wait_for_index(60)
        search = dict(ef=1500) if index != "flat" else {}
        forward = router.retrieve("m", queries, 5, temperature=1.0, **search)
        grad_q, _ = router.retrieve_backward("m", forward.queries, forward.ids, forward.alpha, forward.distances,
                                             np.ones((8, 4), np.float32), 1.0)
        router.apply_gradients("m", forward.ids[:, 0], np.ones((8, 4), np.float32))
        results[index] = (forward, grad_q, router.get("m", forward.ids[:, 0]).values)
    (flat_forward, flat_grad, flat_values), (graph_forward, graph_grad, graph_values) = results["flat"], results["hnsw"]
    np.testing.assert_array_equal(graph_forward.ids, flat_forward.ids)
    np.testing.assert_allclose(graph_forward.distances, flat_forward.distances, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(graph_forward.memory, flat_forward.memory, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(graph_grad, flat_grad, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(graph_values, flat_values, rtol=1e-6)


def test_a_restarted_shard_builds_its_graph_again_from_the_recovered_rows(tmp_path):
    keys, queries = mixture(3000, 16, 10, seed=44), mixture(20, 16, 10, seed=45)
    config = NamespaceConfig("r", dim=16, index="hnsw", hnsw_m=8, train_min_rows=1000)  # per shard
    router = Router(LocalRuntime(2, data_dir=str(tmp_path), snapshot_every=3))
    router.create_namespace(config)
    for start in range(0, 3000, 500):
        router.add("r", keys[start:start + 500], np.zeros(500, np.int32))
    router.delete("r", ids=np.arange(10))
    for shard in router.runtime.shards:
        assert shard.stores["r"].wait_for_index(60) and shard.stores["r"].stats()["index_state"] == "trained"
    before = router.search("r", queries, 5, ef=1500)
    router.runtime.shutdown()
    again = Router(LocalRuntime(2, data_dir=str(tmp_path)))
    for shard in again.runtime.shards:
        assert shard.stores["r"].wait_for_index(60)
    description = again.describe_namespace("r")
    assert [s["index_state"] for s in description["shards"]] == ["trained", "trained"]
    assert description["rows"] == 2990 and description["config"].hnsw_m == 8
    after = again.search("r", queries, 5, ef=1500)
    np.testing.assert_array_equal(after.ids, before.ids)
    assert not np.isin(after.ids, np.arange(10)).any()
    again.runtime.shutdown()


def test_an_hnsw_namespace_counts_its_graph_against_the_shard_budget():
    """Every row of an hnsw namespace is counted with its graph entry (key copy, id, neighbours) and
    the tail's copies of keys (as many as the rows, up to MAX_TAIL_ROWS) from the start: a budget that
    holds the rows alone but not the graph
    refuses the Add, and nothing is stored."""
    from monim.protos.errors import ResourceExhausted
    from monim.workers.shard import Shard

    config = NamespaceConfig("cap", dim=16, index="hnsw", hnsw_m=8, train_min_rows=1000)
    assert hnsw.entry_bytes(config) == 4 * 16 + 8 + 12 + 4 * 16 + 8
    probe = Shard(0)
    probe.create_namespace(config.to_dict())
    store = probe.stores["cap"]
    tail = min(1024, hnsw.MAX_TAIL_ROWS) * 4 * 16  # the tail's copies: at most as many as the rows
    assert probe._memory_used() == 1024 * store.rows.row_bytes + 1024 * hnsw.entry_bytes(config) + tail
    rows_alone = 3 * 1024 * store.rows.row_bytes
    router = Router(LocalRuntime(1, memory_budget=rows_alone + 1024 * hnsw.entry_bytes(config) + tail))
    router.create_namespace(config)
    with pytest.raises(ResourceExhausted, match="no room for 1500 more rows of namespace 'cap'"):
        router.add("cap", mixture(1500, 16, 4, seed=46), np.zeros(1500, np.int32))
    assert router.describe_namespace("cap")["rows"] == 0
    router.add("cap", mixture(1000, 16, 4, seed=46), np.zeros(1000, np.int32))
    assert router.runtime.shards[0].stores["cap"].wait_for_index(60)
    assert router.describe_namespace("cap")["shards"][0]["index_state"] == "trained"


def test_the_in_process_client_has_the_hnsw_index():
    from monim import MemoryClient

    keys, queries = mixture(3000, 16, 10, seed=47), mixture(5, 16, 10, seed=48)
    with MemoryClient(":memory:") as client:
        client.create_namespace("mem", dim=16, index="hnsw", hnsw_m=8, ef_construction=40, train_min_rows=1000)
        client.add("mem", keys, np.zeros(3000, np.int32))
        client._store.runtime.shards[0].stores["mem"].wait_for_index(60)
        description = client.describe_namespace("mem")
        assert description.shards[0]["index_state"] == "trained"
        assert (description.config.hnsw_m, description.config.ef_construction) == (8, 40)
        found = client.search("mem", queries, 5, ef=3000)
        np.testing.assert_array_equal(found.ids, exact_ids(keys, queries, 5))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["append", "take", "remove"]), st.integers(0, 700)), max_size=30))
def test_the_tail_keeps_its_rows_in_order_through_appends_takes_and_removes(operations):
    """The tail's buffers (grown by doubling, rows taken from the front) against a list of the same rows."""
    tail, model, next_id = hnsw._Tail(3), [], 0
    for operation, n in operations:
        if operation == "append":
            ids = np.arange(next_id, next_id + n, dtype=np.int64)
            next_id += n
            tail.append(ids, np.repeat(ids[:, None], 3, axis=1).astype(np.float32))
            model.extend(ids.tolist())
        elif operation == "take":
            ids, keys = tail.take(n)
            assert ids.tolist() == model[:n] and (keys == ids[:, None]).all()
            model = model[n:]
        else:
            asked = np.arange(0, next_id + 5, max(1, n), dtype=np.int64)
            others = tail.remove(asked)
            assert sorted(others.tolist()) == sorted(set(asked.tolist()) - set(model))
            model = [i for i in model if i not in set(asked.tolist())]
        assert tail.ids.tolist() == model and (tail.keys == tail.ids[:, None]).all() and len(tail) == len(model)


def test_an_insertion_that_fails_keeps_its_rows_in_the_tail_and_the_next_add_tries_again(monkeypatch, caplog):
    keys = mixture(3000, 16, 10, seed=49)
    store = built_store(NamespaceConfig("f", dim=16, index="hnsw", hnsw_m=8, train_min_rows=2000), keys[:2000])
    graph = store.approximate.index
    calls = {"n": 0}
    real_add = type(graph).add_with_ids

    def failing_once(self, *args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("insertion failed")
        return real_add(self, *args)

    monkeypatch.setattr(type(graph), "add_with_ids", failing_once)
    ids = store.add(keys[2000:2500], np.zeros(500, np.int32))
    assert not store.wait_for_index(2) or store.stats()["index_unindexed"] == 500  # the worker gave up on it
    assert "insertion failed" in caplog.text
    assert store.stats()["index_unindexed"] == 500 and graph.ntotal == 2000
    np.testing.assert_array_equal(store.search(keys[2000:2500], 1).ids[:, 0], ids)  # still answered, exactly
    store.add(keys[2500:], np.zeros(500, np.int32))  # the next add starts the worker again
    assert store.wait_for_index(60)
    assert store.stats()["index_unindexed"] == 0 and graph.ntotal == 3000
    store.close()
