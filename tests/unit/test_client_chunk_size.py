"""Calls past CHUNK_BYTES go in chunks of at most CHUNK_BYTES, also far under the message limit:
reads (Search, Get, a Retrieve that keeps no state) and ApplyGradients (parts, then one commit: one
step). Calls whose split has a cost of its own stay whole up to half the limit: an Add (whole, it
is all or nothing), a Retrieve that keeps its state under one handle, and its backward. A real gRPC
server in this process (no Ray) with the default message limit; CHUNK_BYTES made small."""

import numpy as np
import pytest
from monim.model_client import MemoryClient
from monim.model_client import client as client_module
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime
from monim.workers.server import start_server

CHUNK = 16 * 1024
DIM, VALUE_DIM, K, ROWS, BATCH = 16, 32, 20, 800, 120


@pytest.fixture
def deployment(monkeypatch):
    monkeypatch.setattr(client_module, "CHUNK_BYTES", CHUNK)
    runtime = LocalRuntime(1)
    router = Router(runtime)
    server, port = start_server(router, port=0)
    rng = np.random.default_rng(5)
    with MemoryClient(f"127.0.0.1:{port}") as client:
        client.create_namespace("ns", dim=DIM, value_dim=VALUE_DIM, max_k=K, optimizer="adam", lr=0.01)
        keys = rng.standard_normal((ROWS, DIM)).astype(np.float32)
        client.add("ns", keys, np.arange(ROWS), values=rng.standard_normal((ROWS, VALUE_DIM)).astype(np.float32))
        queries = keys[rng.integers(0, ROWS, BATCH)] + 0.01
        yield client, queries, rng
    server.stop(0)
    runtime.shutdown()


def calls_to(client, method, monkeypatch, rows_at=1):
    """The row counts of each call the client's transport makes to method (of its argument rows_at)."""
    rows = []
    real = getattr(client._store, method)

    def counted(*args, **kwargs):
        rows.append(len(args[rows_at]))
        return real(*args, **kwargs)
    monkeypatch.setattr(client._store, method, counted)
    return rows


def test_a_search_past_the_chunk_size_goes_in_chunks_and_answers_as_one_call(deployment, monkeypatch):
    client, queries, _ = deployment
    whole = client.search("ns", queries[:10], K)  # 10 x 20 x 16 bytes: under one chunk
    rows = calls_to(client, "search", monkeypatch)
    found = client.search("ns", queries, K)
    assert BATCH * K * 16 > CHUNK and len(rows) > 1 and sum(rows) == BATCH
    assert max(rows) * (K * 16 + 64) <= CHUNK
    np.testing.assert_array_equal(found.ids[:10], whole.ids)
    np.testing.assert_allclose(found.distances[:10], whole.distances, rtol=1e-5)  # faiss's sums depend on B


def test_get_and_a_stateless_retrieve_go_in_chunks(deployment, monkeypatch):
    client, queries, _ = deployment
    rows = calls_to(client, "get", monkeypatch)
    got = client.get("ns", np.arange(ROWS))
    np.testing.assert_array_equal(got.ids, np.arange(ROWS))
    assert len(rows) > 1 and sum(rows) == ROWS
    rows = calls_to(client, "retrieve", monkeypatch)
    result = client.retrieve("ns", queries, K, 0.5)
    assert len(rows) > 1 and sum(rows) == BATCH and result.memory.shape == (BATCH, VALUE_DIM)


def test_a_retrieve_that_keeps_its_state_and_its_backward_go_whole(deployment, monkeypatch):
    client, queries, rng = deployment
    forwards = calls_to(client, "retrieve", monkeypatch)
    backwards = calls_to(client, "retrieve_backward", monkeypatch, rows_at=5)  # grad_memory's rows
    result = client.retrieve("ns", queries, K, 0.5, keep_state=True)
    grad = rng.standard_normal((BATCH, VALUE_DIM)).astype(np.float32)
    client.retrieve_backward("ns", result, grad)
    assert forwards == [BATCH] and result.handle
    assert backwards == [BATCH]


def test_an_add_goes_whole_up_to_half_the_limit(deployment, monkeypatch):
    client, _, rng = deployment
    rows = calls_to(client, "add", monkeypatch)
    keys = rng.standard_normal((500, DIM)).astype(np.float32)
    assert keys.nbytes > CHUNK
    ids = client.add("ns", keys, np.arange(500), values=np.zeros((500, VALUE_DIM), np.float32))
    assert rows == [500] and len(ids) == 500


def test_apply_gradients_past_the_chunk_size_is_one_step_in_parts(deployment, monkeypatch):
    """The same values, bit for bit, as the step sent whole (to a twin namespace of the same rows)."""
    client, _, rng = deployment
    ids = np.arange(ROWS)
    rows_now = client.get("ns", ids)
    client.create_namespace("twin", dim=DIM, value_dim=VALUE_DIM, max_k=K, optimizer="adam", lr=0.01)
    np.testing.assert_array_equal(client.add("twin", rows_now.keys, rows_now.tokens, values=rows_now.values), ids)
    grads = rng.standard_normal((ROWS, VALUE_DIM)).astype(np.float32)
    rows = calls_to(client, "apply_gradients", monkeypatch)
    assert client.apply_gradients("ns", ids, grads) == ROWS
    assert len(rows) > 1 and sum(rows) == ROWS
    monkeypatch.setattr(client_module, "CHUNK_BYTES", 1 << 30)
    assert client.apply_gradients("twin", ids, grads) == ROWS
    assert rows[-1] == ROWS  # sent whole
    np.testing.assert_array_equal(client.get("ns", ids).values, client.get("twin", ids).values)
