"""Calls past CHUNK_BYTES: a Search's or a Retrieve's answer comes in parts (SearchParts,
RetrieveParts: one search of the batch, its answer in messages of at most ANSWER_PART_BYTES), equal
to the unary answer; a Retrieve that keeps its state keeps it (one handle) and its backward goes
whole; a Get and an ApplyGradients (parts, then one commit: one step) go in chunks of CHUNK_BYTES;
an Add goes whole up to half the limit (all or nothing). A server without the parts calls gets the
unary ones. A real gRPC server in this process (no Ray) with the default message limit; CHUNK_BYTES
and ANSWER_PART_BYTES made small."""

import numpy as np
import pytest
from monim.model_client import MemoryClient
from monim.model_client import client as client_module
from monim.model_client.errors import InvalidArgument, NotFound
from monim.protos import convert
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime
from monim.workers.server import start_server

CHUNK = 16 * 1024
DIM, VALUE_DIM, K, ROWS, BATCH = 16, 32, 20, 800, 120


@pytest.fixture
def deployment(monkeypatch):
    monkeypatch.setattr(client_module, "CHUNK_BYTES", CHUNK)
    monkeypatch.setattr(client_module, "SHARED_CHUNK_BYTES", CHUNK)  # this client is on the server's host
    monkeypatch.setattr(convert, "ANSWER_PART_BYTES", CHUNK)
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


def parts_parsed(monkeypatch, what="search"):
    """The rows of each answer part the client parses."""
    rows = []
    real = getattr(convert, f"{what}_result_from_proto")

    def counted(response, *args, **kwargs):
        result = real(response, *args, **kwargs)
        rows.append(len(result.ids))
        return result
    monkeypatch.setattr(convert, f"{what}_result_from_proto", counted)
    return rows


def test_a_search_whose_answer_passes_the_chunk_size_comes_in_parts_of_one_search(deployment, monkeypatch):
    client, queries, _ = deployment
    unary = client._store.search("ns", queries, K)  # the same batch, one message
    calls, parts = calls_to(client, "search_parts", monkeypatch), parts_parsed(monkeypatch)
    found = client.search("ns", queries, K)
    assert BATCH * K * 16 > CHUNK and calls == [BATCH]  # one call, one search of the whole batch
    assert len(parts) > 1 and sum(parts) == BATCH and max(parts) * K * 16 <= CHUNK
    for name in ("ids", "distances", "tokens"):
        np.testing.assert_array_equal(getattr(found, name), getattr(unary, name))
    assert found.generation == unary.generation


def test_a_search_under_the_chunk_size_is_one_message(deployment, monkeypatch):
    client, queries, _ = deployment
    calls = calls_to(client, "search", monkeypatch)
    client.search("ns", queries[:10], K)  # 10 x 20 x 16 bytes
    assert calls == [10]


def test_a_retrieve_that_keeps_its_state_comes_in_parts_with_its_handle_and_its_backward_goes_whole(
        deployment, monkeypatch):
    client, queries, rng = deployment
    unary = client._store.retrieve("ns", queries, K, 0.5)
    forwards = calls_to(client, "retrieve_parts", monkeypatch)
    backwards = calls_to(client, "retrieve_backward", monkeypatch, rows_at=5)  # grad_memory's rows
    parts = parts_parsed(monkeypatch, "retrieve")
    result = client.retrieve("ns", queries, K, 0.5, keep_state=True)
    assert forwards == [BATCH] and len(parts) > 1 and sum(parts) == BATCH and result.handle
    for name in ("memory", "ids", "alpha", "distances", "tokens", "weights"):
        np.testing.assert_array_equal(getattr(result, name), getattr(unary, name), err_msg=name)
    grad = rng.standard_normal((BATCH, VALUE_DIM)).astype(np.float32)
    by_handle = client.retrieve_backward("ns", result, grad, step_values=False)
    assert backwards == [BATCH]
    result.handle = ""  # the same backward from the arrays
    by_arrays = client.retrieve_backward("ns", result, grad, step_values=False)
    np.testing.assert_allclose(by_handle[0], by_arrays[0], rtol=1e-6, atol=1e-7)


def test_get_goes_in_chunks(deployment, monkeypatch):
    client, _, _ = deployment
    rows = calls_to(client, "get", monkeypatch)
    got = client.get("ns", np.arange(ROWS))
    np.testing.assert_array_equal(got.ids, np.arange(ROWS))
    assert len(rows) > 1 and sum(rows) == ROWS


def test_writes_through_shared_memory_go_in_larger_chunks_than_in_messages(deployment, monkeypatch):
    """A client whose tensors go in regions splits by SHARED_CHUNK_BYTES (its messages stay small); one
    that sends them in messages (another host, or shared_memory=False) by CHUNK_BYTES."""
    client, _, rng = deployment
    monkeypatch.setattr(client_module, "SHARED_CHUNK_BYTES", 4 * CHUNK)
    ids = np.arange(ROWS)
    grads = rng.standard_normal((ROWS, VALUE_DIM)).astype(np.float32)  # 152 bytes a row on the wire
    on_regions = calls_to(client, "apply_gradients", monkeypatch)
    assert client._store.uses_shared_memory() and client.apply_gradients("ns", ids, grads) == ROWS
    assert on_regions == [400, 400]  # 431 rows fit 4 CHUNK
    with MemoryClient(client.target, shared_memory=False) as in_messages:
        rows = calls_to(in_messages, "apply_gradients", monkeypatch)
        assert not in_messages._store.uses_shared_memory()
        assert in_messages.apply_gradients("ns", ids, grads) == ROWS
        assert rows == [100] * 8  # 107 fit CHUNK


def test_bad_calls_answered_in_parts_say_why_and_change_nothing(deployment):
    client, queries, _ = deployment
    before = client.get("ns", np.arange(ROWS)).values
    with pytest.raises(InvalidArgument, match="k must be"):
        client.search("ns", queries, K + 1)
    with pytest.raises(NotFound, match="nope"):
        client._store.search_parts("nope", queries, K)
    with pytest.raises(InvalidArgument, match="temperature"):
        client.retrieve("ns", queries, K, -1.0)
    np.testing.assert_array_equal(client.get("ns", np.arange(ROWS)).values, before)


def test_a_server_without_the_parts_calls_answers_the_unary_ones(monkeypatch):
    """A server from before SearchParts (UNIMPLEMENTED): the client uses Search and Retrieve, and
    asks no more."""
    import concurrent.futures

    import grpc
    from monim.workers.decoding import SERVICE, add_memory_service
    from monim.workers.servicer import MemoryServicer

    monkeypatch.setattr(client_module, "CHUNK_BYTES", CHUNK)
    runtime = LocalRuntime(1)
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(4))
    older = {m.name for m in SERVICE.methods} - {"SearchParts", "RetrieveParts"}
    add_memory_service(MemoryServicer(Router(runtime)), server, methods=frozenset(older))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with MemoryClient(f"127.0.0.1:{port}", read_endpoints=False) as client:
            client.create_namespace("ns", dim=DIM, max_k=K)
            keys = np.random.default_rng(2).standard_normal((ROWS, DIM)).astype(np.float32)
            client.add("ns", keys, np.arange(ROWS))
            unary = calls_to(client, "search", monkeypatch)
            found = client.search("ns", keys[:BATCH], K)
            assert unary == [BATCH] and not client._answers_in_parts
            np.testing.assert_array_equal(found.ids[:, 0], np.arange(BATCH))
    finally:
        server.stop(0)
        runtime.shutdown()


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
    monkeypatch.setattr(client_module, "SHARED_CHUNK_BYTES", 1 << 30)
    assert client.apply_gradients("twin", ids, grads) == ROWS
    assert rows[-1] == ROWS  # sent whole
    np.testing.assert_array_equal(client.get("ns", ids).values, client.get("twin", ids).values)


def test_a_client_that_stops_reading_an_answer_in_parts_leaves_the_server_serving(deployment):
    """The server frames each part as the one before goes out; a client that cancels after the first
    leaves nothing behind: the next calls are answered as before."""
    from monim.protos import memory_pb2 as pb
    from monim.protos import memory_pb2_grpc as pb_grpc

    client, queries, _ = deployment
    expected = client.search("ns", queries, K)
    stub = pb_grpc.MemoryServiceStub(client._store.channel)
    parts = stub.SearchParts(pb.SearchRequest(namespace="ns", k=K, queries=convert.tensor_to_proto(queries)))
    first = convert.search_result_from_proto(next(parts))
    np.testing.assert_array_equal(first.ids, expected.ids[:len(first.ids)])  # the first rows, first
    assert len(first.ids) < BATCH
    parts.cancel()
    for _ in range(3):
        np.testing.assert_array_equal(client.search("ns", queries, K).ids, expected.ids)


def test_a_training_forward_whose_answer_passes_half_the_message_limit_stays_one_forward_with_its_state(
        monkeypatch):
    """Only the queries must fit a message when the answer comes in parts: a Retrieve with keep_state
    whose answer (memory and slots) passes half the limit is one call that keeps its state, and its
    backward by handle steps as the backward from the arrays does. (Parts of 16 KiB: they must fit the
    client's limit, else it splits by the answer: test_concurrency's 64 KiB client.)"""
    monkeypatch.setattr(convert, "ANSWER_PART_BYTES", 16 * 1024)
    small = 256 * 1024
    runtime = LocalRuntime(1)
    server, port = start_server(Router(runtime), port=0, max_message_bytes=small)
    rng = np.random.default_rng(9)
    try:
        with MemoryClient(f"127.0.0.1:{port}", max_message_bytes=small) as client:
            client.create_namespace("ns", dim=DIM, value_dim=VALUE_DIM, max_k=K, optimizer="sgd", lr=0.1)
            keys = rng.standard_normal((ROWS, DIM)).astype(np.float32)
            client.add("ns", keys, np.arange(ROWS), values=rng.standard_normal((ROWS, VALUE_DIM)).astype(np.float32))
            queries = keys[rng.integers(0, ROWS, 600)]
            assert 600 * (4 * VALUE_DIM + 28 * K) > small // 2 > queries.nbytes
            result = client.retrieve("ns", queries, K, 0.5, keep_state=True)
            assert result.handle and result.memory.shape == (600, VALUE_DIM)
            grad = rng.standard_normal((600, VALUE_DIM)).astype(np.float32)
            by_handle = client.retrieve_backward("ns", result, grad, step_values=False)
            result.handle = ""
            np.testing.assert_allclose(client.retrieve_backward("ns", result, grad, step_values=False)[0], by_handle[0],
                                       rtol=1e-6, atol=1e-7)
    finally:
        server.stop(0)
        runtime.shutdown()


def test_a_search_whose_answer_passes_the_read_chunk_size_goes_as_calls_of_equal_rows_at_once(
        deployment, monkeypatch):
    """Past READ_CHUNK_BYTES a Search goes as calls of equal rows, several in flight at once (the
    server searches one while the answers before it travel), each answered in parts and copied into
    the batch's arrays: the same answer as one call, in arrays the caller may write to."""
    import threading
    import time

    client, queries, _ = deployment
    unary = client._store.search("ns", queries, K, return_weights=True)
    monkeypatch.setattr(client_module, "READ_CHUNK_BYTES", 2 * CHUNK)  # 32 KiB: the answer takes 56 KB
    monkeypatch.setattr(client_module, "SHARED_READ_CHUNK_BYTES", 2 * CHUNK)  # (a client on the server's host)
    real, in_flight, most, rows = client._store.search_parts, [0], [0], []
    lock = threading.Lock()

    def counted(namespace, queries, *args, **kwargs):
        with lock:
            rows.append(len(queries))
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(0.05)  # long enough for the calls after it to start
        try:
            return real(namespace, queries, *args, **kwargs)
        finally:
            with lock:
                in_flight[0] -= 1
    monkeypatch.setattr(client._store, "search_parts", counted)
    found = client.search("ns", queries, K, return_weights=True)
    assert len(rows) == 2 and rows == [BATCH // 2] * 2 and most[0] == 2
    for name in ("ids", "distances", "tokens", "weights"):
        if name == "distances":  # a batch of another size is another matmul: the last float32 place may differ
            np.testing.assert_allclose(found.distances, unary.distances, rtol=1e-5, atol=1e-5)
        else:
            np.testing.assert_array_equal(getattr(found, name), getattr(unary, name), err_msg=name)
        assert getattr(found, name).flags.writeable and getattr(found, name).flags.c_contiguous
    assert found.keys is None and found.values is None and found.generation == unary.generation


def test_a_namespace_made_again_between_the_calls_of_a_split_search_fails_it_clearly(deployment, monkeypatch):
    """The calls of a split batch answer from one incarnation of the namespace, or the search fails
    (FAILED_PRECONDITION, retry it): never ids of two incarnations in one answer."""
    from monim import FailedPrecondition

    client, queries, rng = deployment
    monkeypatch.setattr(client_module, "READ_CHUNK_BYTES", 2 * CHUNK)
    monkeypatch.setattr(client_module, "SHARED_READ_CHUNK_BYTES", 2 * CHUNK)
    monkeypatch.setattr(client_module, "PIPELINE_DEPTH", 1)  # one call after the other
    real, calls = client._store.search_parts, []

    def then_made_again(*args, **kwargs):
        answer = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            client.drop_namespace("ns")
            client.create_namespace("ns", dim=DIM, value_dim=VALUE_DIM, max_k=K)
            client.add("ns", rng.standard_normal((ROWS, DIM)).astype(np.float32), np.arange(ROWS))
        return answer
    monkeypatch.setattr(client._store, "search_parts", then_made_again)
    with pytest.raises(FailedPrecondition, match="re-created during this Search; retry it") as error:
        client.search("ns", queries, K)
    assert error.value.code == "FAILED_PRECONDITION" and len(calls) == 2
    monkeypatch.setattr(client._store, "search_parts", real)
    assert client.search("ns", queries, K).ids.shape == (BATCH, K)  # asked again, it is answered


def test_a_batch_answer_takes_its_row_ranges_in_any_order_and_refuses_one_that_does_not_fit():
    from monim.model_client.errors import InternalError

    answer = convert.BatchAnswer(5)
    answer.put(3, {"ids": np.array([[7], [8]]), "keys": None})
    answer.put(0, {"ids": np.array([[1], [2], [3]]), "keys": None})
    np.testing.assert_array_equal(answer.rows_of("ids", 0, 5), [[1], [2], [3], [7], [8]])
    assert answer.rows_of("keys", 0, 5) is None
    with pytest.raises(InternalError, match="does not fit"):
        answer.put(4, {"ids": np.array([[1], [2]])})  # past the batch's rows
    with pytest.raises(InternalError, match="does not fit"):
        answer.put(0, {"ids": np.array([[1, 2]])})  # another width
