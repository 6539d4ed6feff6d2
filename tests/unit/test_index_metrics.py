"""BackgroundIndex.metrics (datastore/background_index.py): the figures a shard's metrics report for an
approximate index, read without the store's lock, and the same as DescribeNamespace's (stats(), under
it). The exported families: tests/integration/test_metrics.py."""

import threading

import numpy as np
from monim.datastore import NeighborStore
from monim.protos.config import NamespaceConfig

DIM = 8


def built(config: NamespaceConfig, rows: int = 300) -> NeighborStore:
    store = NeighborStore(config)
    store.add(np.random.default_rng(3).standard_normal((rows, DIM), np.float32), np.zeros(rows, np.int32))
    assert store.wait_for_index(60)
    return store


def test_metrics_follow_the_life_of_an_hnsw_index_and_match_its_stats():
    store = NeighborStore(NamespaceConfig("g", dim=DIM, index="hnsw", train_min_rows=200))
    assert store.approximate.metrics() == {"state": "exact", "builds": 0, "tombstones": 0, "drift": None,
                                           "train_seconds": 0.0, "compaction_seconds": 0.0, "unindexed": 0}
    store.close()
    store = built(NamespaceConfig("g", dim=DIM, index="hnsw", train_min_rows=200))
    try:
        figures = store.approximate.metrics()
        assert figures["state"] == "trained" and figures["builds"] == 1 and figures["train_seconds"] > 0
        assert figures["unindexed"] == 0 and figures["drift"] is None
        with store._lock:  # the worker cannot move these rows into the graph while we hold the lock
            ids = store.add(np.ones((7, DIM), np.float32), np.zeros(7, np.int32))
            assert store.approximate.metrics()["unindexed"] == 7
            store.delete(ids[:2])  # out of the tail: no tombstone
            store.delete(np.arange(3, dtype=np.int64))  # in the graph: tombstones
            figures = store.approximate.metrics()
            assert (figures["unindexed"], figures["tombstones"]) == (5, 3)
            stats = store.stats()
        assert stats["index_state"] == figures["state"] and stats["index_trainings"] == figures["builds"]
        assert stats["index_unindexed"] == 5 and stats["index_tombstones"] == 3 and stats["index_drift"] == 0.0
        assert store.wait_for_index(60)
        assert store.approximate.metrics()["unindexed"] == 0
    finally:
        store.close()


def test_metrics_of_an_ivf_index_have_its_drift():
    store = built(NamespaceConfig("l", dim=DIM, index="ivf_flat", nlist=4, train_min_rows=200))
    try:
        store.add(np.random.default_rng(4).standard_normal((50, DIM), np.float32), np.zeros(50, np.int32))
        figures = store.approximate.metrics()
        assert figures["state"] == "trained" and figures["unindexed"] == 0
        assert figures["drift"] > 0 and round(figures["drift"], 4) == store.stats()["index_drift"]
        store.approximate._recent_rows = 0  # a swap emptied the window: the ratio starts again
        assert store.approximate.metrics()["drift"] == 0.0
    finally:
        store.close()


def test_metrics_never_wait_for_the_stores_lock():
    store = built(NamespaceConfig("g", dim=DIM, index="hnsw", train_min_rows=200))
    held, release, answer = threading.Event(), threading.Event(), {}

    def busy():  # a long search or add: the store's lock, held for a while
        with store._lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=busy, daemon=True)
    holder.start()
    try:
        assert held.wait(5)
        reading = threading.Thread(target=lambda: answer.update(store.approximate.metrics()), daemon=True)
        reading.start()
        reading.join(5)
        assert not reading.is_alive(), "metrics() waited for the store's lock"
        assert answer["state"] == "trained"
    finally:
        release.set()
        holder.join(10)
        store.close()
