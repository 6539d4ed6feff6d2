"""Online resharding of namespaces with an approximate index (ivf_flat, hnsw): rows move between
shards through their stores' adds and deletes, which the indexes follow (ivf's lists, hnsw's tail and
tombstones). While 2 -> 3 -> 1 -> 2 runs in small batches a thread searches with options wide enough
to be exact (every list probed, a beam as wide as the rows): no call fails and every answer is the
brute force over the rows; after each reshard every shard's index is built again over exactly the
rows it holds."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from monim.datastore import NamespaceConfig
from monim.workers.reshard import reshard
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime

from tests.unit.test_ivf_index import mixture
from tests.unit.test_reshard import all_ids, brute_force

DIM, K, ROWS = 16, 10, 4000
CONFIGS = {
    "ivf_flat": (NamespaceConfig("moved", dim=DIM, index="ivf_flat", nlist=8, train_min_rows=500), {"nprobe": 8}),
    "hnsw": (NamespaceConfig("moved", dim=DIM, index="hnsw", hnsw_m=16, train_min_rows=500), {"ef": ROWS}),
}


def indexed_rows(store) -> int:
    """Rows a store's index answers for once idle: the graph's or lists' entries less the tombstones."""
    index = store.approximate
    return index.index.ntotal - len(index._tombstones)


@pytest.mark.parametrize("index", sorted(CONFIGS))
def test_a_reshard_of_an_indexed_namespace_answers_exactly_throughout_and_rebuilds_every_shard(tmp_path, index):
    config, exact_options = CONFIGS[index]
    router = Router(LocalRuntime(2, data_dir=str(tmp_path), fsync="never", snapshot_every=0))
    router.create_namespace(config)
    keys = mixture(ROWS, DIM, 20, seed=51)
    ids = router.add("moved", keys, np.arange(ROWS) % 100).ids
    for shard in router.runtime.shards:
        assert shard.stores["moved"].wait_for_index(60)
    queries = mixture(6, DIM, 20, seed=52)
    truth = brute_force(keys, ids, queries, K)[0]
    stop, errors, answered = threading.Event(), [], [0]

    def searcher():
        while not stop.is_set():
            try:
                found = router.search("moved", queries, K, **exact_options)
                np.testing.assert_array_equal(np.sort(found.ids, axis=1), np.sort(truth, axis=1))
                answered[0] += 1
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(repr(error))
                stop.set()

    thread = threading.Thread(target=searcher)
    thread.start()
    try:
        for shards in (3, 1, 2):
            assert reshard(router, shards, batch_rows=250).done
            for shard in router.runtime.shards[:shards]:
                store = shard.stores["moved"]
                assert store.wait_for_index(60)
                stats = store.stats()
                assert stats["index_state"] == "trained" and stats["index_unindexed"] == 0
                assert indexed_rows(store) == len(store)
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert answered[0] >= 3
    assert np.sort(all_ids(router, "moved")).tolist() == np.sort(ids).tolist()
    np.testing.assert_array_equal(router.search("moved", queries, K, **exact_options).ids, truth)
    router.runtime.shutdown()


@pytest.mark.parametrize("when", ["index live", "build running"])
@pytest.mark.parametrize("index", sorted(CONFIGS))
def test_an_id_deleted_and_added_again_is_answered_once(index, when):
    """A reshard moves a row away and back (3 -> 1 -> 2): the store deletes its id and later adds it
    again. The index's old entry for it (a tombstone, or in a build's snapshot) must neither hide
    the new one nor answer beside it, and a compaction must not remove the new one."""
    import threading as threads

    from monim.datastore import NeighborStore

    config, exact_options = CONFIGS[index]
    keys = mixture(2000, DIM, 20, seed=53)
    store = NeighborStore(config)
    store.add(keys[:1500], np.zeros(1500, np.int32), ids=np.arange(1500))
    assert store.wait_for_index(60)
    gate = threads.Event()
    if when == "build running":
        store.approximate._start_build()  # a rebuild is queued: it snapshots the rows when it starts
        store.approximate._worker.submit(gate.wait)  # ... and the worker holds there, after the build
    moved = np.arange(0, 1500, 3)
    for _ in range(3):  # away and back, three times
        store.delete(ids=moved)
        store.add(keys[moved], np.zeros(moved.size, np.int32), ids=moved)
    gate.set()
    store.add(keys[1500:], np.zeros(500, np.int32), ids=np.arange(1500, 2000))
    for _ in range(2):
        assert store.wait_for_index(60)
        queries = keys[moved[:40]]
        found = store.search(queries, 5, **exact_options)
        np.testing.assert_array_equal(found.ids[:, 0], moved[:40])  # each is its own nearest, found
        assert all(len(set(row)) == 5 for row in found.ids.tolist()), "an id answered twice"
        store.delete(ids=np.arange(1500, 2000))  # past the compaction threshold: tombstones cleared
    assert store.approximate.index.ntotal - len(store.approximate._tombstones) == len(store) == 1500
    store.close()


@settings(max_examples=150, deadline=None)
@given(index=st.sampled_from(sorted(CONFIGS)),
       steps=st.lists(st.tuples(st.sampled_from(["add", "delete", "again", "build", "hold", "wait"]),
                                st.integers(1, 120)), min_size=1, max_size=14))
def test_an_indexed_store_answers_as_brute_force_through_any_adds_deletes_and_builds(index, steps):
    """Adds of new ids, deletes, the same ids added again (a row moved away and back), builds queued
    and the worker held while writes go on: after every step a search as wide as the rows answers
    exactly the brute force over the rows stored, each id once."""
    import threading as threads

    from monim.datastore import NeighborStore

    config, _ = CONFIGS[index]
    config = dataclasses.replace(config, train_min_rows=60)
    wide = {"nprobe": 8} if index == "ivf_flat" else {"ef": 2000}
    keys = mixture(2000, DIM, 20, seed=54)
    store = NeighborStore(config)
    store.add(keys[:100], np.zeros(100, np.int32), ids=np.arange(100))  # an index is built from here on
    assert store.wait_for_index(60)
    stored, gone, next_id, gates = set(range(100)), [], 100, []
    queries = mixture(4, DIM, 20, seed=55)
    try:
        for step, n in steps:
            if step == "add":
                ids = np.arange(next_id, min(next_id + n, 2000))
                next_id += ids.size
            elif step == "again":
                ids, gone = np.array(gone[:n], np.int64), gone[n:]
            if step in ("add", "again") and ids.size:
                store.add(keys[ids], np.zeros(ids.size, np.int32), ids=ids)
                stored.update(ids.tolist())
            elif step == "delete" and stored:
                ids = np.array(sorted(stored)[::max(1, len(stored) // n)][:n], np.int64)
                store.delete(ids=ids)
                stored.difference_update(ids.tolist())
                gone.extend(ids.tolist())
            elif step == "build" and store.approximate.index is not None and store.approximate._pending is None:
                store.approximate._start_build()
            elif step == "hold":
                gates.append(threads.Event())
                store.approximate._worker.submit(gates[-1].wait)
            elif step == "wait":
                for gate in gates:
                    gate.set()
                assert store.wait_for_index(60)
            if len(stored) >= 10:
                held = np.array(sorted(stored), np.int64)
                found = store.search(queries, 10, **wide)
                truth = brute_force(keys[held], held, queries, 10)[0]
                assert all(len(set(row)) == 10 for row in found.ids.tolist()), "an id answered twice"
                np.testing.assert_array_equal(np.sort(found.ids, axis=1), np.sort(truth, axis=1))
    finally:
        for gate in gates:
            gate.set()
        store.close()
