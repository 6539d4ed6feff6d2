"""ivf_flat / ivf_pq namespaces (datastore/ivf_index.py): recall against exact search on clustered
data, the exact -> training -> trained life of a shard's index under concurrent adds and searches,
tombstones and their compaction, drift retraining, learnable memory on an ivf namespace, and
restarts (the index is trained again from the recovered rows)."""

import threading
import time

import numpy as np
import pytest
from monim.datastore import NeighborStore
from monim.datastore import ivf_index as ivf
from monim.protos.config import NamespaceConfig
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime


def mixture(rows: int, dim: int, clusters: int, seed: int, spread: float = 0.5, centers=None):
    """A mixture of Gaussians: float32 [rows, dim] around `clusters` centres (standard normal)."""
    rng = np.random.default_rng(seed)
    if centers is None:
        centers = np.random.default_rng(1234).standard_normal((clusters, dim)).astype(np.float32)
    points = centers[rng.integers(0, len(centers), rows)] + spread * rng.standard_normal((rows, dim))
    return points.astype(np.float32)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth)]))


def exact_ids(keys: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    store = NeighborStore(NamespaceConfig("exact", dim=keys.shape[1]))
    store.add(keys, np.zeros(len(keys), np.int32))
    return store.search(queries, k).ids


def trained_store(config: NamespaceConfig, keys: np.ndarray) -> NeighborStore:
    store = NeighborStore(config)
    store.add(keys, np.arange(len(keys)) % 1000)
    assert store.wait_for_index(120)
    assert store.stats()["index_state"] == "trained"
    return store


def test_ivf_pq_recall_against_exact_on_clustered_data():
    """Acceptance 1 at CI size (bench/ivf_bench.py runs 200k x 64): nprobe 32, rerank 0 >= 0.95;
    rerank 100 >= 0.99. pq_m = dim: one byte per dimension."""
    keys, queries = mixture(40_000, 64, 100, seed=1), mixture(300, 64, 100, seed=2)
    store = trained_store(NamespaceConfig("pq", dim=64, index="ivf_pq", nlist=128, pq_m=64,
                                          train_min_rows=20_000), keys)
    truth = exact_ids(keys, queries, 10)
    assert recall(store.search(queries, 10, nprobe=32).ids, truth) >= 0.95
    reranked = store.search(queries, 10, nprobe=32, rerank=100)
    assert recall(reranked.ids, truth) >= 0.99
    # re-ranked distances are the exact ones, sorted
    exact = ((keys[reranked.ids] - queries[:, None, :]) ** 2).sum(axis=2)
    np.testing.assert_allclose(reranked.distances, exact, rtol=1e-4, atol=1e-3)
    assert (np.diff(reranked.distances, axis=1) >= 0).all()


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_ivf_flat_probing_every_list_is_exact(metric):
    keys, queries = mixture(6000, 16, 20, seed=3), mixture(50, 16, 20, seed=4)
    store = trained_store(NamespaceConfig("f", dim=16, metric=metric, index="ivf_flat", nlist=16,
                                          train_min_rows=2000), keys)
    flat = NeighborStore(NamespaceConfig("exact", dim=16, metric=metric))
    flat.add(keys, np.arange(len(keys)) % 1000)
    found, truth = store.search(queries, 10, nprobe=16), flat.search(queries, 10)
    np.testing.assert_array_equal(found.ids, truth.ids)
    np.testing.assert_allclose(found.distances, truth.distances, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(found.tokens, truth.tokens)


def test_a_store_is_exact_until_train_min_rows_then_trains_in_the_background():
    keys, queries = mixture(3000, 16, 10, seed=5), mixture(20, 16, 10, seed=6)
    store = NeighborStore(NamespaceConfig("s", dim=16, index="ivf_pq", nlist=8, pq_m=8, train_min_rows=2000))
    store.add(keys[:1999], np.zeros(1999, np.int32))
    assert store.stats()["index_state"] == "exact"
    np.testing.assert_array_equal(store.search(queries, 5, nprobe=3, rerank=7).ids,
                                  exact_ids(keys[:1999], queries, 5))  # exact: options change nothing
    store.add(keys[1999:], np.zeros(1001, np.int32))
    assert store.stats()["index_state"] in ("training", "trained")
    assert store.wait_for_index(60)
    stats = store.stats()
    assert stats["index_state"] == "trained" and stats["index_trainings"] == 1
    assert store.approximate.index.ntotal == 3000


def test_deletes_are_tombstones_never_answered_and_compacted_later():
    keys, queries = mixture(5000, 16, 10, seed=7), mixture(30, 16, 10, seed=8)
    store = trained_store(NamespaceConfig("d", dim=16, index="ivf_pq", nlist=8, pq_m=8, train_min_rows=2000), keys)
    nearest = store.search(queries, 5, nprobe=8).ids
    store.delete(ids=nearest[:, 0])
    assert store.stats()["index_tombstones"] == len(np.unique(nearest[:, 0]))
    again = store.search(queries, 5, nprobe=8, rerank=50)
    assert not np.isin(again.ids, nearest[:, 0]).any()
    assert (again.ids >= 0).all()  # the tombstones take no slot: still 5 answers each
    store.delete(ids=np.arange(0, 2500))  # past 10% of the indexed rows: compaction
    assert store.wait_for_index(60)
    assert store.stats()["index_tombstones"] == 0
    assert store.approximate.index.ntotal == len(store) == 5000 - len(np.union1d(np.arange(2500), nearest[:, 0]))
    assert (store.search(queries, 5, nprobe=8).ids >= 2500).all()


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_drift_past_the_threshold_retrains(monkeypatch, metric):
    monkeypatch.setattr(ivf, "DRIFT_WINDOW_ROWS", 1000)
    store = trained_store(NamespaceConfig("drift", dim=16, metric=metric, index="ivf_flat", nlist=8,
                                          train_min_rows=2000),
                          mixture(2000, 16, 10, seed=9))
    same = mixture(1000, 16, 10, seed=10)
    store.add(same, np.zeros(1000, np.int32))
    assert 0.5 < store.stats()["index_drift"] < ivf.DRIFT_RETRAIN_RATIO  # rows like the training sample's
    assert store.wait_for_index(60) and store.stats()["index_trainings"] == 1
    moved = mixture(1000, 16, 10, seed=11, centers=np.full((3, 16), 8.0, np.float32))
    store.add(moved, np.zeros(1000, np.int32))
    assert store.wait_for_index(60)
    stats = store.stats()
    assert stats["index_trainings"] == 2 and stats["index_state"] == "trained"
    assert stats["index_drift"] == 0.0  # the window starts again against the new training sample
    assert store.approximate.index.ntotal == 4000


def test_bad_options_are_refused_and_nothing_changes():
    from monim.protos.errors import InvalidArgument

    cases = [
        (dict(index="ivf_pq", pq_m=5), "pq_m must divide dim (16), got 5"),
        (dict(index="ivf_pq", pq_m=32), "pq_m must divide dim (16), got 32"),
        (dict(index="ivf_pq", nlist=-1), "nlist must be >= 0"),
        (dict(index="ivf_flat", nlist=(1 << 20) + 1), "nlist must be in [1, 1048576]"),
        (dict(index="ivf_flat", pq_m=4), "pq_m applies to index ivf_pq, not 'ivf_flat'"),
        (dict(index="flat", nlist=8), "nlist applies to index ivf_flat or ivf_pq, not 'flat'"),
        (dict(index="ivf_pq", nlist=8, train_min_rows=100), "train_min_rows must be in [256,"),
        (dict(index="ivf_flat", nlist=64, train_min_rows=10), "train_min_rows must be in [64,"),
        (dict(index="annoy"), "unknown index 'annoy'"),
    ]
    router = Router(LocalRuntime(2))
    for options, message in cases:
        with pytest.raises(InvalidArgument) as refused:
            router.create_namespace(NamespaceConfig.from_dict(dict(name="bad", dim=16, **options)))
        assert message in refused.value.message
    assert router.list_namespaces() == []
    router.create_namespace(NamespaceConfig("flat", dim=16))
    router.create_namespace(NamespaceConfig("pq", dim=16, index="ivf_pq", nlist=8, train_min_rows=256))
    router.add("pq", mixture(100, 16, 4, seed=12), np.zeros(100, np.int32))
    queries = mixture(3, 16, 4, seed=13)
    for namespace, options, message in [
        ("flat", dict(nprobe=4), "nprobe and rerank apply to ivf indexes, ef to hnsw indexes; namespace index is flat"),
        ("flat", dict(rerank=20), "nprobe and rerank apply to ivf indexes"),
        ("pq", dict(nprobe=9), "nprobe must be in [0, 8] (the namespace's nlist), got 9"),
        ("pq", dict(nprobe=-1), "nprobe must be >= 0"),
        ("pq", dict(rerank=5), "rerank must be 0 (off) or in [k, 16384] = [10, 16384], got 5"),
        ("pq", dict(rerank=16385), "rerank must be 0 (off) or in [k, 16384]"),
        ("pq", dict(nprobe=2.5), "nprobe must be an integer"),
        ("flat", dict(ef=64), "namespace index is flat (exact): leave them 0, got nprobe 0, rerank 0, ef 64"),
        ("pq", dict(ef=64), "ef applies to hnsw indexes; namespace index is ivf_pq: leave it 0, got ef 64"),
    ]:
        with pytest.raises(InvalidArgument) as refused:
            router.search(namespace, queries, 10, **options)
        assert message in refused.value.message
    assert router.describe_namespace("pq")["rows"] == 100 and router.describe_namespace("flat")["rows"] == 0


def test_the_config_fills_in_the_defaults_and_keeps_them():
    config = NamespaceConfig("pq", dim=768, index="ivf_pq")
    assert (config.nlist, config.pq_m, config.train_min_rows) == (1024, 64, 64 * 1024)
    assert NamespaceConfig("pq", dim=64, index="ivf_pq").pq_m == 32
    assert NamespaceConfig("pq", dim=6, index="ivf_pq", nlist=4).pq_m == 3
    assert NamespaceConfig.from_dict(config.to_dict()) == config
    assert (NamespaceConfig("f", dim=8).nlist, NamespaceConfig("f", dim=8).pq_m) == (0, 0)


def _brute(keys: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    distances = ((queries[:, None, :] - keys[None, :, :]) ** 2).sum(axis=2)
    return np.argsort(distances, axis=1, kind="stable")[:, :k]


def test_adding_50k_rows_while_another_thread_searches_two_shards():
    """Acceptance 2 on two in-process shards (real Shard objects, the router's threads): 50,000 rows
    added in batches past train_min_rows while a thread searches. Every answer is whole: k distinct
    stored ids, sorted distances that are the exact distances to those ids' keys (rerank). Answers
    given while no shard had swapped in an index equal exact search over the rows added by then;
    after every shard has, DescribeNamespace shows "trained" and recall stays high."""
    dim, k, batch = 32, 10, 2500
    keys = mixture(50_000, dim, 50, seed=14)
    queries = mixture(16, dim, 50, seed=15)
    router = Router(LocalRuntime(2))
    router.create_namespace(NamespaceConfig("live", dim=dim, index="ivf_pq", nlist=32, pq_m=16,
                                            train_min_rows=10_000))
    added = [0]          # rows acknowledged so far (ids 0..added-1: the router numbers them in order)
    begun = [0]          # rows whose add has begun: a search may see them before their add returns
    answers, errors, states = [], [], []
    done = threading.Event()

    def search_loop():
        while not done.is_set():
            before, begun_before = added[0], begun[0]
            trained_before = sum(s["index_state"] == "trained" or s["index_trainings"] > 0
                                 for s in router.describe_namespace("live")["shards"])
            try:
                found = router.search("live", queries, k, nprobe=8, rerank=40)
            except Exception as error:  # noqa: BLE001 - the test fails on any
                errors.append(error)
                return
            after, begun_after = added[0], begun[0]
            shards = router.describe_namespace("live")["shards"]
            states.append(tuple(s["index_state"] for s in shards))
            # settled: no add in flight while it searched (the rows it may see are the first `after`)
            settled = before == after == begun_before == begun_after
            answers.append((after, begun_after, settled, trained_before, found))

    router.add("live", keys[:batch], np.arange(batch, dtype=np.int32))
    added[0] = begun[0] = batch
    searcher = threading.Thread(target=search_loop)
    searcher.start()
    try:
        for start in range(batch, len(keys), batch):
            begun[0] = start + batch
            router.add("live", keys[start:start + batch], np.arange(batch, dtype=np.int32))
            added[0] = start + batch
            time.sleep(0.02)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(
                s["index_state"] != "trained" for s in router.describe_namespace("live")["shards"]):
            time.sleep(0.1)
        time.sleep(0.3)  # a few answers from the trained indexes
    finally:
        done.set()
        searcher.join()
    assert not errors, errors
    shards = router.describe_namespace("live")["shards"]
    assert [s["index_state"] for s in shards] == ["trained", "trained"]
    assert all(s["index_trainings"] == 1 and s["rows"] == 25_000 for s in shards)
    assert any("exact" in s for s in states) and any(set(s) == {"trained"} for s in states)
    exact_checked = approximate = 0
    for after, begun_after, settled, trained_before, found in answers:
        ids = found.ids
        assert ids.shape == (len(queries), k) and (ids >= 0).all() and (ids < begun_after).all()
        assert all(len(set(row)) == k for row in ids)
        assert (np.diff(found.distances, axis=1) >= 0).all()
        np.testing.assert_allclose(found.distances, ((keys[ids] - queries[:, None, :]) ** 2).sum(axis=2),
                                   rtol=1e-4, atol=1e-3)
        if trained_before == 0 and settled:  # no index was live when the search began
            np.testing.assert_array_equal(np.sort(ids, axis=1), np.sort(_brute(keys[:after], queries, k), axis=1))
            exact_checked += 1
        elif settled and trained_before == 2:
            assert recall(ids, _brute(keys[:after], queries, k)) >= 0.9
            approximate += 1
    assert exact_checked >= 3 and approximate >= 1, (exact_checked, approximate)


def test_learnable_memory_works_the_same_on_an_ivf_namespace():
    """Retrieve, its backward and ApplyGradients act on rows by id, whatever the index."""
    keys, queries = mixture(3000, 16, 10, seed=16), mixture(8, 16, 10, seed=17)
    results = {}
    for index in ("flat", "ivf_flat"):
        options = dict(nlist=8, train_min_rows=1000) if index != "flat" else {}
        router = Router(LocalRuntime(2))
        router.create_namespace(NamespaceConfig("m", dim=16, value_dim=4, index=index, **options))
        router.add("m", keys, np.arange(3000) % 50,
                   values=np.random.default_rng(20).standard_normal((3000, 4)).astype(np.float32))
        for shard in router.runtime.shards:
            assert shard.stores["m"].wait_for_index(60)
        search = dict(nprobe=8) if index != "flat" else {}
        forward = router.retrieve("m", queries, 5, temperature=1.0, **search)
        grad_q, _ = router.retrieve_backward("m", forward.queries, forward.ids, forward.alpha, forward.distances,
                                             np.ones((8, 4), np.float32), 1.0)
        router.apply_gradients("m", forward.ids[:, 0], np.ones((8, 4), np.float32))
        results[index] = (forward, grad_q, router.get("m", forward.ids[:, 0]).values)
    (flat_forward, flat_grad, flat_values), (ivf_forward, ivf_grad, ivf_values) = results["flat"], results["ivf_flat"]
    np.testing.assert_array_equal(ivf_forward.ids, flat_forward.ids)  # every list probed: exact
    # the same rows, distances equal up to float32 rounding (faiss's IVF kernel sums in another order)
    np.testing.assert_allclose(ivf_forward.distances, flat_forward.distances, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ivf_forward.memory, flat_forward.memory, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(ivf_grad, flat_grad, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(ivf_values, flat_values, rtol=1e-6)


def test_a_restarted_shard_trains_its_index_again_from_the_recovered_rows(tmp_path):
    keys, queries = mixture(3000, 16, 10, seed=18), mixture(20, 16, 10, seed=19)
    config = NamespaceConfig("r", dim=16, index="ivf_pq", nlist=8, pq_m=8, train_min_rows=1000)  # per shard
    router = Router(LocalRuntime(2, data_dir=str(tmp_path), snapshot_every=3))
    router.create_namespace(config)
    for start in range(0, 3000, 500):
        router.add("r", keys[start:start + 500], np.zeros(500, np.int32))
    router.delete("r", ids=np.arange(10))
    for shard in router.runtime.shards:
        assert shard.stores["r"].wait_for_index(60) and shard.stores["r"].stats()["index_state"] == "trained"
    before = router.search("r", queries, 5, nprobe=8, rerank=50)
    router.runtime.shutdown()
    again = Router(LocalRuntime(2, data_dir=str(tmp_path)))
    for shard in again.runtime.shards:
        assert shard.stores["r"].wait_for_index(60)
    shards = again.describe_namespace("r")["shards"]
    assert [s["index_state"] for s in shards] == ["trained", "trained"] and again.describe_namespace("r")["rows"] == 2990
    after = again.search("r", queries, 5, nprobe=8, rerank=50)
    np.testing.assert_array_equal(after.ids, before.ids)
    assert not np.isin(after.ids, np.arange(10)).any()
    again.runtime.shutdown()


def test_an_ivf_namespace_counts_its_index_entries_against_the_shard_budget():
    """Every row of an ivf_pq namespace is counted with its code and id (pq_m + 8 bytes) and the
    centroids from the start, so that training never takes a shard past its budget: a budget
    that holds the rows alone but not their index entries refuses the Add, and nothing is stored."""
    from monim.datastore.ivf_index import code_bytes, fixed_bytes
    from monim.protos.errors import ResourceExhausted
    from monim.workers.shard import Shard

    config = NamespaceConfig("cap", dim=16, index="ivf_pq", nlist=8, pq_m=8, train_min_rows=1000)
    probe = Shard(0)
    probe.create_namespace(config.to_dict())
    store = probe.stores["cap"]
    assert (code_bytes(config), fixed_bytes(config)) == (16, 4 * 16 * (8 + 256))
    assert probe._memory_used() == 1024 * store.rows.row_bytes + 1024 * 16 + fixed_bytes(config)
    rows_alone = 3 * 1024 * store.rows.row_bytes  # growing 1024 -> 2048 rows, old and new columns
    router = Router(LocalRuntime(1, memory_budget=rows_alone + 1024 * 16 + fixed_bytes(config)))
    router.create_namespace(config)
    with pytest.raises(ResourceExhausted, match="no room for 1500 more rows of namespace 'cap'"):
        router.add("cap", mixture(1500, 16, 4, seed=21), np.zeros(1500, np.int32))
    assert router.describe_namespace("cap")["rows"] == 0
    router.add("cap", mixture(1000, 16, 4, seed=21), np.zeros(1000, np.int32))  # fits the first 1024 rows
    assert router.runtime.shards[0].stores["cap"].wait_for_index(60)
    assert router.describe_namespace("cap")["shards"][0]["index_state"] == "trained"


def test_the_in_process_client_has_the_same_index():
    from monim import MemoryClient

    keys, queries = mixture(3000, 16, 10, seed=22), mixture(5, 16, 10, seed=23)
    with MemoryClient(":memory:") as client:
        client.create_namespace("mem", dim=16, index="ivf_flat", nlist=8, train_min_rows=1000)
        client.add("mem", keys, np.zeros(3000, np.int32))
        client._store.runtime.shards[0].stores["mem"].wait_for_index(60)
        assert client.describe_namespace("mem").shards[0]["index_state"] == "trained"
        found = client.search("mem", queries, 5, nprobe=8, rerank=20)
        np.testing.assert_array_equal(found.ids, exact_ids(keys, queries, 5))


def test_a_process_that_ends_does_not_wait_for_a_build():
    """A shard process stopping (or a server draining) must not hang on a build that may take minutes:
    the worker is a daemon thread, and the index is trained again on recovery. Here a build that
    would take 60 s (its training stands in by a sleep) is running when the script ends."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import time
        import numpy as np
        from monim.datastore import NeighborStore, ivf_index
        from monim.protos.config import NamespaceConfig

        ivf_index.IvfIndex._new_index = lambda self: time.sleep(60)
        store = NeighborStore(NamespaceConfig("s", dim=4, index="ivf_flat", nlist=2, train_min_rows=10))
        store.add(np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32), np.zeros(20, np.int32))
        time.sleep(0.5)
        assert store.stats()["index_state"] == "training"
        print("ending with a build running", flush=True)
    """)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50)
    assert result.returncode == 0, result.stderr
    assert "ending with a build running" in result.stdout
    assert time.monotonic() - started < 30


def test_rows_added_before_a_queued_build_starts_are_indexed_once():
    """The build is queued at the add that reaches train_min_rows and snapshots the rows when it
    starts: rows added in between (a recovering shard replays its log that fast) were in the
    snapshot and in the build's journal, and were indexed twice (a search answered one id twice)."""
    keys, queries = mixture(3000, 16, 10, seed=21), mixture(20, 16, 10, seed=22)
    store = NeighborStore(NamespaceConfig("q", dim=16, index="ivf_flat", nlist=8, train_min_rows=1000))
    gate = threading.Event()
    store.approximate._worker.submit(gate.wait)  # the worker is busy: the build waits in its queue
    store.add(keys[:1000], np.zeros(1000, np.int32))  # reaches train_min_rows: the build is queued
    store.add(keys[1000:], np.zeros(2000, np.int32))  # before it starts
    gate.set()
    assert store.wait_for_index(60) and store.stats()["index_state"] == "trained"
    assert store.approximate.index.ntotal == 3000
    found = store.search(queries, 10, nprobe=8).ids
    assert all(len(set(row)) == 10 for row in found.tolist()), "an id answered twice"
    store.close()
