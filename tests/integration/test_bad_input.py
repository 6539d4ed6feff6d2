"""Every bad input gets its status code and a message naming the problem, and changes nothing.

Each case runs against the gRPC service and the in-process store (the same
exception type and message from both); afterwards the stored rows, the id
counter and a search answer are exactly as before, and the service still serves.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from monim.model_client import MemoryClient
from monim.model_client.errors import AlreadyExists, InvalidArgument, NotFound
from monim.protos import convert
from monim.protos import memory_pb2 as pb
from monim.protos import memory_pb2_grpc as pb_grpc

DIM, VALUE_DIM, ROWS = 8, 3, 50
QUERIES = np.random.default_rng(3).standard_normal((4, DIM)).astype(np.float32)


@pytest.fixture(params=["remote", "in-process"])
def client(request):
    if request.param == "remote":
        return request.getfixturevalue("remote_client")
    return MemoryClient(":memory:")


@pytest.fixture
def populated(client, namespace_name):
    rng = np.random.default_rng(11)
    client.create_namespace(namespace_name, dim=DIM, value_dim=VALUE_DIM, max_k=16)
    client.add(namespace_name, rng.standard_normal((ROWS, DIM)).astype(np.float32), np.arange(ROWS),
               values=rng.standard_normal((ROWS, VALUE_DIM)).astype(np.float32), source="seed")
    yield namespace_name
    client.drop_namespace(namespace_name)


def snapshot(client, namespace):
    description = client.describe_namespace(namespace)
    rows = client.get(namespace, np.arange(ROWS))
    result = client.search(namespace, QUERIES, k=16, return_values=True)
    return (description.rows, description.next_id, rows.keys.tobytes(), rows.values.tobytes(),
            rows.weights.tobytes(), rows.tokens.tobytes(), tuple(rows.sources), result.ids.tobytes(),
            result.values.tobytes())


def expect_rejected(client, namespace, error_type, status, fragment, call):
    before = snapshot(client, namespace)
    with pytest.raises(error_type) as caught:
        call()
    assert fragment in caught.value.message, caught.value.message
    if client.remote:
        assert caught.value.status_code == status
    assert snapshot(client, namespace) == before


ones = np.ones((2, DIM), np.float32)
BAD_CALLS = {
    "key width": (lambda c, ns: c.add(ns, np.ones((2, 5), np.float32), np.arange(2)),
                  "keys have width 5 but the namespace's dim is 8"),
    "query width": (lambda c, ns: c.search(ns, np.ones((2, 9), np.float32), k=3),
                    "queries have width 9 but the namespace's dim is 8"),
    "key dtype": (lambda c, ns: c.add(ns, np.ones((2, DIM), np.int32), np.arange(2)),
                  "keys have dtype int32; expected float32 or float16"),
    "query dtype": (lambda c, ns: c.search(ns, np.ones((2, DIM), np.int64), k=3), "queries have dtype int64"),
    "token dtype": (lambda c, ns: c.add(ns, ones, np.ones(2, np.float32)), "tokens have dtype float32"),
    "lengths": (lambda c, ns: c.add(ns, ones, np.arange(3)), "keys and tokens have different lengths: 2 keys, 3 tokens"),
    "empty add": (lambda c, ns: c.add(ns, np.ones((0, DIM), np.float32), np.arange(0)), "keys is an empty batch"),
    "empty search": (lambda c, ns: c.search(ns, np.ones((0, DIM), np.float32), k=3), "queries is an empty batch"),
    "nan key": (lambda c, ns: c.add(ns, np.array([[0.0] * DIM, [np.nan] * DIM], np.float32), np.arange(2)),
                "keys contain NaN or Inf (first at row 1)"),
    "inf key": (lambda c, ns: c.add(ns, np.full((2, DIM), np.inf, np.float32), np.arange(2)), "NaN or Inf"),
    "nan query": (lambda c, ns: c.search(ns, np.full((1, DIM), np.nan, np.float32), k=3),
                  "queries contain NaN or Inf"),
    "k zero": (lambda c, ns: c.search(ns, ones, k=0), "k must be in [1, 16] (the namespace's max_k), got 0"),
    "k negative": (lambda c, ns: c.search(ns, ones, k=-4), "got -4"),
    "k above max_k": (lambda c, ns: c.search(ns, ones, k=17), "got 17"),
    "value width": (lambda c, ns: c.add(ns, ones, np.arange(2), values=np.ones((2, 4), np.float32)),
                    "values have width 4 but the namespace's value_dim is 3"),
    "nan value": (lambda c, ns: c.add(ns, ones, np.arange(2), values=np.full((2, 3), np.nan, np.float32)),
                  "values contain NaN or Inf"),
    "bad weight": (lambda c, ns: c.add(ns, ones, np.arange(2), weights=np.array([1.0, -1.0], np.float32)),
                   "weights must be finite and > 0"),
    "negative token": (lambda c, ns: c.add(ns, ones, np.array([1, -5])), "tokens must lie in [0, 2^31)"),
    "bad name in search": (lambda c, ns: c.search("a/b", ones, k=1), "contains a path separator"),
    "delete with nothing": (lambda c, ns: c.delete(ns), "delete needs either ids or a source tag"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_invalid_argument(client, populated, case):
    call, fragment = BAD_CALLS[case]
    expect_rejected(client, populated, InvalidArgument, "INVALID_ARGUMENT", fragment, lambda: call(client, populated))


def test_unknown_namespace_is_not_found(client, populated):
    for call in (lambda: client.search("no-such-ns", ones, k=1), lambda: client.add("no-such-ns", ones, np.arange(2)),
                 lambda: client.get("no-such-ns", np.arange(2)), lambda: client.describe_namespace("no-such-ns"),
                 lambda: client.drop_namespace("no-such-ns"), lambda: client.delete("no-such-ns", ids=np.arange(1))):
        expect_rejected(client, populated, NotFound, "NOT_FOUND", "namespace 'no-such-ns' does not exist", call)


def test_unknown_ids_on_get_are_not_found_and_named(client, populated):
    expect_rejected(client, populated, NotFound, "NOT_FOUND", "has no entries with ids [50, 977]",
                    lambda: client.get(populated, np.array([3, 977, 50])))


def test_creating_an_existing_namespace(client, populated):
    expect_rejected(client, populated, AlreadyExists, "ALREADY_EXISTS", f"namespace {populated!r} already exists",
                    lambda: client.create_namespace(populated, dim=4))


def _stub(address):
    return pb_grpc.MemoryServiceStub(grpc.insecure_channel(address))


@pytest.mark.parametrize("name, fragment", [("", "namespace name is empty"), ("a/b", "path separator"),
                                            ("n" * 129, "129 characters; at most 128")])
def test_bad_namespace_names_on_the_wire(server_address, remote_client, name, fragment):
    before = [c.name for c in remote_client.list_namespaces()]
    with pytest.raises(grpc.RpcError) as caught:
        _stub(server_address).CreateNamespace(pb.CreateNamespaceRequest(config=pb.NamespaceConfig(name=name, dim=4)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fragment in caught.value.details()
    assert [c.name for c in remote_client.list_namespaces()] == before


def test_unknown_option_on_the_wire(server_address, remote_client):
    with pytest.raises(grpc.RpcError) as caught:
        _stub(server_address).CreateNamespace(
            pb.CreateNamespaceRequest(config=pb.NamespaceConfig(name="x-metric", dim=4, metric="cosine")))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown metric 'cosine'" in caught.value.details()
    assert "x-metric" not in [c.name for c in remote_client.list_namespaces()]


WIRE_CASES = {
    "bytes do not match shape": (
        lambda ns: pb.AddRequest(namespace=ns, keys=pb.Tensor(dtype="float32", shape=[2, DIM], data=b"\0" * 60),
                                 tokens=convert.tensor_to_proto(np.arange(2))),
        "keys carries 60 bytes but shape [2, 8] of float32 needs 64"),
    "unknown dtype": (
        lambda ns: pb.AddRequest(namespace=ns, keys=pb.Tensor(dtype="float64", shape=[1, DIM], data=b"\0" * 64),
                                 tokens=convert.tensor_to_proto(np.arange(1))),
        "keys has unknown dtype 'float64'"),
    "missing tokens": (
        lambda ns: pb.AddRequest(namespace=ns, keys=convert.tensor_to_proto(np.ones((1, DIM), np.float32))),
        "tokens is missing from the request"),
    "keys of 3 dimensions": (
        lambda ns: pb.AddRequest(namespace=ns, keys=convert.tensor_to_proto(np.ones((1, 2, DIM), np.float32)),
                                 tokens=convert.tensor_to_proto(np.arange(1))),
        "keys must be 2-D"),
}


@pytest.mark.parametrize("case", list(WIRE_CASES))
def test_malformed_tensors_on_the_wire(server_address, remote_client, case):
    build, fragment = WIRE_CASES[case]
    namespace = f"wire-{abs(hash(case)) % 10**8}"
    remote_client.create_namespace(namespace, dim=DIM)
    try:
        remote_client.add(namespace, np.ones((3, DIM), np.float32), np.arange(3))
        with pytest.raises(grpc.RpcError) as caught:
            _stub(server_address).Add(build(namespace))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in caught.value.details(), caught.value.details()
        description = remote_client.describe_namespace(namespace)
        assert description.rows == 3 and description.next_id == 3
    finally:
        remote_client.drop_namespace(namespace)


def test_service_keeps_serving_after_bad_requests(remote_client, namespace_name):
    remote_client.create_namespace(namespace_name, dim=DIM, value_dim=VALUE_DIM, max_k=16)
    try:
        remote_client.add(namespace_name, np.eye(DIM, dtype=np.float32), np.arange(DIM))
        for call, _ in BAD_CALLS.values():
            with pytest.raises(InvalidArgument):
                call(remote_client, namespace_name)
        result = remote_client.search(namespace_name, np.eye(DIM, dtype=np.float32), k=1)
        assert result.ids[:, 0].tolist() == list(range(DIM))
    finally:
        remote_client.drop_namespace(namespace_name)


def test_health_service_reports_serving(server_address):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(server_address))
    reply = stub.Check(health_pb2.HealthCheckRequest(service="monim.v1.MemoryService"), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
