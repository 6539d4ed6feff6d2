"""Decode streams on a server's Unix socket (workers/host_socket.py), for clients on its host: the
same answers as the gRPC stream, in order; a failing step answered with its code and the stream
going on; bytes that are no step refused as INVALID_ARGUMENT; tokens checked (no token: the stream
ends UNAUTHENTICATED; a step outside the token's grant: PERMISSION_DENIED, the stream goes on); the
stream limit shared with gRPC streams; a client gone mid-stream leaves no stream, step in flight or
thread behind; a drained server ends its socket streams UNAVAILABLE and removes the file; a client
that cannot reach the socket streams over gRPC; a broken peer never stops the listener; a dead
server's socket file is removed by the next server. A real gRPC server in this process (no Ray)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from monim.protos import convert, shared_memory
from monim.protos import memory_pb2 as pb
from monim.protos.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from monim.protos.socket_frames import HELLO, MESSAGE, STATUS, recv_frame, send_frame
from monim.workers.auth import AuthPolicy
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime
from monim.workers.server import start_server

from monim import MemoryClient

pytestmark = pytest.mark.skipif(not shared_memory.enabled(), reason="no /dev/shm on this machine")

DIM, VALUE_DIM, ROWS = 16, 8, 300
AUTH = """
[[token]]
name = "admin"
secret = "admin-secret"
admin = true
write = ["*"]

[[token]]
name = "reader"
secret = "reader-secret"
read = ["mem"]
write = ["mem"]

[[token]]
name = "other"
secret = "other-secret"
read = ["elsewhere"]
"""


def _queries(seed: int, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, DIM)).astype(np.float32)


def _serve(auth=None):
    """(front end, address, runtime) with "mem" filled."""
    runtime = LocalRuntime(1)
    frontend, port = start_server(Router(runtime), port=0, auth=auth)
    address = f"127.0.0.1:{port}"
    with MemoryClient(address, token="admin-secret" if auth else None) as client:
        rng = np.random.default_rng(0)
        client.create_namespace("mem", dim=DIM, value_dim=VALUE_DIM)
        client.add("mem", rng.standard_normal((ROWS, DIM)).astype(np.float32), np.arange(ROWS) % 50,
                   values=rng.standard_normal((ROWS, VALUE_DIM)).astype(np.float32))
    return frontend, address, runtime


@pytest.fixture
def served():
    frontend, address, runtime = _serve()
    yield frontend, address, runtime
    frontend.stop(0)
    runtime.shutdown()


@pytest.fixture
def served_with_tokens(tmp_path):
    path = tmp_path / "auth.toml"
    path.write_text(AUTH)
    frontend, address, runtime = _serve(AuthPolicy.load(str(path)))
    yield frontend, address, runtime
    frontend.stop(0)
    runtime.shutdown()


def _raw(frontend, metadata=()) -> socket.socket:
    """A connection to the server's decode socket, its hello sent."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.settimeout(30)
    connection.connect(frontend.host_socket.path)
    send_frame(connection, HELLO, json.dumps([list(pair) for pair in metadata]).encode())
    return connection


def _closed(connection: socket.socket) -> bool:
    """The server closed the connection (reset, when a step it never read was left in it)."""
    try:
        return recv_frame(connection) is None
    except ConnectionResetError:
        return True


def _step(seed: int = 0, k: int = 3, namespace: str = "mem") -> pb.DecodeStep:
    return pb.DecodeStep(search=pb.SearchRequest(namespace=namespace, queries=convert.tensor_to_proto(_queries(seed)),
                                                 k=k))


def _failures_in_threads(work, workers: int) -> list:
    """work(worker) run on `workers` threads at once; the exceptions they raised."""
    failures = []

    def run(worker: int) -> None:
        try:
            work(worker)
        except Exception as error:  # noqa: BLE001 - returned
            failures.append(error)

    threads = [threading.Thread(target=run, args=(worker,)) for worker in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return failures


def _wait_idle(frontend) -> None:
    gate, deadline = frontend.gate, time.monotonic() + 10
    while gate.streams or gate.in_flight or frontend.host_socket.connections:
        assert time.monotonic() < deadline, (gate.streams, gate.in_flight, frontend.host_socket.connections)
        time.sleep(0.02)


def test_steps_on_the_socket_answer_as_the_grpc_stream_does_in_order(served):
    frontend, address, _ = served
    with MemoryClient(address) as local, MemoryClient(address, shared_memory=False) as remote, \
            local.decode() as on_socket, remote.decode() as on_grpc:
        for step in range(40):
            queries, k = _queries(step), 1 + step % 7
            if step % 2:
                found, expected = on_socket.search("mem", queries, k, return_weights=True), \
                    on_grpc.search("mem", queries, k, return_weights=True)
                for name in ("ids", "distances", "tokens", "weights"):
                    np.testing.assert_array_equal(getattr(found, name), getattr(expected, name))
            else:
                read, expected = on_socket.retrieve("mem", queries, k, 2.0), on_grpc.retrieve("mem", queries, k, 2.0)
                np.testing.assert_array_equal(read.ids, expected.ids)
                np.testing.assert_array_equal(read.memory, expected.memory)
        assert (on_socket.transport, on_grpc.transport) == ("socket", "grpc")
        assert on_socket.target == on_grpc.target == address
        assert frontend.gate.streams == 2 and frontend.host_socket.connections == 2  # a stream, and the calls
    _wait_idle(frontend)


def test_a_failing_step_is_answered_with_its_code_and_the_stream_goes_on(served):
    """The bytes a client library would not send (keep_state, an empty step, no DecodeStep at all), on
    the raw socket; the library's failing steps on both transports: tests/integration/test_decode_stream.py."""
    frontend, address, _ = served
    with MemoryClient(address) as client:
        before = len(client.get("mem", np.arange(ROWS)).ids)
        connection = _raw(frontend)
        keep = pb.DecodeStep(retrieve=pb.RetrieveRequest(namespace="mem", queries=convert.tensor_to_proto(_queries(2)),
                                                         k=3, temperature=1.0, keep_state=True))
        answers = []
        for payload in (keep.SerializeToString(), pb.DecodeStep().SerializeToString(), b"\xff\xff\xff\xff",
                        _step().SerializeToString()):
            send_frame(connection, MESSAGE, payload)
            kind, answer = recv_frame(connection)
            assert kind == MESSAGE
            answers.append(pb.DecodeStepResult.FromString(answer))
        assert [a.code for a in answers] == [3, 3, 3, 0]  # INVALID_ARGUMENT x 3, then OK
        assert "keeps no forward state" in answers[0].message
        assert "neither a search nor a retrieve" in answers[1].message
        assert "not a valid DecodeStep" in answers[2].message
        connection.shutdown(socket.SHUT_WR)  # the client closes its side: the stream ends OK
        kind, status = recv_frame(connection)
        assert kind == STATUS and json.loads(status)["code"] == "OK"
        connection.close()
        assert len(client.get("mem", np.arange(ROWS)).ids) == before  # nothing stored changed
    assert len(frontend.router.forwards) == 0
    _wait_idle(frontend)


def test_tokens_are_checked_on_the_socket_as_on_grpc(served_with_tokens):
    frontend, address, _ = served_with_tokens
    with MemoryClient(address) as anonymous:  # no token: the probe is refused, so no socket either
        with pytest.raises(Unauthenticated), anonymous.decode() as stream:
            stream.search("mem", _queries(0), 1)
    connection = _raw(frontend)  # straight at the socket, without a token: refused before any step
    kind, status = recv_frame(connection)
    assert kind == STATUS and json.loads(status)["code"] == "UNAUTHENTICATED"
    assert _closed(connection)
    connection.close()
    connection = _raw(frontend, [("authorization", "Bearer wrong")])
    assert json.loads(recv_frame(connection)[1]) == {"code": "UNAUTHENTICATED", "message": "unknown token", "trailing": []}
    connection.close()
    with MemoryClient(address, token="other-secret") as other, other.decode() as stream:
        with pytest.raises(PermissionDenied, match="no read access"):
            stream.search("mem", _queries(0), 1)
        assert stream.transport == "socket"
        with pytest.raises(NotFound):  # the same stream goes on: a namespace its token may read
            stream.search("elsewhere", _queries(0), 1)
    with MemoryClient(address, token="reader-secret") as reader, reader.decode() as stream:
        np.testing.assert_array_equal(stream.search("mem", _queries(3), 4).ids, reader.search("mem", _queries(3), 4).ids)
        assert stream.transport == "socket"
    _wait_idle(frontend)


def test_the_stream_limit_counts_socket_streams_and_a_refused_client_sends_calls(served):
    frontend, address, _ = served
    limit, frontend.gate.max_streams = frontend.gate.max_streams, 1
    try:
        with MemoryClient(address) as client, client.decode() as first, client.decode() as second:
            first.search("mem", _queries(4), 3)  # holds the one stream the server takes now
            connection = _raw(frontend)  # refused at once, before any step
            kind, status = recv_frame(connection)
            assert kind == STATUS and json.loads(status)["code"] == "RESOURCE_EXHAUSTED"
            assert "decode streams are open" in json.loads(status)["message"]
            connection.close()
            from monim.model_client.host_socket import SocketStream
            from monim.protos.errors import ResourceExhausted

            late = client.decode()
            late._stream = late._open()  # refused at once: the server closes before this step is sent
            deadline = time.monotonic() + 10
            while frontend.host_socket.connections > 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)  # (counted out just before its close)
            assert isinstance(late._stream._stream, SocketStream)
            with pytest.raises(ResourceExhausted, match="decode streams are open"):  # its status, not a broken pipe
                late._stream.step(_step())
            late.close()
            expected = client.search("mem", _queries(5), 3)
            np.testing.assert_array_equal(second.search("mem", _queries(5), 3).ids, expected.ids)  # by calls
            assert second._unary and frontend.gate.streams == 1
    finally:
        frontend.gate.max_streams = limit
    _wait_idle(frontend)


def test_a_client_gone_mid_stream_leaves_nothing_behind(served):
    frontend, address, _ = served
    threads = threading.active_count()
    with MemoryClient(address) as client:
        for _ in range(5):
            stream = client.decode()
            stream.retrieve("mem", _queries(3), 5)
            send_frame(stream._stream._stream._socket, MESSAGE, _step().SerializeToString())  # sent, never read
            stream._stream._stream._socket.close()  # gone without closing the stream
        connection = _raw(frontend)
        send_frame(connection, MESSAGE, _step().SerializeToString()[:5])  # a frame cut short
        connection.close()
    _wait_idle(frontend)
    assert len(frontend.router.forwards) == 0
    deadline = time.monotonic() + 10
    while threading.active_count() > threads and time.monotonic() < deadline:
        time.sleep(0.02)
    assert threading.active_count() <= threads


def test_a_broken_peer_never_stops_the_listener(served):
    frontend, address, _ = served
    for payload in (b"", b"\x07\x00\x00\x00\x00", b"\x01\xff\xff\xff\xff"):  # nothing, a bad kind, a frame too large
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.connect(frontend.host_socket.path)
        connection.sendall(payload)
        connection.close()
    connection = _raw(frontend)
    send_frame(connection, HELLO, b"not the first frame twice")  # a second hello: the stream ends
    assert recv_frame(connection)[0] == STATUS
    connection.close()
    with MemoryClient(address) as client, client.decode() as stream:
        assert stream.search("mem", _queries(6), 2).ids.shape == (2, 2) and stream.transport == "socket"
    _wait_idle(frontend)


def test_a_draining_server_ends_its_socket_streams_and_removes_the_file(served):
    frontend, address, _ = served
    path = frontend.host_socket.path
    with MemoryClient(address, retries=0) as client, client.decode() as stream:
        stream.search("mem", _queries(7), 2)
        assert os.path.exists(path) and stat_mode(path) == 0o600
        frontend.stop(5).wait(30)
        with pytest.raises(Unavailable):
            stream.search("mem", _queries(7), 2)
    assert not os.path.exists(path)


def stat_mode(path: str) -> int:
    return os.stat(path).st_mode & 0o777


def test_a_client_that_cannot_reach_the_socket_streams_over_grpc(served):
    frontend, address, _ = served
    with MemoryClient(address) as client:
        client._store.host_socket(address)  # the probe: the socket's path learned
        client._store._host_sockets[address] = frontend.host_socket.path + ".gone"
        with client.decode() as stream:
            np.testing.assert_array_equal(stream.search("mem", _queries(8), 3).ids, client.search("mem", _queries(8), 3).ids)
            assert stream.transport == "grpc"
        assert client._store.host_socket(address) is None  # not tried again


def test_a_dead_servers_socket_file_is_removed_by_the_next_server(served):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    orphan = os.path.join(shared_memory.SHARED_MEMORY_DIR, f"monim-host-{pid}-0123456789abcdef.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(orphan)
    listener.close()
    runtime = LocalRuntime(1)
    frontend, _ = start_server(Router(runtime), port=0)
    try:
        assert not os.path.exists(orphan)
        assert os.path.exists(frontend.host_socket.path)
    finally:
        frontend.stop(0)
        runtime.shutdown()


# ----- calls on the socket -----------------------------------------------------------------------
def test_every_call_on_the_socket_answers_as_over_grpc(served):
    """The same calls through a client on the socket and one on gRPC, on twin namespaces: every answer
    equal, the socket used for each, and nothing of the gRPC one's calls on it."""
    frontend, address, _ = served
    rng = np.random.default_rng(4)
    keys = rng.standard_normal((500, DIM)).astype(np.float32)
    values = rng.standard_normal((500, VALUE_DIM)).astype(np.float32)
    with MemoryClient(address, timeout_s=30) as local, MemoryClient(address, shared_memory=False) as remote:
        answers = []
        for client, name in ((local, "twin-a"), (remote, "twin-b")):
            before = frontend.host_socket.calls
            client.create_namespace(name, dim=DIM, value_dim=VALUE_DIM, optimizer="adam", lr=0.01)
            ids = client.add(name, keys, np.arange(500) % 7, values=values, source="s")
            queries = keys[:64] + 0.01
            found = client.search(name, queries, 8, return_values=True)
            parts = client._store.search_parts(name, queries, 8)  # an answer in parts
            forward = client.retrieve(name, queries, 8, keep_state=True)
            grads = client.retrieve_backward(name, forward, np.ones((64, VALUE_DIM), np.float32))
            client.apply_gradients(name, ids[:10], np.ones((10, VALUE_DIM), np.float32))
            deleted = client.delete(name, ids=ids[400:])
            described = client.describe_namespace(name)
            rows = client.get(name, ids[:400], return_optimizer_state=True)
            answers.append((found, parts, forward, grads, deleted, described.rows, rows))
            served_here = frontend.host_socket.calls - before
            assert (served_here > 0) == (client is local), served_here
        (a, b) = answers
        for name in ("ids", "distances", "tokens", "values"):
            np.testing.assert_array_equal(getattr(a[0], name), getattr(b[0], name))
        np.testing.assert_array_equal(a[1].ids, b[1].ids)
        np.testing.assert_array_equal(a[2].memory, b[2].memory)
        for got, expected in zip(a[3], b[3]):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
        assert a[4] == b[4] == 100 and a[5] == b[5] == 400
        np.testing.assert_array_equal(a[6].values, b[6].values)
        np.testing.assert_array_equal(a[6].optimizer_state["exp_avg"], b[6].optimizer_state["exp_avg"])


def test_errors_on_the_socket_are_the_grpc_ones_and_change_nothing(served, monkeypatch):
    frontend, address, _ = served
    from monim.protos.errors import StepAnswerLost

    with MemoryClient(address, retries=0) as client:
        rows = client.describe_namespace("mem").rows
        calls = frontend.host_socket.calls
        with pytest.raises(NotFound, match="'nope' does not exist"):
            client.search("nope", _queries(0), 3)
        with pytest.raises(InvalidArgument, match="k must be"):
            client.search("mem", _queries(0), 0)
        with pytest.raises(InvalidArgument):
            client.add("mem", np.full((2, DIM), np.nan, np.float32), np.arange(2))
        with pytest.raises(NotFound, match="no entries with ids"):
            client.get("mem", np.array([10**9]))
        monkeypatch.setattr(frontend.router, "search", lambda *a, **k: (_ for _ in ()).throw(StepAnswerLost("s1", 0)))
        with pytest.raises(StepAnswerLost):  # its class travels as the status's trailing reason
            client.search("mem", _queries(0), 3)
        monkeypatch.undo()
        assert frontend.host_socket.calls >= calls + 5
        assert client.describe_namespace("mem").rows == rows
        np.testing.assert_array_equal(client.search("mem", _queries(1), 3).ids,
                                      client.search("mem", _queries(1), 3).ids)  # the connection serves on


def test_a_call_past_its_deadline_raises_and_the_next_call_is_answered(served, monkeypatch):
    frontend, address, _ = served
    from monim.protos.errors import DeadlineExceeded

    real = frontend.router.search
    held = threading.Event()

    def slow(*args, **kwargs):
        held.wait(10)
        return real(*args, **kwargs)

    with MemoryClient(address, timeout_s=0.5, retries=0, read_endpoints=False) as client:
        client.describe_namespace("mem")
        monkeypatch.setattr("monim.model_client.host_socket._DEADLINE_MARGIN_S", 0.2)
        monkeypatch.setattr(frontend.router, "search", slow)
        with pytest.raises(DeadlineExceeded):
            client.search("mem", _queries(2), 3)
        held.set()
        monkeypatch.setattr(frontend.router, "search", real)
        assert client.search("mem", _queries(2), 3).ids.shape == (2, 3)


def test_a_connection_the_server_closed_is_not_used_again(served):
    frontend, address, _ = served
    with MemoryClient(address, retries=0) as client:
        expected = client.search("mem", _queries(3), 4).ids  # a calls connection, kept idle after
        with frontend.host_socket._lock:
            open_now = list(frontend.host_socket._connections)
        for connection in open_now:  # as a server that went away and came back closes them
            connection.shutdown(socket.SHUT_RDWR)
        np.testing.assert_array_equal(client.search("mem", _queries(3), 4).ids, expected)


def test_raw_calls_the_socket_refuses(served):
    frontend, address, _ = served
    from monim.protos.socket_frames import CALL, CALLS, call_payload

    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.settimeout(30)
    connection.connect(frontend.host_socket.path)
    send_frame(connection, CALLS, b"")
    for method, body, code in (("NoSuchMethod", b"", "UNIMPLEMENTED"), ("Reshard", b"", "UNIMPLEMENTED"),
                               ("Decode", b"", "UNIMPLEMENTED"), ("Search", b"\xff\xff\xff", "INVALID_ARGUMENT")):
        send_frame(connection, CALL, call_payload({"method": method, "metadata": [], "timeout": 5}, body))
        kind, status = recv_frame(connection)
        assert kind == STATUS and json.loads(status)["code"] == code, (method, status)
    send_frame(connection, CALL, b"\x03\x00\x00\x00{x}")  # a header that is no JSON: the connection ends
    assert _closed(connection)
    connection.close()
    with MemoryClient(address) as client:
        assert client.search("mem", _queries(4), 2).ids.shape == (2, 2)


def test_calls_from_threads_at_once_share_a_few_connections(served):
    frontend, address, _ = served
    with MemoryClient(address) as client:
        expected = {seed: client.search("mem", _queries(seed), 5).ids for seed in range(24)}

        def work(worker: int) -> None:
            for seed in range(worker, 24, 4):
                for _ in range(5):
                    np.testing.assert_array_equal(client.search("mem", _queries(seed), 5).ids, expected[seed])

        assert not _failures_in_threads(work, 4)
        calls = client._store._socket_calls[frontend.host_socket.path]
        assert 1 <= len(calls._free) <= 4 and not calls._busy
    _wait_idle(frontend)


def test_the_message_limit_holds_on_the_socket_as_on_grpc():
    """A server's max_message_bytes: a larger request is RESOURCE_EXHAUSTED and changes nothing, and so
    is an answer larger than the server's or the client's limit (the client then asks in parts)."""
    from monim.protos.errors import ResourceExhausted
    from monim.protos.socket_frames import CALL, CALLS, call_payload

    runtime = LocalRuntime(1)
    frontend, port = start_server(Router(runtime), port=0, max_message_bytes=1 << 16)
    address = f"127.0.0.1:{port}"
    try:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.settimeout(30)
        connection.connect(frontend.host_socket.path)
        send_frame(connection, CALLS, b"")
        send_frame(connection, CALL, call_payload({"method": "ListNamespaces", "metadata": [], "timeout": 5},
                                                  b"\x00" * (1 << 17)))
        status = json.loads(recv_frame(connection)[1])
        assert status["code"] == "RESOURCE_EXHAUSTED" and "larger than max (131072 vs. 65536)" in status["message"]
        connection.close()
        with MemoryClient(address, max_message_bytes=1 << 16, retries=0) as client:
            client.create_namespace("wide", dim=DIM, value_dim=1024)
            # 50 rows of 4 KiB values at once: past the limit, below a tensor that goes through shared memory
            with pytest.raises(ResourceExhausted, match="larger than max"):
                client._store.add("wide", np.zeros((50, DIM), np.float32), np.arange(50),
                                  values=np.zeros((50, 1024), np.float32))
            assert client.describe_namespace("wide").rows == 0
            ids = client.add("wide", np.zeros((100, DIM), np.float32), np.arange(100),
                             values=np.ones((100, 1024), np.float32))  # the client's own split: in parts
            assert client.get("wide", ids).values.sum() == 100 * 1024  # an answer past the limit: asked in parts
            assert frontend.host_socket.calls > 0
    finally:
        frontend.stop(0)
        runtime.shutdown()


def test_a_connection_past_the_servers_most_is_turned_away_and_its_client_goes_over_grpc(served):
    """max_connections: the next connection is answered RESOURCE_EXHAUSTED (with the refusal's key)
    before anything is read, and closed; a client's call and decode stream that meet it go over gRPC,
    answer as before, store nothing twice, and the client uses the socket again once there is room."""
    from monim.protos.socket_frames import REFUSED_KEY

    frontend, address, _ = served
    host_socket = frontend.host_socket
    _wait_idle(frontend)  # the fixture's client's connections are gone
    host_socket.max_connections = 1
    holder = _raw(frontend)  # a decode stream that holds the one connection served
    deadline = time.monotonic() + 10
    while frontend.gate.streams < 1 and time.monotonic() < deadline:  # its hello read: it is served
        time.sleep(0.01)
    assert host_socket.connections == 1 and host_socket.refused == 0
    turned_away = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    turned_away.settimeout(30)
    turned_away.connect(host_socket.path)
    kind, payload = recv_frame(turned_away)  # sent before the client said anything
    status = json.loads(payload)
    assert kind == STATUS and status["code"] == "RESOURCE_EXHAUSTED" and [REFUSED_KEY, "1"] in status["trailing"]
    assert "at most 1 connections" in status["message"] and recv_frame(turned_away) is None
    turned_away.close()
    with MemoryClient(address) as client:
        rows = len(client.get("mem", np.arange(ROWS)).ids)  # over gRPC: the socket is full
        expected = client._store._framed(address, "Search", serialized=False)(
            pb.SearchRequest(namespace="mem", k=4, queries=convert.tensor_to_proto(_queries(3))), timeout=30).ids
        calls_before, refused_before = host_socket.calls, host_socket.refused
        found = client.search("mem", _queries(3), 4)
        np.testing.assert_array_equal(found.ids, convert.tensor_from_proto(expected, "ids"))
        assert host_socket.calls == calls_before and host_socket.refused > refused_before
        ids = client.add("mem", _queries(4, batch=3), np.arange(3))  # a write too: stored once
        assert len(client.get("mem", np.arange(ROWS + 3)).ids) == rows + 3 and len(ids) == 3
        with client.decode() as stream:
            np.testing.assert_array_equal(stream.search("mem", _queries(3), 4).ids, found.ids)
            assert stream.transport == "grpc"
        assert client._store.host_socket(address) == host_socket.path  # not forgotten
        holder.close()
        deadline = time.monotonic() + 10
        while host_socket._connections and time.monotonic() < deadline:
            time.sleep(0.01)
        client.search("mem", _queries(3), 4)
        assert host_socket.calls == calls_before + 1  # room again: the socket serves the client
        host_socket.max_connections = 2  # the client's idle calls connection, and a stream
        with client.decode() as stream:
            stream.search("mem", _queries(3), 4)
            assert stream.transport == "socket"
        client.delete("mem", ids)
    from monim.workers.metrics import HostSocketCollector

    exported = {family.name: family.samples[0].value for family in HostSocketCollector(lambda: host_socket).collect()}
    assert exported["monim_host_socket_refused"] == host_socket.refused >= 2  # a call and a stream at least
    assert exported["monim_host_socket_calls"] == host_socket.calls
    _wait_idle(frontend)


def test_a_large_frame_is_a_read_only_view_of_the_received_bytes_and_a_small_one_is_bytes():
    from monim.protos import socket_frames

    left, right = socket.socketpair()
    with left, right:
        large = bytes(range(256)) * 1024  # 256 KiB: past the size sent in one write
        sender = threading.Thread(target=lambda: (send_frame(left, MESSAGE, large), send_frame(left, STATUS, b"{}")))
        sender.start()
        kind, payload = recv_frame(right)
        assert kind == MESSAGE and isinstance(payload, memoryview) and payload.readonly and payload == large
        kind, payload = recv_frame(right)
        sender.join()
        assert kind == STATUS and isinstance(payload, bytes) and payload == b"{}"
        assert len(large) >= socket_frames._JOINED_BELOW > 2


def test_a_frame_of_several_buffers_arrives_as_their_bytes_in_order_whatever_the_socket_takes_at_once():
    """send_frame of a list (a call's header and its request, not joined): gathered writes that the
    socket takes in pieces (8 MiB against its buffer of a few hundred KiB), read as one payload."""
    from monim.protos.socket_frames import CALL, call_payload, split_call

    rng = np.random.default_rng(5)
    pieces = [b"h" * 9, memoryview(rng.integers(0, 255, 8 << 20, dtype=np.uint8)), b"", bytes(range(200)),
              memoryview(np.arange(1000, dtype=np.float32))]  # a view whose items are 4 bytes
    left, right = socket.socketpair()
    with left, right:
        def send():
            send_frame(left, MESSAGE, pieces)
            send_frame(left, MESSAGE, [b"ab", b"c"])
            send_frame(left, CALL, call_payload({"method": "Search"}, b"\x01" * 70_000))

        sender = threading.Thread(target=send)
        sender.start()
        kind, payload = recv_frame(right)
        assert kind == MESSAGE and bytes(payload) == b"".join(bytes(piece) for piece in pieces)
        assert recv_frame(right) == (MESSAGE, b"abc")
        kind, payload = recv_frame(right)
        sender.join()
        header, request = split_call(payload)
        assert kind == CALL and header == {"method": "Search"} and bytes(request) == b"\x01" * 70_000


def test_a_spin_returns_as_soon_as_bytes_come_and_leaves_the_sockets_timeout_as_it_was():
    from monim.protos.socket_frames import spin_until_readable

    left, right = socket.socketpair()
    left.settimeout(7.0)
    try:
        started = time.perf_counter()
        assert spin_until_readable(left, 0.01)  # nothing came: the spin ends, a blocking read follows
        assert 0.01 <= time.perf_counter() - started < 5 and left.gettimeout() == 7.0
        sender = threading.Timer(0.05, send_frame, (right, MESSAGE, b"answer"))
        sender.start()
        started = time.perf_counter()
        assert spin_until_readable(left, 10.0)  # the frame ended the spin long before its 10 s
        assert time.perf_counter() - started < 5 and left.gettimeout() == 7.0
        assert recv_frame(left) == (MESSAGE, b"answer")  # nothing of it taken by the spin
        right.close()
        assert not spin_until_readable(left, 10.0)  # closed with nothing left to read
        assert left.gettimeout() == 7.0
        sender.join()
    finally:
        left.close()
        right.close()


@pytest.mark.parametrize(("value", "cpus", "expected"), [(None, 16, 0.005), (None, 2, 0.0), ("0", 16, 0.0),
                                                          ("500", 2, 0.0005), ("-3", 16, 0.0), ("soon", 16, 0.0)])
def test_the_spin_is_set_by_the_environment_else_by_the_hosts_cpus(monkeypatch, caplog, value, cpus, expected):
    from monim.model_client import host_socket

    if value is None:
        monkeypatch.delenv(host_socket.SPIN_ENV, raising=False)
    else:
        monkeypatch.setenv(host_socket.SPIN_ENV, value)
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    assert host_socket._spin_s() == pytest.approx(expected)
    assert ("not a number" in caplog.text) == (value == "soon")


def test_spinning_calls_and_decode_steps_from_threads_at_once_answer_as_sleeping_ones(served, monkeypatch):
    """With the spin on (one thread of the process spins at a time, the others sleep at once): calls and
    decode steps from four threads answer as they do without it, on the socket."""
    frontend, address, _ = served
    from monim.model_client import host_socket

    with MemoryClient(address) as client:
        monkeypatch.setattr(host_socket, "SPIN_S", 0.0)
        expected = {seed: client.search("mem", _queries(seed), 5).ids for seed in range(8)}
        monkeypatch.setattr(host_socket, "SPIN_S", 0.002)
        spins = []
        real = host_socket.spin_until_readable
        monkeypatch.setattr(host_socket, "spin_until_readable",
                            lambda connection, spin_s: spins.append(spin_s) or real(connection, spin_s))
        before = frontend.host_socket.calls

        def work(worker: int) -> None:
            for seed in range(worker, 8, 4):
                for _ in range(10):
                    np.testing.assert_array_equal(client.search("mem", _queries(seed), 5).ids, expected[seed])
            with client.decode() as stream:
                for seed in range(worker, 8, 4):
                    np.testing.assert_array_equal(stream.search("mem", _queries(seed), 5).ids, expected[seed])
                assert stream.transport == "socket"

        assert not _failures_in_threads(work, 4)
        assert frontend.host_socket.calls - before >= 80  # on the socket
        assert spins and set(spins) == {0.002}
    _wait_idle(frontend)


def test_answers_that_come_later_than_the_spin_are_waited_for_asleep(monkeypatch):
    """A method whose answers lately took longer than SPIN_S is not spun for; one whose answers come
    within it is; the mean follows the answers as they change."""
    from monim.model_client import host_socket

    monkeypatch.setattr(host_socket, "SPIN_S", 0.002)
    left, right = socket.socketpair()
    spins = []
    real = host_socket.spin_until_readable
    monkeypatch.setattr(host_socket, "spin_until_readable",
                        lambda connection, spin_s: spins.append(spin_s) or real(connection, spin_s))
    wait = host_socket.AnswerWait()
    try:
        for delay, spun in ((0.0, True), (0.03, True), (0.03, False), (0.03, False), (0.0, False)):
            threading.Timer(delay, send_frame, (right, MESSAGE, b"answer")).start()
            before = len(spins)
            assert host_socket._answer_frame(left, wait) == (MESSAGE, b"answer")
            assert (len(spins) > before) == spun, (delay, wait.seconds)
        for _ in range(20):  # quick answers again: the mean comes down and the spin back
            send_frame(right, MESSAGE, b"answer")
            host_socket._answer_frame(left, wait)
        assert wait.spin_s() == 0.002
    finally:
        left.close()
        right.close()
