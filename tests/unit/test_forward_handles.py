"""Forward handles: a Retrieve with keep_state leaves its state at the front end, and the
RetrieveBackward that names the handle sends only grad_memory. Same step as sending the arrays;
unknown, expired, evicted and foreign handles are FAILED_PRECONDITION (nothing stepped) and the
client falls back to the arrays; a bounded table; two clients stepping at once. A real gRPC server
in this process (no Ray)."""

import contextlib
import threading
import time

import grpc
import numpy as np
import pytest
from monim.model_client import MemoryClient
from monim.protos import convert
from monim.protos import memory_pb2 as pb
from monim.protos import memory_pb2_grpc as pb_grpc
from monim.workers.forwards import ForwardStates, HandleUnknown
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime
from monim.workers.server import start_server

DIM, VALUE_DIM, ROWS, K = 8, 16, 400, 10
SMALL = 64 * 1024


@contextlib.contextmanager
def served(shards: int = 2):
    """(router, client, split, address): a router over in-process shards behind two gRPC servers, a
    client of each (split's limit is SMALL: it splits large calls), the first one's address."""
    runtime = LocalRuntime(shards)
    router = Router(runtime)
    server, port = start_server(router, port=0)
    small, small_port = start_server(router, port=0, max_message_bytes=SMALL)
    try:
        with MemoryClient(f"127.0.0.1:{port}") as client, \
                MemoryClient(f"127.0.0.1:{small_port}", max_message_bytes=SMALL) as split:
            yield router, client, split, f"127.0.0.1:{port}"
    finally:
        server.stop(0)
        small.stop(0)
        runtime.shutdown()


@pytest.fixture
def service():
    with served() as deployment:
        yield deployment


def twin_namespaces(client, names=("a", "b"), optimizer="sgd"):
    rng = np.random.default_rng(5)
    keys = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    values = rng.standard_normal((ROWS, VALUE_DIM)).astype(np.float32)
    for name in names:
        client.create_namespace(name, dim=DIM, value_dim=VALUE_DIM, optimizer=optimizer, lr=0.1)
        client.add(name, keys, np.arange(ROWS), values=values)


def spy(client, calls):
    real = client._store.retrieve_backward

    def recorded(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    client._store.retrieve_backward = recorded


def test_a_backward_with_the_handle_sends_only_grad_memory_and_steps_the_same(service):
    router, client, _, _ = service
    twin_namespaces(client, optimizer="adam")
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((32, DIM)).astype(np.float32)
    grad = rng.standard_normal((32, VALUE_DIM)).astype(np.float32)
    kept = client.retrieve("a", queries, K, 0.7, keep_state=True)
    plain = client.retrieve("b", queries, K, 0.7)
    assert kept.handle and not plain.handle and len(router.forwards) == 1
    calls = []
    spy(client, calls)
    got = client.retrieve_backward("a", kept, grad)
    assert calls[0][0][1:5] == (None, None, None, None) and calls[0][1]["handle"] == kept.handle
    want = client.retrieve_backward("b", plain, grad)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
    assert got[1] == pytest.approx(want[1], rel=1e-6, abs=1e-7)
    np.testing.assert_array_equal(client.get("a", np.arange(ROWS)).values, client.get("b", np.arange(ROWS)).values)


def test_an_unknown_handle_is_failed_precondition_and_steps_nothing(service):
    _, client, _, address = service
    twin_namespaces(client, names=("a",))
    before = client.get("a", np.arange(ROWS)).values
    grad = np.ones((2, VALUE_DIM), np.float32)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.MemoryServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.RetrieveBackward(pb.RetrieveBackwardRequest(namespace="a", handle="feedbeef",
                                                             grad_memory=convert.tensor_to_proto(grad)))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "retrieve handle 'feedbeef' is unknown" in raised.value.details()
    np.testing.assert_array_equal(client.get("a", np.arange(ROWS)).values, before)


def test_a_handle_with_the_arrays_too_or_rows_outside_the_batch_is_invalid(service):
    router, client, _, _ = service
    twin_namespaces(client, names=("a",))
    queries = np.random.default_rng(2).standard_normal((4, DIM)).astype(np.float32)
    kept = client.retrieve("a", queries, K, 1.0, keep_state=True)
    from monim.protos.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="sends only grad_memory"):
        router.retrieve_backward("a", queries, None, None, None, np.ones((4, VALUE_DIM), np.float32), 1.0,
                                 handle=kept.handle)
    with pytest.raises(InvalidArgument, match=r"rows \[2, 6\) are not rows of the forward's batch of 4"):
        router.retrieve_backward("a", None, None, None, None, np.ones((4, VALUE_DIM), np.float32), 1.0,
                                 handle=kept.handle, row_offset=2)


@pytest.mark.parametrize("bad, message", [
    (np.full((4, VALUE_DIM), np.nan, np.float32), "grad_memory"),
    (np.ones((4, VALUE_DIM + 1), np.float32), "value_dim"),
    (np.ones((4, VALUE_DIM), np.int64), "grad_memory"),
])
def test_a_handle_with_a_bad_grad_memory_is_invalid_and_steps_nothing(service, bad, message):
    """The kept forward is the router's own (checked when it was made); grad_memory is what the
    backward brings, and it is checked as in a backward that sends every array."""
    router, client, _, _ = service
    twin_namespaces(client, names=("a",))
    before = client.get("a", np.arange(ROWS)).values
    queries = np.random.default_rng(2).standard_normal((4, DIM)).astype(np.float32)
    kept = client.retrieve("a", queries, K, 1.0, keep_state=True)
    from monim.protos.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match=message):
        router.retrieve_backward("a", None, None, None, None, bad, 1.0, handle=kept.handle)
    np.testing.assert_array_equal(client.get("a", np.arange(ROWS)).values, before)
    router.retrieve_backward("a", None, None, None, None, np.ones((4, VALUE_DIM), np.float32), 1.0,
                             handle=kept.handle)  # the handle is still good
    assert not np.array_equal(client.get("a", np.arange(ROWS)).values, before)


def test_an_expired_or_foreign_handle_makes_the_client_send_the_arrays(service):
    router, client, _, _ = service
    twin_namespaces(client)
    rng = np.random.default_rng(3)
    queries = rng.standard_normal((8, DIM)).astype(np.float32)
    grad = rng.standard_normal((8, VALUE_DIM)).astype(np.float32)
    kept = client.retrieve("a", queries, K, 1.0, keep_state=True)
    plain = client.retrieve("b", queries, K, 1.0)
    router.forwards.ttl_s = 0.0
    time.sleep(0.01)
    calls = []
    spy(client, calls)
    got = client.retrieve_backward("a", kept, grad)
    assert [kwargs.get("handle", "") for _, kwargs in calls] == [kept.handle, ""]  # tried, then the arrays
    want = client.retrieve_backward("b", plain, grad)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(client.get("a", np.arange(ROWS)).values, client.get("b", np.arange(ROWS)).values)
    router.forwards.ttl_s = 300.0
    kept_b = client.retrieve("b", queries, K, 1.0, keep_state=True)
    with pytest.raises(HandleUnknown, match="another namespace"):
        router.forwards.get(kept_b.handle, "a")


def test_a_backward_with_a_handle_splits_by_rows_and_is_one_step(service):
    _, client, split, _ = service
    twin_namespaces(client, optimizer="adam")
    rng = np.random.default_rng(4)
    queries = rng.standard_normal((600, DIM)).astype(np.float32)
    grad = rng.standard_normal((600, VALUE_DIM)).astype(np.float32)
    assert grad.nbytes > SMALL // 2
    kept = client.retrieve("a", queries, K, 1.0, keep_state=True)  # through the large server: one handle
    calls = []
    spy(split, calls)
    got = split.retrieve_backward("a", kept, grad)
    assert len(calls) > 1 and all(kwargs["handle"] == kept.handle and kwargs["defer_step"] for _, kwargs in calls)
    assert [kwargs["row_offset"] for _, kwargs in calls] == sorted({kwargs["row_offset"] for _, kwargs in calls})
    want = client.retrieve_backward("b", client.retrieve("b", queries, K, 1.0), grad)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    a = client.get("a", np.arange(ROWS), return_optimizer_state=True)
    b = client.get("b", np.arange(ROWS), return_optimizer_state=True)
    np.testing.assert_allclose(a.values, b.values, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(a.optimizer_state["step"], b.optimizer_state["step"])  # one step, not one per part


def test_two_clients_stepping_with_their_handles_at_once(service):
    _, client, _, address = service
    twin_namespaces(client)  # sgd: the updates of different steps add up in any order
    rng = np.random.default_rng(6)
    batches = [(rng.standard_normal((16, DIM)).astype(np.float32), rng.standard_normal((16, VALUE_DIM)).astype(
        np.float32)) for _ in range(20)]
    with MemoryClient(address) as second:
        forwards = [(c, c.retrieve("a", q, K, 1.0, keep_state=True), g)
                    for i, (q, g) in enumerate(batches) for c in [(client, second)[i % 2]]]
        plain = [(client.retrieve("b", q, K, 1.0), g) for q, g in batches]
        errors = []

        def run(mine):
            try:
                for c, result, grad in mine:
                    c.retrieve_backward("a", result, grad)
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(error)

        threads = [threading.Thread(target=run, args=(forwards[i::2],)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
    for result, grad in plain:
        client.retrieve_backward("b", result, grad)
    np.testing.assert_allclose(client.get("a", np.arange(ROWS)).values, client.get("b", np.arange(ROWS)).values,
                               rtol=1e-5, atol=1e-6)


def test_the_table_is_bounded_and_counts_what_it_drops():
    table = ForwardStates(ttl_s=60, max_entries=2, max_bytes=10_000)
    arrays = [np.zeros((4, 8), np.float32), np.zeros((4, 5), np.int64), np.zeros((4, 5), np.float32),
              np.zeros((4, 5), np.float32)]
    first, second, third = (table.keep("ns", 1, *arrays, 1.0) for _ in range(3))
    assert len(table) == 2 and table.counts["evicted"] == 1 and table.bytes == 2 * 448
    with pytest.raises(HandleUnknown, match="evicted"):
        table.get(first, "ns")
    assert table.get(third, "ns").temperature == 1.0 and table.get(second, "ns")
    assert table.keep("ns", 1, np.zeros((400, 8), np.float32), *arrays[1:], 1.0) == ""  # alone over max_bytes
    table.ttl_s = 0.0
    time.sleep(0.01)
    with pytest.raises(HandleUnknown, match="expired"):
        table.get(second, "ns")
    assert len(table) == 0 and table.bytes == 0 and table.counts["expired"] == 2


def test_a_released_state_keeps_its_answer_for_its_step_and_namespace_only_and_a_bounded_few():
    from monim.workers import forwards

    table = ForwardStates(ttl_s=60)
    arrays = [np.zeros((4, 8), np.float32), np.zeros((4, 5), np.int64), np.zeros((4, 5), np.float32),
              np.zeros((4, 5), np.float32)]
    handles = [table.keep("ns", 1, *arrays, 1.0) for _ in range(forwards.ANSWERS_KEPT + 1)]
    assert table.batch_of(handles[0]) == 4 and table.batch_of("nope") == 0
    for i, handle in enumerate(handles):
        table.release(handle, f"step-{i}", (np.full((4, 8), i, np.float32), float(i)))
    assert len(table) == 0 and table.bytes == 0
    with pytest.raises(HandleUnknown, match=r"released \(its backward was done\)"):
        table.get(handles[1], "ns")
    last = table.answered(handles[-1], f"step-{len(handles) - 1}", "ns")
    assert last[1] == len(handles) - 1 and last[0][0, 0] == len(handles) - 1
    assert table.answered(handles[-1], "another-step", "ns") is None
    assert table.answered(handles[-1], f"step-{len(handles) - 1}", "other-ns") is None
    assert table.answered(handles[-1], "", "ns") is None
    assert table.answered(handles[0], "step-0", "ns") is None  # the oldest went: ANSWERS_KEPT are kept
    assert table.answered(handles[1], "step-1", "ns") is not None
    table.release(handles[1], "step-1", (np.zeros(4), 0.0))  # gone already: nothing changes
    assert table.answered(handles[1], "step-1", "ns")[1] == 1.0


def test_the_metrics_endpoint_reports_the_table():
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    runtime = LocalRuntime(1)
    router = Router(runtime)
    server, port = start_server(router, port=0, metrics_port=0)
    try:
        with MemoryClient(f"127.0.0.1:{port}") as client:
            twin_namespaces(client, names=("a",))
            queries = np.random.default_rng(8).standard_normal((4, DIM)).astype(np.float32)
            kept = [client.retrieve("a", queries, K, 1.0, keep_state=True) for _ in range(3)]
            router.forwards.max_entries = 2
            client.retrieve("a", queries, K, 1.0, keep_state=True)  # evicts the oldest two
            with pytest.raises(HandleUnknown):
                router.forwards.get(kept[0].handle, "a")
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=30) as answer:
            text = answer.read().decode()
        samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                   for family in text_string_to_metric_families(text) for sample in family.samples}
        assert samples[("monim_forward_states", ())] == 2
        assert samples[("monim_forward_state_bytes", ())] == router.forwards.bytes > 0
        assert samples[("monim_forward_states_dropped_total", (("why", "evicted"),))] == 2
        assert samples[("monim_forward_states_dropped_total", (("why", "missed"),))] == 1
    finally:
        server.stop(0)
        runtime.shutdown()
