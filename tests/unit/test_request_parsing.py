"""The server's request deserializer (workers/decoding.py): a request with Tensor fields is parsed
with their bytes left in the received buffer; it reads as its message, the servicer's arrays are
read-only views of those bytes, and bytes that are no such message are still remembered as
undecodable (the method answers INVALID_ARGUMENT)."""

from __future__ import annotations

import numpy as np
import pytest
from monim.protos import framing
from monim.protos import memory_pb2 as pb
from monim.workers import decoding
from monim.workers.servicer import _optional, _required

REQUESTS_WITH_TENSORS = [message for message in pb.DESCRIPTOR.message_types_by_name.values()
                         if message.name.endswith("Request") and decoding._has_tensor_fields(getattr(pb, message.name))]


def test_requests_with_tensors_have_no_field_the_wrapper_shadows():
    assert {m.name for m in REQUESTS_WITH_TENSORS} >= {"AddRequest", "SearchRequest", "ApplyGradientsRequest"}
    for message in REQUESTS_WITH_TENSORS:
        assert not {"message", "payloads"} & set(message.fields_by_name), message.name


def test_a_framed_add_reads_as_its_message_with_views_of_the_received_bytes():
    rng = np.random.default_rng(0)
    keys, tokens = rng.standard_normal((2000, 8), dtype=np.float32), np.arange(2000)  # past PARSED_WHOLE_BELOW
    wire = framing.serialized(pb.AddRequest(namespace="ns", source="day", request_id="r1", generation=4),
                              dict(keys=keys, tokens=tokens, values=None))
    request = decoding._deserializer(pb.AddRequest)(wire)
    assert isinstance(request, decoding.ParsedRequest) and decoding.undecodable(request) is None
    assert (request.namespace, request.source, request.request_id, request.generation) == ("ns", "day", "r1", 4)
    assert request.HasField("keys") and not request.HasField("values")
    got = _required(request, "keys")
    np.testing.assert_array_equal(got, keys)
    assert not got.flags.writeable and np.shares_memory(got, np.frombuffer(wire, np.uint8))
    np.testing.assert_array_equal(_required(request, "tokens"), tokens)
    assert _optional(request, "values") is None and _optional(request, "weights") is None


def test_a_small_request_reads_as_its_message_with_read_only_arrays():
    queries = np.ones((1, 8), np.float32)
    wire = framing.serialized(pb.SearchRequest(namespace="ns", k=3), dict(queries=queries))
    request = decoding._deserializer(pb.SearchRequest)(wire)
    assert isinstance(request, decoding.ParsedRequest) and decoding.undecodable(request) is None
    got = _required(request, "queries")
    np.testing.assert_array_equal(got, queries)
    assert not got.flags.writeable and (request.namespace, request.k) == ("ns", 3)


def test_a_request_without_tensor_fields_is_its_message():
    wire = pb.DropNamespaceRequest(namespace="ns").SerializeToString()
    request = decoding._deserializer(pb.DropNamespaceRequest)(wire)
    assert type(request) is pb.DropNamespaceRequest and decoding.payloads_of(request) is None


@pytest.mark.parametrize("wire", [b"\xff\xff\xff", b"\x0a\x05ab"])
def test_bytes_that_are_no_request_are_remembered_as_undecodable(wire):
    request = decoding._deserializer(pb.SearchRequest)(wire)
    problem = decoding.undecodable(request)
    assert problem is not None and "not a valid SearchRequest message" in problem
