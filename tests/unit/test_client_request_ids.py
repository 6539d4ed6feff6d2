"""A write the caller repeats with the request id of the first call lands once, as the client's own
retries do: what a caller needs after MemoryClient's retries gave up (UNAVAILABLE, DEADLINE_EXCEEDED)
and the write may or may not have landed. Delete answers the first count, ApplyGradients and
RetrieveBackward step once (Adam's per-row step count rises by one), also when the step goes in
parts. Through a gRPC server in this process (no Ray) and through the in-process store."""

import numpy as np
import pytest
from monim.model_client import MemoryClient
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime
from monim.workers.server import start_server

DIM, VALUE_DIM, ROWS = 8, 16, 400
# Small enough that an ApplyGradients of every row goes in parts (see test_client_apply_gradients_split.py).
SMALL = 32 * 1024


@pytest.fixture(params=["grpc", "grpc, split steps", "in-process"])
def client(request):
    if request.param == "in-process":
        with MemoryClient(":memory:") as client:
            yield client
        return
    runtime = LocalRuntime(2)
    limit = SMALL if request.param == "grpc, split steps" else 64 * 1024 * 1024
    server, port = start_server(Router(runtime), port=0, max_message_bytes=limit)
    with MemoryClient(f"127.0.0.1:{port}", max_message_bytes=limit) as client:
        yield client
    server.stop(0)
    runtime.shutdown()


@pytest.fixture
def ids(client):
    rng = np.random.default_rng(3)
    client.create_namespace("ns", dim=DIM, value_dim=VALUE_DIM, optimizer="adam", lr=0.05)
    return client.add("ns", rng.standard_normal((ROWS, DIM)).astype(np.float32), np.arange(ROWS),
                      values=rng.standard_normal((ROWS, VALUE_DIM)).astype(np.float32))


def steps(client, ids):
    return client.get("ns", ids, return_optimizer_state=True).optimizer_state["step"]


def test_apply_gradients_repeated_with_its_request_id_steps_once(client, ids):
    grads = np.random.default_rng(4).standard_normal((ROWS, VALUE_DIM)).astype(np.float32)
    assert client.apply_gradients("ns", ids, grads, request_id="step-1") == ROWS
    after_one = client.get("ns", ids).values
    assert client.apply_gradients("ns", ids, grads, request_id="step-1") == ROWS
    np.testing.assert_array_equal(client.get("ns", ids).values, after_one)
    np.testing.assert_array_equal(steps(client, ids), 1)
    client.apply_gradients("ns", ids, grads, request_id="step-2")  # another id is another step
    np.testing.assert_array_equal(steps(client, ids), 2)


def test_delete_repeated_with_its_request_id_answers_the_first_count(client, ids):
    assert client.delete("ns", ids[:50], request_id="delete-1") == 50
    assert client.delete("ns", ids[:50], request_id="delete-1") == 50
    assert client.delete("ns", ids[:50]) == 0  # a new request finds nothing left to delete
    assert client.describe_namespace("ns").rows == ROWS - 50


def test_delete_of_other_ids_under_a_used_request_id_answers_the_first_count_and_deletes_nothing(client, ids):
    """A request id names one request: another Delete that reuses it (other ids, on both shards) is
    answered as the first was, as docs/API.md says, and deletes nothing (found by the hostile-input
    suite: each shard took the new ids for a share of the first request it had not applied)."""
    assert client.delete("ns", ids[:50], request_id="delete-1") == 50
    assert client.delete("ns", ids[100:140], request_id="delete-1") == 50
    assert client.describe_namespace("ns").rows == ROWS - 50
    np.testing.assert_array_equal(client.get("ns", ids[100:140]).ids, ids[100:140])


def test_retrieve_backward_repeated_with_its_step_id_steps_once(client, ids):
    rng = np.random.default_rng(5)
    result = client.retrieve("ns", rng.standard_normal((4, DIM)).astype(np.float32), k=8)
    grad_memory = rng.standard_normal((4, VALUE_DIM)).astype(np.float32)
    first = client.retrieve_backward("ns", result, grad_memory, step_id="backward-1")
    stepped = np.unique(result.ids)
    after_one = client.get("ns", stepped).values
    again = client.retrieve_backward("ns", result, grad_memory, step_id="backward-1")
    np.testing.assert_array_equal(client.get("ns", stepped).values, after_one)
    np.testing.assert_array_equal(steps(client, stepped), 1)
    assert again[0].shape == first[0].shape


def test_an_add_in_parts_takes_a_request_id_of_128_characters_and_lands_once(client, ids):
    rng = np.random.default_rng(6)
    keys = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    values = rng.standard_normal((ROWS, VALUE_DIM)).astype(np.float32)
    request_id = "r" * 128  # the longest id allowed; the parts' ids must stay within it too
    first = client.add("ns", keys, np.arange(ROWS), values=values, request_id=request_id)
    again = client.add("ns", keys, np.arange(ROWS), values=values, request_id=request_id)
    np.testing.assert_array_equal(again, first)
    assert client.describe_namespace("ns").rows == 2 * ROWS


def test_a_request_id_over_128_characters_is_refused_and_stores_nothing(client, ids):
    from monim.model_client.errors import InvalidArgument

    keys = np.random.default_rng(7).standard_normal((ROWS, DIM)).astype(np.float32)
    with pytest.raises(InvalidArgument, match="request/step id has 129 characters; at most 128"):
        client.add("ns", keys, np.arange(ROWS), request_id="r" * 129)
    with pytest.raises(InvalidArgument, match="request/step id has 129 characters; at most 128"):
        client.apply_gradients("ns", ids, np.ones((ROWS, VALUE_DIM), np.float32), request_id="s" * 129)
    assert client.describe_namespace("ns").rows == ROWS
    np.testing.assert_array_equal(steps(client, ids), 0)
