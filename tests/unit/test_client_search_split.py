"""MemoryClient.search splits batches whose reply would pass the message limit, counting the
keys / values / weights asked for. A real gRPC server in this process (no Ray): two servers over
one Router, one with a small message limit and one with the default."""

import numpy as np
import pytest
from monim.model_client import MemoryClient
from monim.model_client.errors import ResourceExhausted
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime
from monim.workers.server import start_server

SMALL = 256 * 1024  # bytes; both the small server's and the small client's limit
DIM, VALUE_DIM, K, ROWS, BATCH = 8, 64, 50, 600, 40


@pytest.fixture
def servers():
    runtime = LocalRuntime(2)
    router = Router(runtime)
    small, small_port = start_server(router, port=0, max_message_bytes=SMALL)
    large, large_port = start_server(router, port=0)
    with MemoryClient(f"127.0.0.1:{small_port}", max_message_bytes=SMALL) as split, \
            MemoryClient(f"127.0.0.1:{large_port}") as whole:
        yield split, whole
    small.stop(0)
    large.stop(0)
    runtime.shutdown()


def load(client, rng, name="ns", value_dim=VALUE_DIM):
    client.create_namespace(name, dim=DIM, value_dim=value_dim, max_k=K)
    keys = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    values = rng.standard_normal((ROWS, value_dim)).astype(np.float32)
    client.add(name, keys, np.arange(ROWS), values=values, weights=rng.random(ROWS, dtype=np.float32) + 1)
    return rng.standard_normal((BATCH, DIM)).astype(np.float32)


def assert_same(a, b):
    """Same neighbours and fields; distances to float rounding (faiss's kernel depends on the batch size)."""
    for name in ("ids", "distances", "tokens", "keys", "values", "weights"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is None:
            continue
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if name == "distances":
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(x, y, err_msg=name)


@pytest.mark.parametrize("flags", [dict(return_values=True), dict(return_values=True, return_keys=True,
                                                                  return_weights=True)])
def test_search_with_values_is_split_and_equals_one_call(rng, servers, flags, monkeypatch):
    split, whole = servers
    queries = load(whole, rng)
    reply_bytes = BATCH * K * (16 + 4 * VALUE_DIM)
    assert reply_bytes > SMALL  # one reply would not fit
    calls = []
    search = split._store.search
    monkeypatch.setattr(split._store, "search", lambda *a, **kw: calls.append(len(a[1])) or search(*a, **kw))
    result = split.search("ns", queries, K, **flags)
    assert len(calls) > 1 and sum(calls) == BATCH and max(calls) * K * 4 * VALUE_DIM < SMALL // 2
    expected = whole.search("ns", queries, K, **flags)
    assert_same(result, expected)
    assert result.values.shape == (BATCH, K, VALUE_DIM)
    np.testing.assert_array_equal(result.values, whole.get("ns", result.ids.ravel()).values.reshape(BATCH, K, -1))


def test_without_values_asked_for_one_call_suffices(rng, servers, monkeypatch):
    split, whole = servers
    queries = load(whole, rng)
    calls = []
    search = split._store.search
    monkeypatch.setattr(split._store, "search", lambda *a, **kw: calls.append(len(a[1])) or search(*a, **kw))
    assert_same(split.search("ns", queries, K), whole.search("ns", queries, K))
    assert calls == [BATCH]


def test_a_namespace_made_again_wider_is_resized(rng, servers):
    # The client caches value_dim; after the namespace is dropped and made again with wider values
    # (by another client), the first reply is too large, the client asks again and splits more.
    split, whole = servers
    load(whole, rng, value_dim=4)
    queries = rng.standard_normal((BATCH, DIM)).astype(np.float32)
    split.search("ns", queries, K, return_values=True)  # caches value_dim 4
    whole.drop_namespace("ns")
    load(whole, rng, value_dim=VALUE_DIM)
    assert_same(split.search("ns", queries, K, return_values=True),
                whole.search("ns", queries, K, return_values=True))


def test_a_reply_too_large_for_one_query_fails_clearly_in_messages_and_comes_in_shared_memory(rng, servers):
    split, whole = servers
    whole.create_namespace("wide", dim=DIM, value_dim=2048, max_k=K)
    whole.add("wide", rng.standard_normal((ROWS, DIM)).astype(np.float32), np.arange(ROWS),
              values=np.ones((ROWS, 2048), np.float32))
    query = np.zeros((1, DIM), np.float32)
    with MemoryClient(split._store.target, max_message_bytes=SMALL, shared_memory=False) as in_messages:
        with pytest.raises(ResourceExhausted):  # 50 x 2048 x 4 bytes > 256 KiB for a single query
            in_messages.search("wide", query, K, return_values=True)
    if split._store.uses_shared_memory():  # its values in the call's region: no message to fit
        assert split.search("wide", query, K, return_values=True).values.sum() == K * 2048
