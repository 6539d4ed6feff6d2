"""hnsw through `monim serve --shards 2` (Ray actors, gRPC): rows added while another client thread
searches, past the build and then into the built graph's tail; every answer is whole and never an
error, DescribeNamespace shows each shard's graph built and its tail drained, and the options go
over the wire (Search, the Decode stream). Bad options answer INVALID_ARGUMENT and change nothing."""

import threading
import time

import numpy as np
import pytest
from monim.model_client.errors import InvalidArgument

from monim import MemoryClient
from tests.integration.test_ivf_service import _mixture


def test_adding_rows_to_hnsw_while_another_client_searches(remote_client, server_address, namespace_name):
    dim, k = 32, 10
    keys, queries = _mixture(16_000, dim, seed=3), _mixture(8, dim, seed=4)
    config = remote_client.create_namespace(namespace_name, dim=dim, index="hnsw", hnsw_m=16, train_min_rows=3000)
    assert (config.index, config.hnsw_m, config.ef_construction, config.train_min_rows) == ("hnsw", 16, 64, 3000)
    remote_client.add(namespace_name, keys[:2000], np.zeros(2000, np.int32))
    added, started, answers, errors, seen = [2000], [2000], [], [], []
    done, answered = threading.Event(), threading.Event()

    def search_loop():
        with MemoryClient(server_address, timeout_s=60) as reader:
            while not done.is_set():
                before = added[0]
                try:
                    found = reader.search(namespace_name, queries, k, ef=128)
                    shards = reader.describe_namespace(namespace_name).shards
                except Exception as error:  # noqa: BLE001 - the test fails on any
                    errors.append(error)
                    return
                seen.append(tuple(s["index_state"] for s in shards))
                no_graph_yet = all(s["index_trainings"] == 0 for s in shards)
                answers.append((before, started[0], no_graph_yet, found))
                answered.set()

    searcher = threading.Thread(target=search_loop)
    searcher.start()
    try:
        answered.wait(60)  # one search with no Add in flight and no graph: answered exactly
        for start in range(2000, 16_000, 2000):
            started[0] = start + 2000
            remote_client.add(namespace_name, keys[start:start + 2000], np.zeros(2000, np.int32))
            added[0] = start + 2000
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(
                s["index_state"] != "trained" or s["index_unindexed"]
                for s in remote_client.describe_namespace(namespace_name).shards):
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        done.set()
        searcher.join()
    try:
        assert not errors, errors
        shards = remote_client.describe_namespace(namespace_name).shards
        assert [(s["index_state"], s["index_unindexed"], s["rows"]) for s in shards] == [("trained", 0, 8000)] * 2
        assert seen[0] == ("exact", "exact") and seen[-1] == ("trained", "trained")
        exact = 0
        for before, after, no_graph_yet, found in answers:
            assert (found.ids >= 0).all() and (found.ids < after).all()
            assert all(len(set(row)) == k for row in found.ids)
            np.testing.assert_allclose(found.distances, ((keys[found.ids] - queries[:, None, :]) ** 2).sum(axis=2),
                                       rtol=1e-4, atol=1e-3)
            if no_graph_yet and before == after:
                truth = ((queries[:, None, :] - keys[None, :after, :]) ** 2).sum(axis=2).argsort(axis=1)[:, :k]
                np.testing.assert_array_equal(np.sort(found.ids, axis=1), np.sort(truth, axis=1))
                exact += 1
        assert exact >= 1
        truth = ((queries[:, None, :] - keys[None, :, :]) ** 2).sum(axis=2).argsort(axis=1)[:, :k]
        called = remote_client.search(namespace_name, queries, k, ef=256)
        assert np.mean([len(set(a) & set(b)) / k for a, b in zip(called.ids, truth)]) >= 0.95
        with remote_client.decode() as stream:  # the Decode stream's steps carry ef too
            streamed = stream.search(namespace_name, queries, k, ef=256)
            with pytest.raises(InvalidArgument, match=r"ef must be 0 \(the default\) or in \[k, 32768\]"):
                stream.search(namespace_name, queries, k, ef=5)
        np.testing.assert_array_equal(streamed.ids, called.ids)
        with pytest.raises(InvalidArgument, match="nprobe and rerank apply to ivf indexes; namespace index is hnsw"):
            remote_client.search(namespace_name, queries, k, nprobe=8)
        with pytest.raises(InvalidArgument, match=r"ef must be 0 \(the default\) or in \[k, 32768\]"):
            remote_client.search(namespace_name, queries, k, ef=40_000)
        assert remote_client.describe_namespace(namespace_name).rows == 16_000
    finally:
        remote_client.drop_namespace(namespace_name)


def test_bad_hnsw_options_over_the_wire_change_nothing(remote_client, namespace_name):
    with pytest.raises(InvalidArgument, match=r"hnsw_m must be in \[2, 512\], got 1000"):
        remote_client.create_namespace(namespace_name, dim=8, index="hnsw", hnsw_m=1000)
    with pytest.raises(InvalidArgument, match="hnsw_m applies to index hnsw, not 'flat'"):
        remote_client.create_namespace(namespace_name, dim=8, hnsw_m=16)
    with pytest.raises(InvalidArgument, match="nlist applies to index ivf_flat or ivf_pq, not 'hnsw'"):
        remote_client.create_namespace(namespace_name, dim=8, index="hnsw", nlist=16)
    assert namespace_name not in [c.name for c in remote_client.list_namespaces()]
    remote_client.create_namespace(namespace_name, dim=4)
    try:
        remote_client.add(namespace_name, np.ones((3, 4), np.float32), np.zeros(3, np.int32))
        with pytest.raises(InvalidArgument, match="ef to hnsw indexes; namespace index is flat"):
            remote_client.search(namespace_name, np.ones((1, 4), np.float32), 2, ef=64)
        assert remote_client.describe_namespace(namespace_name).rows == 3
    finally:
        remote_client.drop_namespace(namespace_name)
