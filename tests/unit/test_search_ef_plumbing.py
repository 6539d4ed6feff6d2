"""ef (hnsw's search beam) and the hnsw namespace options travel every way a search does: the
client over gRPC (Search, SearchParts, Retrieve, RetrieveParts, the Decode stream) and in process,
through the servicer, router and shard, to NeighborStore.search / forward (a spy records what the
store was asked). A flat or ivf namespace refuses ef; an hnsw one refuses nprobe and rerank."""

from __future__ import annotations

import numpy as np
import pytest
from monim.datastore.store import NeighborStore
from monim.protos.errors import InvalidArgument
from monim.workers import router as router_module
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime
from monim.workers.server import start_server

from monim import MemoryClient

DIM, ROWS = 8, 40


@pytest.fixture
def asked(monkeypatch):
    """The ef each NeighborStore.search / forward call was given, in order."""
    calls = []
    search, forward = NeighborStore.search, NeighborStore.forward

    def spied_search(self, *args, ef=0, **kwargs):
        calls.append(("search", ef))
        return search(self, *args, ef=ef, **kwargs)

    def spied_forward(self, *args, ef=0, **kwargs):
        calls.append(("forward", ef))
        return forward(self, *args, ef=ef, **kwargs)

    monkeypatch.setattr(NeighborStore, "search", spied_search)
    monkeypatch.setattr(NeighborStore, "forward", spied_forward)
    return calls


@pytest.fixture(params=["remote", "in process"])
def client(request):
    if request.param == "in process":
        with MemoryClient(":memory:") as client:
            yield client
        return
    runtime = LocalRuntime(1)
    server, port = start_server(Router(runtime), port=0)
    try:
        with MemoryClient(f"127.0.0.1:{port}", retries=0) as client:
            yield client
    finally:
        server.stop(0)
        runtime.shutdown()


def _filled(client, name: str, **options):
    config = client.create_namespace(name, dim=DIM, value_dim=4, max_k=64, **options)
    rng = np.random.default_rng(0)
    client.add(name, rng.standard_normal((ROWS, DIM)).astype(np.float32), np.arange(ROWS))
    return config, rng.standard_normal((3, DIM)).astype(np.float32)


def test_an_hnsw_namespace_takes_its_options_and_ef_reaches_the_store(client, asked, monkeypatch):
    config, queries = _filled(client, "g", index="hnsw", hnsw_m=16, ef_construction=100, train_min_rows=1000)
    assert (config.index, config.hnsw_m, config.ef_construction, config.train_min_rows) == ("hnsw", 16, 100, 1000)
    assert client.describe_namespace("g").config == config
    exact = client.search("g", queries, 5, ef=0)  # 40 rows, under train_min_rows: exact either way
    np.testing.assert_array_equal(client.search("g", queries, 5, ef=77).ids, exact.ids)
    client.retrieve("g", queries, 5, ef=78)
    monkeypatch.setattr(router_module, "ONE_ROUND_VALUE_BYTES", 0)  # a retrieve on one shard: its forward there
    client.retrieve("g", queries, 5, ef=79)
    if client.remote:  # answered in parts (SearchParts, RetrieveParts)
        client._store.search_parts("g", queries, 5, ef=80)
        client._store.retrieve_parts("g", queries, 5, 1.0, ef=81)
    with client.decode() as stream:
        stream.search("g", queries, 5, ef=82)
        stream.retrieve("g", queries, 5, ef=83)
    expected = [("search", 64), ("search", 77), ("search", 78), ("forward", 79)]
    expected += [("search", 80), ("forward", 81)] if client.remote else []
    assert asked == expected + [("search", 82), ("forward", 83)]


@pytest.mark.parametrize("options, message", [
    (dict(ef=4), "ef must be 0 (the default) or in [k, 32768] = [5, 32768], got 4"),
    (dict(ef=32769), "ef must be 0 (the default) or in [k, 32768] = [5, 32768], got 32769"),
    (dict(nprobe=4), "nprobe and rerank apply to ivf indexes; namespace index is hnsw (use ef for recall): "
                     "leave them 0, got nprobe 4, rerank 0"),
    (dict(rerank=20), "namespace index is hnsw (use ef for recall): leave them 0, got nprobe 0, rerank 20"),
])
def test_an_hnsw_namespace_refuses_bad_search_options_every_way(client, asked, options, message):
    _, queries = _filled(client, "g", index="hnsw")
    calls = [lambda: client.search("g", queries, 5, **options),
             lambda: client.retrieve("g", queries, 5, **options)]
    stream = client.decode()
    calls += [lambda: stream.search("g", queries, 5, **options), lambda: stream.retrieve("g", queries, 5, **options)]
    for call in calls:
        with pytest.raises(InvalidArgument) as refused:
            call()
        assert message in refused.value.message
    stream.close()
    assert asked == []


@pytest.mark.parametrize("options, message", [
    (dict(), "namespace index is flat (exact): leave them 0, got nprobe 0, rerank 0, ef 64"),
    (dict(index="ivf_flat", nlist=4), "ef applies to hnsw indexes; namespace index is ivf_flat: leave it 0, got ef 64"),
])
def test_flat_and_ivf_namespaces_refuse_ef(client, asked, options, message):
    _, queries = _filled(client, "n", **options)
    for call in (lambda: client.search("n", queries, 5, ef=64), lambda: client.retrieve("n", queries, 5, ef=64)):
        with pytest.raises(InvalidArgument) as refused:
            call()
        assert message in refused.value.message
    assert asked == []


def test_hnsw_options_on_another_index_are_refused_over_the_wire(client):
    with pytest.raises(InvalidArgument, match="hnsw_m applies to index hnsw, not 'flat'; leave it 0"):
        client.create_namespace("n", dim=DIM, hnsw_m=16)
    with pytest.raises(InvalidArgument, match="nlist applies to index ivf_flat or ivf_pq, not 'hnsw'; leave it 0"):
        client.create_namespace("n", dim=DIM, index="hnsw", nlist=16)
    with pytest.raises(InvalidArgument, match=r"hnsw_m must be in \[2, 512\], got 513"):
        client.create_namespace("n", dim=DIM, index="hnsw", hnsw_m=513)
    assert client.list_namespaces() == []
