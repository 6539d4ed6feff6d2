"""The shards' own read endpoints (workers/read_endpoint.py; docs/API.md, "Read endpoints").

In one process, without Ray: a front end over LocalRuntime(2) with read_endpoints on, whose
ReadEndpoints starts an endpoint per shard (each a router over the same runtime). A client's
Search, Retrieve, decode stream, training step, Add and ApplyGradients go to one of them and answer
as the front end does; a gone endpoint sends the call to the front end at once (no retry used; a
write lands once) and the client asks again later; an endpoint serves a memory layer's calls only,
and checks tokens and each step's namespace as the front end does.
"""

from __future__ import annotations

import concurrent.futures
import io
import queue
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from monim.model_client import read_routing
from monim.protos import convert
from monim.protos import memory_pb2 as pb
from monim.protos import memory_pb2_grpc as pb_grpc
from monim.protos.errors import (
    FailedPrecondition,
    InvalidArgument,
    MemoryStoreError,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from monim.protos.socket_frames import MESSAGE, send_frame
from monim.workers import cli_status
from monim.workers.auth import AuthPolicy
from monim.workers.read_endpoint import ENDPOINT_ATTRIBUTE, ENDPOINT_THREADS, stop_endpoint
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime
from monim.workers.server import start_server
from rich.console import Console

from monim import MemoryClient

DIM, VALUE_DIM, ROWS, SHARDS = 16, 8, 600, 2
AUTH = """
[[token]]
name = "reader"
secret = "reader-secret"
read = ["mem"]

[[token]]
name = "other"
secret = "other-secret"
read = ["elsewhere"]
"""


def _serve(runtime, **options):
    server, port = start_server(Router(runtime), port=0, **options)
    return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def deployment():
    """A front end with read endpoints and one without, over one runtime holding "mem"."""
    runtime = LocalRuntime(SHARDS)
    server, address = _serve(runtime, read_endpoints=True)
    plain, plain_address = _serve(runtime)
    rng = np.random.default_rng(0)
    with MemoryClient(address) as client:
        client.create_namespace("mem", dim=DIM, value_dim=VALUE_DIM)
        client.add("mem", rng.standard_normal((ROWS, DIM)).astype(np.float32), np.arange(ROWS) % 50,
                   values=rng.standard_normal((ROWS, VALUE_DIM)).astype(np.float32))
    yield runtime, address, plain_address, server
    server.stop(0)
    plain.stop(0)
    runtime.shutdown()


def _queries(seed: int, batch: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, DIM)).astype(np.float32)


def test_the_server_names_one_endpoint_per_shard_and_none_when_off(deployment):
    runtime, address, plain_address, _ = deployment
    with MemoryClient(address) as client, MemoryClient(plain_address) as plain:
        targets = client._store.read_endpoints()
        assert len(targets) == SHARDS and len(set(targets)) == SHARDS and address not in targets
        assert client._store.read_endpoints() == targets  # started once: asked again, the same ones
        assert plain._store.read_endpoints() == []
        with plain.decode() as stream:
            stream.search("mem", _queries(0), 4)
            assert stream.target == plain_address


def _endpoint_calls(runtime, method: str) -> int:
    """Calls of ``method`` answered OK by every shard's endpoint so far."""
    return sum(getattr(shard, ENDPOINT_ATTRIBUTE).stats()["calls"].get((method, "OK"), 0)
               for shard in runtime.shards if getattr(shard, ENDPOINT_ATTRIBUTE, None) is not None)


def test_reads_through_an_endpoint_answer_as_the_front_end_does(deployment):
    runtime, address, _, _ = deployment
    with MemoryClient(address) as client, MemoryClient(address, read_endpoints=False) as front_end, \
            client.decode() as stream:
        searched, retrieved = _endpoint_calls(runtime, "Search"), _endpoint_calls(runtime, "Retrieve")
        for step in range(12):
            queries, k = _queries(step), 1 + step % 9
            expected = front_end.search("mem", queries, k, return_values=True, return_weights=True)
            for found in (stream.search("mem", queries, k, return_values=True, return_weights=True),
                          client.search("mem", queries, k, return_values=True, return_weights=True)):
                np.testing.assert_array_equal(found.ids, expected.ids)
                np.testing.assert_allclose(found.distances, expected.distances, rtol=1e-6)
                np.testing.assert_array_equal(found.values, expected.values)
            expected = front_end.retrieve("mem", queries, k, 2.0)
            for read in (stream.retrieve("mem", queries, k, 2.0), client.retrieve("mem", queries, k, 2.0)):
                np.testing.assert_array_equal(read.ids, expected.ids)
                np.testing.assert_allclose(read.memory, expected.memory, rtol=1e-5, atol=1e-6)
        assert stream.target in client._store.read_endpoints()
        assert stream.target == client._store.read_routing.target()  # one endpoint for the client's reads
        assert _endpoint_calls(runtime, "Search") - searched == 12  # the calls, not the front end's
        assert _endpoint_calls(runtime, "Retrieve") - retrieved == 12
        assert _endpoint_calls(runtime, "Decode") >= 24
        # Every shard's rows are found from one endpoint (it fans out like the front end).
        owners = {int(i) % SHARDS for i in client.search("mem", _queries(99, 20), 10).ids.ravel()}
        assert owners == set(range(SHARDS))


def _endpoint_of(runtime, target: str):
    endpoints = [getattr(shard, ENDPOINT_ATTRIBUTE, None) for shard in runtime.shards]
    return next(endpoint for endpoint in endpoints if endpoint is not None and endpoint.target == target)


def test_a_training_step_through_an_endpoint_steps_as_one_through_the_front_end(deployment):
    """Retrieve(keep_state) + RetrieveBackward through the client's endpoint (its router keeps the
    forward) against the same on a twin namespace through the front end; then a backward whose
    endpoint went away between forward and backward: it reaches the front end, which does not know
    the handle, and the client sends the forward's arrays there (retries=0: no retry is spent)."""
    runtime, address, _, server = deployment
    rng = np.random.default_rng(7)
    keys = rng.standard_normal((200, DIM)).astype(np.float32)
    values = rng.standard_normal((200, VALUE_DIM)).astype(np.float32)
    with MemoryClient(address, retries=0) as client, MemoryClient(address, read_endpoints=False) as front_end:
        for name in ("train-ep", "train-fe"):
            front_end.create_namespace(name, dim=DIM, value_dim=VALUE_DIM)
            front_end.add(name, keys, np.arange(200) % 50, values=values)
        for step in range(2):
            queries, grad = _queries(20 + step), rng.standard_normal((3, VALUE_DIM)).astype(np.float32)
            forward = client.retrieve("train-ep", queries, 8, 1.0, keep_state=True)
            twin = front_end.retrieve("train-fe", queries, 8, 1.0, keep_state=True)
            np.testing.assert_array_equal(forward.ids, twin.ids)
            target = client._store.read_routing.target()
            if step == 0:  # the forward is kept where it was made: the client's endpoint, not the front end
                assert _endpoint_of(runtime, target).router.forwards.get(forward.handle, "train-ep") is not None
                with pytest.raises(FailedPrecondition):
                    server.router.forwards.get(forward.handle, "train-ep")
            else:  # the endpoints go away between the forward and its backward
                for shard in runtime.shards:
                    stop_endpoint(shard)
            grad_queries, grad_temperature = client.retrieve_backward("train-ep", forward, grad)
            expected_queries, expected_temperature = front_end.retrieve_backward("train-fe", twin, grad)
            np.testing.assert_allclose(grad_queries, expected_queries, rtol=1e-5, atol=1e-6)
            assert grad_temperature == pytest.approx(expected_temperature, rel=1e-5, abs=1e-6)
            np.testing.assert_allclose(front_end.get("train-ep", np.arange(200)).values,
                                       front_end.get("train-fe", np.arange(200)).values, rtol=1e-6, atol=1e-7)
        assert not np.allclose(front_end.get("train-ep", np.arange(200)).values, values)  # the steps stepped
        client._store.read_routing.forget()
        for name in ("train-ep", "train-fe"):
            front_end.drop_namespace(name)


def test_writes_through_an_endpoint_land_as_through_the_front_end_and_once_after_it_fails(deployment):
    """Add and ApplyGradients through the client's endpoint (one message, and in parts past a small
    message limit: pipelined chunks, a step staged in parts then committed) against the same on a twin
    namespace through the front end: the same ids and rows. Then the endpoints go away after an Add
    landed there, and the same Add (its request id) resent to the front end lands nothing twice."""
    runtime, address, _, _ = deployment
    rng = np.random.default_rng(11)
    keys = rng.standard_normal((300, DIM)).astype(np.float32)
    values = rng.standard_normal((300, VALUE_DIM)).astype(np.float32)
    grads = rng.standard_normal((300, VALUE_DIM)).astype(np.float32)
    # 8 KiB messages: 300 rows of 16 + 8 floats are 16 chunks; gradients of 300 rows, 3 parts and a commit.
    with MemoryClient(address, retries=0) as client, MemoryClient(address, read_endpoints=False) as front_end, \
            MemoryClient(address, retries=0, max_message_bytes=8 << 10) as chunked:
        for name in ("write-ep", "write-fe"):
            front_end.create_namespace(name, dim=DIM, value_dim=VALUE_DIM)
        twins = []  # (ids of an Add through the endpoint, ids of the same rows through the front end)
        for writer in (client, chunked):  # a chunked Add numbers its rows in the order its chunks land
            ids = writer.add("write-ep", keys, np.arange(300) % 50, values=values, request_id=f"add-{id(writer)}")
            twins.append((ids, front_end.add("write-fe", keys, np.arange(300) % 50, values=values)))
            assert writer.apply_gradients("write-ep", ids, grads) == 300
            assert front_end.apply_gradients("write-fe", twins[-1][1], grads) == 300
        for client_ in (client, chunked):
            endpoint = _endpoint_of(runtime, client_._store.read_routing.target())
            calls = endpoint.stats()["calls"]
            assert calls[("Add", "OK")] >= 1 and calls[("ApplyGradients", "OK")] >= 1
        for ep_ids, fe_ids in twins:
            ep_rows, fe_rows = front_end.get("write-ep", ep_ids), front_end.get("write-fe", fe_ids)
            np.testing.assert_array_equal(ep_rows.keys, keys)
            np.testing.assert_array_equal(ep_rows.keys, fe_rows.keys)
            np.testing.assert_allclose(ep_rows.values, fe_rows.values, rtol=1e-6, atol=1e-7)
            assert not np.allclose(ep_rows.values, values)  # the steps stepped

        landed = client.add("write-ep", keys[:40], np.arange(40), values=values[:40], request_id="once")
        for shard in runtime.shards:  # as if the endpoint's process died before the client heard back
            stop_endpoint(shard)
        again = client.add("write-ep", keys[:40], np.arange(40), values=values[:40], request_id="once")
        np.testing.assert_array_equal(again, landed)  # answered by the front end, from the request id
        assert client._store.read_routing.target() is None
        assert front_end.describe_namespace("write-ep").rows == 640
        client._store.read_routing.forget()
        for name in ("write-ep", "write-fe"):
            front_end.drop_namespace(name)


def test_a_failing_step_on_an_endpoint_is_answered_and_the_stream_goes_on(deployment):
    _, address, _, _ = deployment
    with MemoryClient(address) as client, client.decode() as stream:
        stream.search("mem", _queries(1), 3)
        target = stream.target
        with pytest.raises(InvalidArgument, match="dim"):
            stream.search("mem", np.zeros((1, DIM + 1), np.float32), 3)
        assert stream.search("mem", _queries(2), 3).ids.shape == (3, 3)
        assert stream.target == target
        assert client.describe_namespace("mem").rows == ROWS


def test_an_endpoint_serves_a_memory_layers_calls_only(deployment):
    _, address, _, _ = deployment
    with MemoryClient(address) as client:
        target = client._store.read_endpoints()[0]
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.MemoryServiceStub(channel)
        found = stub.Search(pb.SearchRequest(namespace="mem", queries=convert.tensor_to_proto(_queries(0)), k=2))
        assert convert.search_result_from_proto(found).ids.shape == (3, 2)
        for call, request in ((stub.Delete, pb.DeleteRequest(namespace="mem", ids=convert.tensor_to_proto(
                np.arange(3, dtype=np.int64)))), (stub.DropNamespace, pb.DropNamespaceRequest(namespace="mem"))):
            with pytest.raises(grpc.RpcError) as refused:
                call(request)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    with MemoryClient(address) as client:
        assert client.describe_namespace("mem").rows == ROWS
    # A client pointed at an endpoint itself reads there (ReadEndpoints is UNIMPLEMENTED there: none).
    with MemoryClient(target) as direct, direct.decode() as stream:
        assert direct._store.read_endpoints() == []
        assert stream.search("mem", _queries(3), 2).ids.shape == (3, 2)
        assert direct.search("mem", _queries(3), 2).ids.shape == (3, 2)
        assert stream.target == target


def test_a_gone_endpoint_sends_the_read_to_the_front_end_and_the_client_asks_again(deployment):
    runtime, address, _, _ = deployment
    with MemoryClient(address, retries=0) as client, MemoryClient(address, read_endpoints=False) as front_end, \
            client.decode() as stream:
        expected = front_end.search("mem", _queries(5), 6)
        stream.search("mem", _queries(4), 6)
        first = stream.target
        assert first != address and client._store.read_routing.target() == first
        for shard in runtime.shards:  # as when the shards' processes restarted: the endpoints are gone
            stop_endpoint(shard)
        # No retry to spend (retries=0): the fallback to the front end is free, for calls and steps.
        np.testing.assert_array_equal(client.search("mem", _queries(5), 6).ids, expected.ids)
        assert client._store.read_routing.target() is None  # reads stay on the front end for ENDPOINT_RETRY_S
        np.testing.assert_array_equal(stream.search("mem", _queries(5), 6).ids, expected.ids)
        assert stream.target == address
        client._store.read_routing.forget()  # the wait is over: the next read asks, and the front end starts them
        np.testing.assert_array_equal(client.search("mem", _queries(5), 6).ids, expected.ids)
        assert client._store.read_routing.target() not in (None, address, first)
        assert all(getattr(shard, ENDPOINT_ATTRIBUTE) is not None for shard in runtime.shards)
    assert read_routing.ENDPOINT_RETRY_S == 30.0


def test_an_endpoint_checks_tokens_and_each_steps_namespace(tmp_path):
    auth_file = tmp_path / "auth.toml"
    auth_file.write_text(AUTH)
    runtime = LocalRuntime(1)
    server, address = _serve(runtime, read_endpoints=True, auth=AuthPolicy.load(str(auth_file)))
    try:
        with MemoryClient(address, token="reader-secret") as reader:
            reader_targets = reader._store.read_endpoints()
        with MemoryClient(address) as anonymous, pytest.raises(Unauthenticated):
            anonymous._store.read_endpoints()
        with grpc.insecure_channel(reader_targets[0]) as channel:  # no token, straight at the endpoint
            stub = pb_grpc.MemoryServiceStub(channel)
            search = pb.SearchRequest(namespace="mem", queries=convert.tensor_to_proto(_queries(0)), k=1)
            for call in (lambda: next(stub.Decode(iter([pb.DecodeStep(search=search)]))), lambda: stub.Search(search),
                         lambda: next(stub.SearchParts(search))):
                with pytest.raises(grpc.RpcError) as refused:
                    call()
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with MemoryClient(address, token="other-secret") as other, other.decode() as stream:
            with pytest.raises(PermissionDenied, match="no read access"):
                stream.search("mem", _queries(0), 1)
            assert stream.target == reader_targets[0]
            with pytest.raises(PermissionDenied, match="no read access"):  # refused there, not sent elsewhere
                other.search("mem", _queries(0), 1)
            assert other._store.read_routing.target() == reader_targets[0]
            for parts in (other._store.search_parts, other._store.retrieve_parts):  # an answer in parts: the same
                with pytest.raises(PermissionDenied, match="no read access"):
                    parts("mem", _queries(0), 1, *(() if parts == other._store.search_parts else (1.0,)))
        with MemoryClient(address, token="reader-secret") as reader, pytest.raises(NotFound, match="'mem'"):
            reader._store.search_parts("mem", _queries(0), 1)  # let in: the namespace is not made in this test
    finally:
        server.stop(0)
        runtime.shutdown()


def test_endpoint_calls_and_streams_reach_the_front_ends_metrics():
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    runtime = LocalRuntime(1)
    server, address = _serve(runtime, read_endpoints=True, metrics_port=0, health_poll_s=0.1)
    try:
        with MemoryClient(address) as client:
            client.create_namespace("mem", dim=DIM)
            client.add("mem", _queries(0, 20), np.arange(20))
            with MemoryClient(address, read_endpoints=False) as front_end:
                front_end.create_namespace("learn", dim=DIM, value_dim=VALUE_DIM)
                front_end.add("learn", _queries(1, 20), np.arange(20), values=np.ones((20, VALUE_DIM), np.float32))
            client.retrieve("learn", _queries(2), 3, 1.0, keep_state=True)  # kept by the endpoint's router
            with client.decode() as stream:
                for step in range(5):
                    stream.search("mem", _queries(step), 3)
                with pytest.raises(InvalidArgument):
                    stream.search("mem", _queries(0), 0)
                assert stream.target != address
                for _ in range(2):
                    client.search("mem", _queries(0), 3)

                def scrape() -> dict:
                    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
                    with urllib.request.urlopen(url, timeout=30) as answer:
                        text = answer.read().decode()
                    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                            for family in text_string_to_metric_families(text) for sample in family.samples}

                samples = scrape()
                assert samples[("monim_read_endpoint_streams", (("shard", "0"),))] == 1
                # The stream is on the endpoint's host socket (so are the client's calls there); none turned away.
                assert samples[("monim_read_endpoint_host_socket_connections", (("shard", "0"),))] >= 1
                assert samples[("monim_read_endpoint_host_socket_refused_total", (("shard", "0"),))] == 0
                assert samples[("monim_host_socket_refused_total", ())] == 0  # the front end's own socket
                assert samples[("monim_read_endpoint_info", (("shard", "0"), ("target", stream.target)))] == 1
                # monim status shows where the endpoint listens and its open streams, from the same scrape.
                report = cli_status.collect(client, address, [f"http://127.0.0.1:{server.metrics_port}/metrics"], 30)
                shard = next(n for n in report["namespaces"] if n["name"] == "mem")["shards"][0]
                assert (shard["endpoint"], shard["endpoint_streams"]) == (stream.target, 1)
                out = Console(record=True, width=250, file=io.StringIO())
                out.print(cli_status.render(report))
                assert f"{stream.target} (1)" in out.export_text()
                calls = "monim_read_endpoint_calls_total"
                assert samples[(calls, (("code", "OK"), ("method", "Decode"), ("shard", "0")))] == 5
                assert samples[(calls, (("code", "INVALID_ARGUMENT"), ("method", "Decode"), ("shard", "0")))] == 1
                assert samples[(calls, (("code", "OK"), ("method", "Search"), ("shard", "0")))] == 2
                assert samples[(calls, (("code", "OK"), ("method", "Add"), ("shard", "0")))] == 1
                assert samples[("monim_read_endpoint_forward_states", (("shard", "0"),))] == 1  # the kept Retrieve
                assert samples[("monim_read_endpoint_forward_state_bytes", (("shard", "0"),))] > 0
                dropped = "monim_read_endpoint_forward_states_dropped_total"
                assert samples[(dropped, (("shard", "0"), ("why", "missed")))] == 0
                assert samples[("monim_forward_states", ())] == 0  # the front end's table: none kept there
                assert not any(name == "monim_requests_total" and dict(labels)["namespace"] == "mem"
                               and dict(labels)["method"] != "CreateNamespace"
                               for name, labels in samples)  # the front end served none of the data calls
                # ... and yet the per-namespace rates (`monim status`) count them, as the endpoints' own
                # (every front end reports the same; status adds them once to the front ends' sum): the
                # 9 calls over the second or few this endpoint has run; the front end's own: none.
                assert 1.0 < samples[("monim_read_endpoint_namespace_requests_per_second", (("namespace", "mem"),))] <= 9
                assert ("monim_read_endpoint_namespace_request_p99_seconds", (("namespace", "mem"),)) in samples
                # The front end saw no data call of "mem" (CreateNamespace is not one): no rate of its own.
                assert ("monim_namespace_requests_per_second", (("namespace", "mem"),)) not in samples
            deadline = time.monotonic() + 10
            while scrape()[("monim_read_endpoint_streams", (("shard", "0"),))] != 0:  # the stream closed
                assert time.monotonic() < deadline, "the endpoint still counts the closed stream"
                time.sleep(0.05)
    finally:
        server.stop(0)
        runtime.shutdown()


def _leave_mid_stream(stream, step) -> None:
    """Goes away with a step sent and its answer never read (the stream not closed)."""
    inner = stream._stream
    if stream.transport == "socket":
        send_frame(inner._stream._socket, MESSAGE, step.SerializeToString())
        inner._stream._socket.close()
    else:
        inner._requests.put(step)
        inner._results.cancel()


@pytest.mark.parametrize("transport", ["socket", "grpc"])
def test_streams_of_several_clients_run_at_once_on_one_endpoint_and_leave_nothing_behind(deployment, transport):
    """Over gRPC, and over the endpoint's Unix socket (workers/host_socket.py: a client on its host)."""
    runtime, address, _, _ = deployment
    with MemoryClient(address) as reference:
        expected = {seed: reference.search("mem", _queries(seed), 5) for seed in range(40)}
        target = reference._store.read_endpoints()[0]
    endpoint = next(getattr(shard, ENDPOINT_ATTRIBUTE) for shard in runtime.shards
                    if getattr(shard, ENDPOINT_ATTRIBUTE).target == target)
    failures, started = [], threading.Barrier(4)

    def generate(worker: int) -> None:
        try:
            with MemoryClient(target, shared_memory=transport == "socket") as client, client.decode() as stream:
                started.wait(timeout=30)  # (the endpoint itself: no choice of where to stream)
                for seed in range(worker, 40, 4):
                    found = stream.search("mem", _queries(seed), 5)
                    np.testing.assert_array_equal(found.ids, expected[seed].ids)
                assert stream.transport == transport
                if worker == 0:  # goes away mid-stream: a step sent, its answer never read
                    _leave_mid_stream(stream, pb.DecodeStep(search=pb.SearchRequest(
                        namespace="mem", queries=convert.tensor_to_proto(_queries(0)), k=5)))
        except Exception as error:  # noqa: BLE001 - reported by the test's thread
            failures.append(error)

    workers = [threading.Thread(target=generate, args=(i,)) for i in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert not failures
    deadline = time.monotonic() + 10
    while endpoint.gate.streams or endpoint.gate.in_flight or endpoint.host_socket.connections:
        assert time.monotonic() < deadline, (endpoint.gate.streams, endpoint.gate.in_flight)
        time.sleep(0.05)


def test_a_full_endpoint_sends_the_stream_to_the_front_end(deployment):
    _, address, _, _ = deployment
    step = pb.DecodeStep(search=pb.SearchRequest(namespace="mem", queries=convert.tensor_to_proto(_queries(0)), k=2))
    with MemoryClient(address) as client, client.decode() as stream:
        target = client._store.read_routing.target()  # the endpoint this client reads through
        held, channel = [], grpc.insecure_channel(target)
        try:
            stub = pb_grpc.MemoryServiceStub(channel)
            for _ in range(ENDPOINT_THREADS // 2):  # as many open streams as the endpoint takes
                requests = queue.SimpleQueue()
                answers = stub.Decode(iter(requests.get, None))
                requests.put(step)
                assert next(answers).code == 0
                held.append((requests, answers))
            with pytest.raises(grpc.RpcError) as refused:  # one more is refused
                next(stub.Decode(iter([step])))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            np.testing.assert_array_equal(stream.search("mem", _queries(0), 2).ids,
                                          client.search("mem", _queries(0), 2).ids)
            assert stream.target == address  # the client's refused stream went to the front end at once
        finally:
            for requests, answers in held:
                requests.put(None)
                answers.cancel()
            channel.close()


def _held(router, method: str):
    """Holds router.method's calls until ``release`` is set: (entered, release, finished) Events,
    finished set once a held call has run (the real method) to its end."""
    entered, release, finished = threading.Event(), threading.Event(), threading.Event()
    real = getattr(router, method)

    def held(*args, **kwargs):
        entered.set()
        release.wait(30)
        try:
            return real(*args, **kwargs)
        finally:
            finished.set()

    setattr(router, method, held)
    return entered, release, finished


def _closing_shard(runtime, client):
    """The endpoint the client reads through, and the shard whose endpoint it is."""
    endpoint = _endpoint_of(runtime, client._store.read_routing.target())
    return endpoint, next(shard for shard in runtime.shards if getattr(shard, ENDPOINT_ATTRIBUTE, None) is endpoint)


@pytest.fixture
def twins(deployment):
    """"close-ep" and its twin "close-fe", the same rows (dropped after the test); (ids, gradients
    for them)."""
    _, address, _, _ = deployment
    rng, rows = np.random.default_rng(21), 120
    keys = rng.standard_normal((rows, DIM)).astype(np.float32)
    values = rng.standard_normal((rows, VALUE_DIM)).astype(np.float32)
    with MemoryClient(address, read_endpoints=False) as front_end:
        ids = []
        for name in ("close-ep", "close-fe"):
            front_end.create_namespace(name, dim=DIM, value_dim=VALUE_DIM, optimizer="adam", lr=0.05)
            ids.append(front_end.add(name, keys, np.arange(rows) % 50, values=values))
        np.testing.assert_array_equal(ids[0], ids[1])
        yield ids[0], rng.standard_normal((rows, VALUE_DIM)).astype(np.float32)
        for name in ("close-ep", "close-fe"):
            front_end.drop_namespace(name)


def _stepped_once(front_end, ids, grads) -> None:
    """close-ep's rows are close-fe's after one step of the same gradients (Adam: a second step of
    them would move the rows on)."""
    assert front_end.apply_gradients("close-fe", ids, grads) == len(ids)
    np.testing.assert_allclose(front_end.get("close-ep", ids).values, front_end.get("close-fe", ids).values,
                               rtol=1e-6, atol=1e-7)


def test_a_write_in_flight_on_a_closing_shards_endpoint_is_answered_there(deployment, twins):
    """A reshard that shrinks closes a shard and its endpoint while clients' calls are in flight
    there: the endpoint refuses new calls, waits for those in flight (STOP_GRACE_S), then stops. An
    ApplyGradients held in the endpoint's router while its shard closes is answered by the endpoint,
    and steps the rows once (the reliability run's reshard saw a bare CANCELLED: the endpoint
    stopped with no grace)."""
    runtime, address, _, _ = deployment
    with MemoryClient(address, retries=0) as client, MemoryClient(address, read_endpoints=False) as front_end:
        ids, grads = twins
        endpoint, shard = _closing_shard(runtime, client)
        entered, release, _ = _held(endpoint.router, "apply_gradients")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            try:
                write = pool.submit(client.apply_gradients, "close-ep", ids, grads)
                assert entered.wait(10)
                closing = pool.submit(stop_endpoint, shard)
                time.sleep(0.3)
                assert not closing.done()  # it waits for the call in flight
            finally:
                release.set()
            assert write.result(timeout=10) == len(ids)
            closing.result(timeout=10)
        assert endpoint.stats()["calls"].get(("ApplyGradients", "OK")) == 1  # answered where it was sent
        _stepped_once(front_end, ids, grads)
        client._store.read_routing.forget()


def test_a_call_the_closing_endpoint_cancels_past_its_grace_goes_to_the_front_end_and_lands_once(deployment, twins,
                                                                                                 monkeypatch):
    """A call still in flight when the grace runs out is cancelled by the endpoint's stop: the
    client (no retries to spend) sends it to the front end at once, as for a gone endpoint; the
    cancelled handler goes on to its end, and its write (the same request id) lands nothing twice.
    A CANCELLED the client did not ask for is UNAVAILABLE to it (the server stopped mid-call)."""
    from monim.workers import read_endpoint

    monkeypatch.setattr(read_endpoint, "STOP_GRACE_S", 0.2)
    runtime, address, _, _ = deployment
    with MemoryClient(address, retries=0) as client, MemoryClient(address, read_endpoints=False) as front_end:
        ids, grads = twins
        endpoint, shard = _closing_shard(runtime, client)
        entered, release, finished = _held(endpoint.router, "apply_gradients")
        try:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                write = pool.submit(client.apply_gradients, "close-ep", ids, grads)
                assert entered.wait(10)
                stop_endpoint(shard)  # the grace passes with the call still held
                assert write.result(timeout=10) == len(ids)  # from the front end
        finally:
            release.set()
        assert finished.wait(10)  # the cancelled handler's write, sent after the front end's
        assert client._store.read_routing.target() is None  # reads stay on the front end a while
        _stepped_once(front_end, ids, grads)
        client._store.read_routing.forget()


def test_a_decode_step_the_closing_endpoint_cancels_is_answered_by_the_front_end(deployment, monkeypatch):
    from monim.workers import read_endpoint

    monkeypatch.setattr(read_endpoint, "STOP_GRACE_S", 0.2)
    runtime, address, _, _ = deployment
    with MemoryClient(address, retries=0) as client, client.decode() as stream:
        expected = client.search("mem", _queries(30), 4)
        stream.search("mem", _queries(31), 4)
        endpoint, shard = _closing_shard(runtime, client)
        assert stream.target == endpoint.target
        entered, release, _ = _held(endpoint.router, "search")
        try:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                step = pool.submit(stream.search, "mem", _queries(30), 4)
                assert entered.wait(10)
                stop_endpoint(shard)
                np.testing.assert_array_equal(step.result(timeout=10).ids, expected.ids)
        finally:
            release.set()
        assert stream.target == address
        client._store.read_routing.forget()


class _CancelledByTheServer(MemoryStoreError):
    """What a server's gRPC core answers a call it drops while stopping: CANCELLED, no details (a
    call that had not reached a handler yet; grpc/grpc#41785). Raised by a router, the servicer
    answers it with that status."""

    code = "CANCELLED"


def _cancelled_after(router, method: str) -> list:
    """router.method runs, then its call is answered CANCELLED (once): the write landed, the client
    does not know. Returns the list the cancelled calls' answers go to."""
    real, answers = getattr(router, method), []

    def cancelled(*args, **kwargs):
        if answers:
            return real(*args, **kwargs)
        answers.append(real(*args, **kwargs))
        raise _CancelledByTheServer("")

    setattr(router, method, cancelled)
    return answers


def test_a_call_an_endpoint_answers_cancelled_goes_to_the_front_end_and_lands_once(deployment, twins):
    """The reliability run's reshard (2 -> 1 shards) once answered an ApplyGradients on a closing
    endpoint with a bare CANCELLED, which reached the workload as an error. A CANCELLED the client
    did not ask for means the server stopped during the call: to the client it is UNAVAILABLE, so
    the call goes to the front end (no retry spent), where its request id lands it once."""
    runtime, address, _, _ = deployment
    with MemoryClient(address, retries=0) as client, MemoryClient(address, read_endpoints=False) as front_end:
        ids, grads = twins
        endpoint, _ = _closing_shard(runtime, client)
        landed = _cancelled_after(endpoint.router, "apply_gradients")
        try:
            assert client.apply_gradients("close-ep", ids, grads) == len(ids)
        finally:
            del endpoint.router.apply_gradients
        assert landed == [len(ids)]  # it had landed on the endpoint
        assert endpoint.stats()["calls"][("ApplyGradients", "CANCELLED")] == 1
        assert client._store.read_routing.target() is None  # reads stay on the front end a while
        _stepped_once(front_end, ids, grads)
        client._store.read_routing.forget()


def test_a_call_the_front_end_answers_cancelled_is_retried_and_lands_once(deployment, twins):
    _, address, _, server = deployment
    with MemoryClient(address, retries=1, backoff_s=0.01, read_endpoints=False) as front_end:
        ids, grads = twins
        landed = _cancelled_after(server.router, "apply_gradients")
        try:
            assert front_end.apply_gradients("close-ep", ids, grads) == len(ids)
        finally:
            del server.router.apply_gradients
        assert landed == [len(ids)]
        _stepped_once(front_end, ids, grads)
        with MemoryClient(address, retries=0, read_endpoints=False) as no_retries:
            _cancelled_after(server.router, "search")
            try:
                with pytest.raises(Unavailable, match="cancelled"):
                    no_retries.search("close-ep", _queries(0), 2)
            finally:
                del server.router.search


def test_a_call_in_flight_when_its_own_client_closes_is_not_retried(deployment):
    """CANCELLED "Channel closed!" is the client's own doing (close() from another thread): it stays
    an error of that call, not UNAVAILABLE, and no retry runs on the closed channel."""
    runtime, address, _, server = deployment
    entered, release, finished = _held(server.router, "search")
    try:
        client = MemoryClient(address, retries=3, backoff_s=0.01, read_endpoints=False)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            call = pool.submit(client.search, "mem", _queries(0), 2)
            assert entered.wait(10)
            client.close()
            with pytest.raises(MemoryStoreError, match="Channel closed") as closed:
                call.result(timeout=10)
        assert not isinstance(closed.value, Unavailable)
    finally:
        release.set()
        del server.router.search
    assert finished.wait(10)
