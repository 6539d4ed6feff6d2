"""ivf_pq through `monim serve --shards 2` (Ray actors, gRPC): 50,000 rows added while another
client thread searches; every answer is whole and never an error, and DescribeNamespace shows each
shard's index going from exact to trained. Bad options answer INVALID_ARGUMENT over the wire."""

import threading
import time

import numpy as np
import pytest
from monim.model_client.errors import InvalidArgument

from monim import MemoryClient


def _mixture(rows, dim, seed):
    centers = np.random.default_rng(99).standard_normal((50, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    return (centers[rng.integers(0, 50, rows)] + 0.5 * rng.standard_normal((rows, dim))).astype(np.float32)


def test_adding_50k_rows_to_ivf_pq_while_another_client_searches(remote_client, server_address, namespace_name):
    dim, k = 32, 10
    keys, queries = _mixture(50_000, dim, seed=1), _mixture(8, dim, seed=2)
    config = remote_client.create_namespace(namespace_name, dim=dim, index="ivf_pq", nlist=32, pq_m=16,
                                            train_min_rows=10_000)
    assert (config.index, config.nlist, config.pq_m, config.train_min_rows) == ("ivf_pq", 32, 16, 10_000)
    remote_client.add(namespace_name, keys[:5000], np.zeros(5000, np.int32))
    # added: rows whose Add has answered; started: rows whose Add has been sent (a search may see an
    # Add's rows before it answers). A search answers ids below `started` read after it, and, with no
    # Add in flight at any point of it (`added` before == `started` after), exactly over those rows.
    added, started, answers, errors, seen = [5000], [5000], [], [], []
    done, answered = threading.Event(), threading.Event()

    def search_loop():
        with MemoryClient(server_address, timeout_s=60) as reader:
            while not done.is_set():
                before = added[0]
                try:
                    found = reader.search(namespace_name, queries, k, nprobe=8, rerank=40)
                    shards = reader.describe_namespace(namespace_name).shards
                except Exception as error:  # noqa: BLE001 - the test fails on any
                    errors.append(error)
                    return
                seen.append(tuple(s["index_state"] for s in shards))
                no_index_yet = all(s["index_trainings"] == 0 for s in shards)  # none was live during the search
                answers.append((before, started[0], no_index_yet, found))
                answered.set()

    searcher = threading.Thread(target=search_loop)
    searcher.start()
    try:
        answered.wait(60)  # one search with no Add in flight and no index: answered exactly
        for start in range(5000, 50_000, 5000):
            started[0] = start + 5000
            remote_client.add(namespace_name, keys[start:start + 5000], np.zeros(5000, np.int32))
            added[0] = start + 5000
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(
                s["index_state"] != "trained" for s in remote_client.describe_namespace(namespace_name).shards):
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        done.set()
        searcher.join()
    try:
        assert not errors, errors
        shards = remote_client.describe_namespace(namespace_name).shards
        assert [(s["index_state"], s["index_trainings"], s["rows"]) for s in shards] == [("trained", 1, 25_000)] * 2
        assert seen[0] == ("exact", "exact") and seen[-1] == ("trained", "trained")
        exact = 0
        for before, after, no_index_yet, found in answers:
            assert (found.ids >= 0).all() and (found.ids < after).all()
            assert all(len(set(row)) == k for row in found.ids)
            np.testing.assert_allclose(found.distances,
                                       ((keys[found.ids] - queries[:, None, :]) ** 2).sum(axis=2), rtol=1e-4,
                                       atol=1e-3)
            if no_index_yet and before == after:
                truth = ((queries[:, None, :] - keys[None, :after, :]) ** 2).sum(axis=2).argsort(axis=1)[:, :k]
                np.testing.assert_array_equal(np.sort(found.ids, axis=1), np.sort(truth, axis=1))
                exact += 1
        assert exact >= 1
        called = remote_client.search(namespace_name, queries, k, nprobe=8, rerank=40)
        with remote_client.decode() as stream:  # the Decode stream's steps carry the options too
            streamed = stream.search(namespace_name, queries, k, nprobe=8, rerank=40)
            # `monim serve` runs the shards' read endpoints by default: the stream went to a shard's own.
            assert stream.target in remote_client._store.read_endpoints() and stream.target != remote_client.target
            with pytest.raises(InvalidArgument, match=r"nprobe must be in \[0, 32\]"):
                stream.search(namespace_name, queries, k, nprobe=40)
        np.testing.assert_array_equal(streamed.ids, called.ids)
        with pytest.raises(InvalidArgument, match=r"nprobe must be in \[0, 32\]"):
            remote_client.search(namespace_name, queries, k, nprobe=33)
        with pytest.raises(InvalidArgument, match="rerank must be 0"):
            remote_client.search(namespace_name, queries, k, rerank=3)
        assert remote_client.describe_namespace(namespace_name).rows == 50_000
    finally:
        remote_client.drop_namespace(namespace_name)


def test_bad_ivf_options_over_the_wire_change_nothing(remote_client, namespace_name):
    with pytest.raises(InvalidArgument, match=r"pq_m must divide dim \(30\), got 8"):
        remote_client.create_namespace(namespace_name, dim=30, index="ivf_pq", pq_m=8)
    with pytest.raises(InvalidArgument, match="nlist applies to index ivf_flat or ivf_pq, not 'flat'"):
        remote_client.create_namespace(namespace_name, dim=30, nlist=16)
    assert namespace_name not in [c.name for c in remote_client.list_namespaces()]
    remote_client.create_namespace(namespace_name, dim=4)
    try:
        remote_client.add(namespace_name, np.ones((3, 4), np.float32), np.zeros(3, np.int32))
        with pytest.raises(InvalidArgument, match="nprobe and rerank apply to ivf indexes"):
            remote_client.search(namespace_name, np.ones((1, 4), np.float32), 2, nprobe=4)
        assert remote_client.describe_namespace(namespace_name).rows == 3
    finally:
        remote_client.drop_namespace(namespace_name)
