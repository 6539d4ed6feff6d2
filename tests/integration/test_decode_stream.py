"""The Decode stream (docs/API.md, "Decode streams"): a generating model's reads, one step per token.

Against a front end of its own in this process (on the session's Ray), so that the test can see what
the server holds: steps answer as the unary calls do, in order; a failing step is answered with its
code and the stream goes on; a client that reads nothing holds the server back (flow control) rather
than making it buffer; a client that goes away mid-stream leaves no stream, call in flight or forward
state behind; a server full of streams refuses the next one and the client sends calls instead.
"""

from __future__ import annotations

import threading
import time
import uuid

import grpc
import numpy as np
import pytest
from monim.protos import convert
from monim.protos import memory_pb2 as pb
from monim.protos import memory_pb2_grpc as pb_grpc
from monim.protos.errors import InvalidArgument, NotFound

from monim import MemoryClient

DIM, VALUE_DIM, ROWS = 16, 8, 400


@pytest.fixture(scope="module")
def front_end(ray_joined):
    from monim.workers.embedded import EmbeddedStore

    # The front end's own Decode (the shards' endpoints: test_read_endpoints_service.py).
    store = EmbeddedStore(shards=2, ray_address="auto", shard_cpus=0, use_gpus=False,
                          deployment=f"decode-{uuid.uuid4().hex[:8]}", read_endpoints=False)
    try:
        yield store
    finally:
        store.stop()


@pytest.fixture(scope="module")
def client(front_end):
    with MemoryClient(front_end.address, timeout_s=60) as client:
        rng = np.random.default_rng(0)
        client.create_namespace("mem", dim=DIM, value_dim=VALUE_DIM)
        client.add("mem", rng.standard_normal((ROWS, DIM)).astype(np.float32), np.arange(ROWS) % 50,
                   values=rng.standard_normal((ROWS, VALUE_DIM)).astype(np.float32))
        yield client


def _queries(seed: int, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, DIM)).astype(np.float32)


def _raw_stub(front_end):
    channel = grpc.insecure_channel(front_end.address)
    return channel, pb_grpc.MemoryServiceStub(channel)


def _rows(client) -> int:
    return client.describe_namespace("mem").rows


def test_steps_answer_as_the_calls_do_in_order(client):
    with client.decode() as stream:
        for step in range(30):
            queries, k = _queries(step), 1 + step % 7
            if step % 2:
                found, expected = stream.search("mem", queries, k, return_weights=True), client.search("mem", queries, k)
                np.testing.assert_array_equal(found.ids, expected.ids)
                np.testing.assert_allclose(found.distances, expected.distances, rtol=1e-6)
                assert found.weights is not None and found.ids.shape == (2, k)
            else:
                read, expected = stream.retrieve("mem", queries, k, 2.0), client.retrieve("mem", queries, k, 2.0)
                np.testing.assert_array_equal(read.ids, expected.ids)
                np.testing.assert_allclose(read.memory, expected.memory, rtol=1e-5, atol=1e-6)


def test_tensors_in_and_out_through_the_server(client):
    """as_tensors (docs/API.md, "Tensors in and out") on a server: a call, a stream's step and a training
    step's backward answer tensors with the numpy path's numbers."""
    import torch

    queries = _queries(99, batch=3)
    expected = client.retrieve("mem", queries, 5, 2.0)
    with client.decode() as stream:
        read = stream.retrieve("mem", torch.from_numpy(queries), 5, 2.0, as_tensors=True)
    called = client.retrieve("mem", torch.from_numpy(queries).double(), 5, 2.0, as_tensors=True)
    for result in (read, called):
        assert result.tensors and result.memory.dtype == torch.float32 and result.ids.dtype == torch.int64
        np.testing.assert_array_equal(result.ids.numpy(), expected.ids)
        np.testing.assert_allclose(result.memory.numpy(), expected.memory, rtol=1e-5, atol=1e-6)
    grad = np.random.default_rng(5).standard_normal((3, VALUE_DIM)).astype(np.float32)
    grad_queries, _ = client.retrieve_backward("mem", called, torch.from_numpy(grad), step_values=False)
    expected_grad, _ = client.retrieve_backward("mem", expected, grad, step_values=False)
    assert isinstance(grad_queries, torch.Tensor)
    np.testing.assert_allclose(grad_queries.numpy(), expected_grad, rtol=1e-5, atol=1e-6)


def test_a_failing_step_is_answered_with_its_code_and_the_stream_goes_on(client, front_end):
    rows = _rows(client)
    # On the server's host socket (this client shares its host) and over gRPC (as from another host).
    with MemoryClient(front_end.address, timeout_s=60, shared_memory=False) as over_grpc:
        for reader, transport in ((client, "socket"), (over_grpc, "grpc")):
            with reader.decode() as stream:
                with pytest.raises(NotFound, match="'nope' does not exist"):
                    stream.search("nope", _queries(1), 4)
                with pytest.raises(InvalidArgument, match="k must be"):
                    stream.search("mem", _queries(1), 0)
                with pytest.raises(InvalidArgument, match="temperature"):
                    stream.retrieve("mem", _queries(1), 4, temperature=-1.0)
                assert stream.search("mem", _queries(1), 4).ids.shape == (2, 4)  # the same stream answers on
                assert stream.transport == transport
    # Steps the client library would not send: keep_state, an empty step, bytes that are no DecodeStep.
    channel, stub = _raw_stub(front_end)
    queries = convert.tensor_to_proto(_queries(2))
    steps = [pb.DecodeStep(retrieve=pb.RetrieveRequest(namespace="mem", queries=queries, k=3, temperature=1.0,
                                                       keep_state=True)),
             pb.DecodeStep(),
             pb.DecodeStep(search=pb.SearchRequest(namespace="mem", queries=queries, k=3))]
    results = list(stub.Decode(iter(steps), timeout=60))
    assert [r.code for r in results] == [grpc.StatusCode.INVALID_ARGUMENT.value[0]] * 2 + [0]
    assert "keeps no forward state" in results[0].message and "neither a search nor a retrieve" in results[1].message
    assert list(results[2].search.ids.shape) == [2, 3]
    raw = channel.stream_stream("/monim.v1.MemoryService/Decode", request_serializer=None,
                                response_deserializer=pb.DecodeStepResult.FromString)
    garbage = list(raw(iter([b"\xff\xff\xff\xff"]), timeout=60))
    assert garbage[0].code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "not a valid DecodeStep" in garbage[0].message
    channel.close()
    assert _rows(client) == rows and len(front_end.router.forwards) == 0  # nothing stored or kept


def _offered_unread(stub, step: pb.DecodeStep, offered: int):
    """Opens a Decode stream offering ``offered`` copies of step and reads no answer until the client's
    side stops sending them (no step taken for 2 s; 60 s at most). Returns (the stream's answers, still
    unread, and how many steps the client's side sent)."""
    taken = []

    def steps():
        for index in range(offered):
            taken.append(index)
            yield step

    results = stub.Decode(steps(), timeout=120)  # (held, not read: dropped, the call would be cancelled)
    held, still_since, deadline = -1, time.monotonic(), time.monotonic() + 60
    while time.monotonic() < deadline and (held != len(taken) or time.monotonic() - still_since < 2):
        if held != len(taken):  # the client's side still sends steps
            held, still_since = len(taken), time.monotonic()
        time.sleep(0.25)
    return results, held


def test_a_client_that_reads_nothing_holds_the_server_back(client, front_end):
    """gRPC's flow control: while the client reads no answer, the server stops taking steps once the
    transport's windows are full, and then the client's side stops sending them, instead of the server
    buffering every answer. (How many steps are sent before then moves with gRPC's windows, which its
    BDP probes size: up to ~20 MB of requests were seen in CI; 32-34 steps of the 400 offered here, 256
    KiB each way, on the VM.)"""
    channel, stub = _raw_stub(front_end)
    step = pb.DecodeStep(search=pb.SearchRequest(
        namespace="mem", queries=convert.tensor_to_proto(np.zeros((4096, DIM), np.float32)), k=4))
    try:
        results, held = _offered_unread(stub, step, 400)
        assert held < 400, f"the client's side sent all {held} steps while it read none"
        answered = sum(1 for result in results if result.code == 0)  # now read all, in order, every one answered
        assert answered == 400
    finally:
        channel.close()  # a stream left open would hold the server's gate for the tests after


def test_a_stream_whose_client_reads_nothing_costs_the_server_no_memory():
    """The server's side of the test above, in a server process of its own (bench/one_process_service.py:
    the router and one shard, no Ray), so that its memory is its own: while the client sends steps whose
    answers (29 MB each) it never reads, the server's resident memory grows by the transport's windows
    and the requests and the few answers they hold, not by the answers of the steps it was sent (on the
    VM: ~96 MB, while 48-53 steps were sent, whose answers are 1.3-1.5 GB)."""
    from monim.workers.machine import _resident_bytes

    from bench.one_process_service import OneProcessService

    def resident_mb(pid: int) -> float:
        return _resident_bytes(pid) / 2**20

    rng = np.random.default_rng(0)
    queries = np.zeros((2048, DIM), np.float32)
    with OneProcessService("cpu") as service, MemoryClient(service.address, timeout_s=60) as client:
        client.create_namespace("mem", dim=DIM, value_dim=VALUE_DIM)
        client.add("mem", rng.standard_normal((ROWS, DIM)).astype(np.float32), np.arange(ROWS) % 50,
                   values=rng.standard_normal((ROWS, VALUE_DIM)).astype(np.float32))
        client.search("mem", queries, 128, return_keys=True, return_values=True)  # the server's paths warm
        before = resident_mb(service.pid)
        channel = grpc.insecure_channel(service.address)
        step = pb.DecodeStep(search=pb.SearchRequest(namespace="mem", queries=convert.tensor_to_proto(queries), k=128,
                                                     return_keys=True, return_values=True))
        try:
            results, held = _offered_unread(pb_grpc.MemoryServiceStub(channel), step, 200)
            grown = resident_mb(service.pid) - before
            answers_mb = held * 2048 * 128 * (16 + 4 * DIM + 4 * VALUE_DIM) / 2**20
            assert grown < answers_mb / 4, (held, grown, answers_mb)
            results.cancel()
        finally:
            channel.close()


def test_a_client_that_goes_away_mid_stream_leaves_nothing_behind(client, front_end):
    gate = front_end.server.gate
    before = len(front_end.router.forwards)
    channel, stub = _raw_stub(front_end)
    queries = convert.tensor_to_proto(_queries(3))
    stop = threading.Event()

    def steps():
        while not stop.is_set():
            yield pb.DecodeStep(retrieve=pb.RetrieveRequest(namespace="mem", queries=queries, k=5, temperature=1.0))
            time.sleep(0.01)

    results = stub.Decode(steps(), timeout=120)
    for _ in range(10):
        assert next(results).code == 0
    assert gate.streams == 1
    channel.close()  # gone, without closing the stream
    stop.set()
    deadline = time.monotonic() + 30
    while (gate.streams or gate.in_flight) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gate.streams == 0 and gate.in_flight == 0
    assert len(front_end.router.forwards) == before


def test_a_server_full_of_streams_refuses_the_next_and_the_client_sends_calls(client, front_end):
    gate = front_end.server.gate
    limit, gate.max_streams = gate.max_streams, 1
    try:
        with client.decode() as first, client.decode() as second:
            first.search("mem", _queries(4), 3)  # holds the one stream the server now takes
            channel, stub = _raw_stub(front_end)
            queries = convert.tensor_to_proto(_queries(4))
            refused = stub.Decode(iter([pb.DecodeStep(search=pb.SearchRequest(namespace="mem", queries=queries, k=3))]),
                                  timeout=60)
            with pytest.raises(grpc.RpcError) as raised:
                list(refused)
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "decode streams are open" in raised.value.details()
            channel.close()
            expected = client.search("mem", _queries(5), 3)
            np.testing.assert_array_equal(second.search("mem", _queries(5), 3).ids, expected.ids)  # by calls
            assert gate.streams == 1
    finally:
        gate.max_streams = limit
