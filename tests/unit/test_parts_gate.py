"""Calls answered in parts (SearchParts, RetrieveParts) pass the front end's call gate as calls do:
counted in the metrics with their code (a client that stops reading: CANCELLED), in flight until
their last part, and refused with UNAVAILABLE once the front end drains (a bug found writing them:
the gate let every unary-stream call through unseen, as it does Reshard)."""

from __future__ import annotations

import time
import urllib.request

import grpc
import numpy as np
import pytest
from monim.protos import convert
from monim.protos import memory_pb2 as pb
from monim.protos import memory_pb2_grpc as pb_grpc
from monim.workers.frontend import SHUTTING_DOWN
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime
from monim.workers.server import start_server
from prometheus_client.parser import text_string_to_metric_families

from monim import MemoryClient

DIM, ROWS, K, BATCH = 8, 300, 20, 4000  # a 1.3 MB answer: more than gRPC buffers before a cancel


def _counts(server, method: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    return {sample.labels["code"]: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "monim_requests_total" and sample.labels["method"] == method}


@pytest.fixture
def served(monkeypatch):
    monkeypatch.setattr(convert, "ANSWER_PART_BYTES", 4096)  # many parts
    runtime = LocalRuntime(1)
    server, port = start_server(Router(runtime), port=0, metrics_port=0)
    rng = np.random.default_rng(0)
    with MemoryClient(f"127.0.0.1:{port}", retries=0) as client:
        client.create_namespace("mem", dim=DIM, max_k=K)
        client.add("mem", rng.standard_normal((ROWS, DIM)).astype(np.float32), np.arange(ROWS))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    request = pb.SearchRequest(namespace="mem", k=K,
                               queries=convert.tensor_to_proto(rng.standard_normal((BATCH, DIM)).astype(np.float32)))
    yield server, pb_grpc.MemoryServiceStub(channel), request
    channel.close()
    server.stop(0)
    runtime.shutdown()


def test_calls_answered_in_parts_are_counted_with_their_code(served):
    server, stub, request = served
    assert len(list(stub.SearchParts(request))) > 1
    bad = pb.SearchRequest(namespace="mem", k=0, queries=request.queries)
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.SearchParts(bad))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    stopped = stub.SearchParts(request)
    next(stopped)
    stopped.cancel()
    deadline = time.monotonic() + 10  # the server sees the cancel a moment after the client
    while _counts(server, "SearchParts").get("CANCELLED") != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _counts(server, "SearchParts") == {"OK": 1, "INVALID_ARGUMENT": 1, "CANCELLED": 1}
    assert server.gate.in_flight == 0


def test_a_draining_front_end_refuses_calls_answered_in_parts(served):
    server, stub, request = served
    server.gate.close()
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.SearchParts(request))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and refused.value.details() == SHUTTING_DOWN
