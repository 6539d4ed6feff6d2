"""protos/framing.py: a request serialized with its tensors appended in protobuf's wire format parses
to exactly the message the generated code builds, for every dtype, shape and layout a caller may pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monim.protos import convert, framing
from monim.protos import memory_pb2 as pb
from monim.protos.errors import InvalidArgument

ARRAYS = {
    "float32 2-d": np.arange(12, dtype=np.float32).reshape(3, 4),
    "float16": np.linspace(-2, 2, 10, dtype=np.float16).reshape(2, 5),
    "float64 goes as float32": np.array([[0.5, -1.25]], dtype=np.float64),
    "int64": np.array([0, 1, -1, 2**40], dtype=np.int64),
    "int32": np.array([7, -7], dtype=np.int32),
    "bool": np.array([True, False, True]),
    "empty rows": np.empty((0, 4), np.float32),
    "non-contiguous": np.arange(40, dtype=np.float32).reshape(5, 8)[:, ::2],
    "big-endian": np.arange(6, dtype=">f4").reshape(2, 3),
    "torch": torch.arange(6, dtype=torch.float32).reshape(3, 2),
    "0-d": np.float32(3.5),
}


def built_by_protobuf(message, tensors):
    expected = type(message)()
    expected.CopyFrom(message)
    for name, array in tensors.items():
        if array is not None:
            convert.fill_tensor(getattr(expected, name), array)
    return expected


@pytest.mark.parametrize("case", sorted(ARRAYS))
def test_one_tensor_field_parses_as_the_generated_code_builds_it(case):
    message = pb.SearchRequest(namespace="ns", k=5, return_values=True, nprobe=3)
    tensors = {"queries": ARRAYS[case]}
    parsed = pb.SearchRequest.FromString(framing.serialized(message, tensors))
    assert parsed == built_by_protobuf(message, tensors)
    array = np.asarray(ARRAYS[case])
    if array.dtype != np.float64:
        np.testing.assert_array_equal(convert.tensor_from_proto(parsed.queries, "queries"), array)


def test_several_tensor_fields_and_unset_ones():
    rng = np.random.default_rng(0)
    message = pb.AddRequest(namespace="ns", source="day 1", admit_below=-0.8, request_id="r" * 128, generation=3)
    tensors = dict(keys=rng.standard_normal((300, 64), dtype=np.float32), tokens=np.arange(300),
                   values=None, weights=rng.random(300, dtype=np.float32), logp=None)
    wire = framing.serialized(message, tensors)
    parsed = pb.AddRequest.FromString(wire)
    assert parsed == built_by_protobuf(message, tensors)
    assert not parsed.HasField("values") and not parsed.HasField("logp")
    assert len(wire) == built_by_protobuf(message, tensors).ByteSize()


def test_lengths_that_need_several_varint_bytes():
    data = np.zeros((2**21 + 3,), np.int64)  # 16 MiB + 24 bytes: a four-byte length
    parsed = pb.GetRequest.FromString(framing.serialized(pb.GetRequest(namespace="n"), {"ids": data}))
    assert len(parsed.ids.data) == data.nbytes and list(parsed.ids.shape) == [data.size]


def test_a_dtype_that_cannot_travel_is_refused_before_anything_is_sent():
    with pytest.raises(InvalidArgument, match="complex64 cannot travel"):
        framing.serialized(pb.SearchRequest(namespace="n"), {"queries": np.zeros(3, np.complex64)})


# ----- answers: framing.parsed reads what protobuf (or the server's framing) wrote ---------------
def _answer(rows: int) -> dict:
    rng = np.random.default_rng(1)
    return dict(ids=np.arange(rows * 4, dtype=np.int64).reshape(rows, 4), distances=rng.random((rows, 4), dtype=np.float32),
                tokens=np.arange(rows * 4, dtype=np.int32).reshape(rows, 4), keys=None,
                values=rng.random((rows, 4, 2), dtype=np.float32), weights=None)


def test_parsed_leaves_each_tensor_s_bytes_in_the_answer_and_reads_every_other_field():
    result = _answer(2000)  # 112 KB: past PARSED_WHOLE_BELOW
    for wire in (framing.serialized(pb.SearchResponse(generation=7), result),
                 built_by_protobuf(pb.SearchResponse(generation=7), result).SerializeToString()):
        assert len(wire) >= framing.PARSED_WHOLE_BELOW
        message, payloads = framing.parsed(pb.SearchResponse, wire)
        assert message.generation == 7 and sorted(payloads) == ["distances", "ids", "tokens", "values"]
        assert not message.HasField("keys") and not message.HasField("weights") and message.HasField("values")
        assert message.ids.data == b"" and list(message.ids.shape) == [2000, 4] and message.ids.dtype == "int64"
        for name in payloads:
            assert isinstance(payloads[name], memoryview) and payloads[name].obj is wire  # views, not copies
            np.testing.assert_array_equal(
                convert.tensor_from_proto(getattr(message, name), name, data=payloads[name]), result[name])


def test_a_small_answer_is_parsed_whole_and_reads_the_same():
    result = _answer(3)
    for wire in (framing.serialized(pb.SearchResponse(generation=7), result),
                 built_by_protobuf(pb.SearchResponse(generation=7), result).SerializeToString()):
        assert len(wire) < framing.PARSED_WHOLE_BELOW
        message, payloads = framing.parsed(pb.SearchResponse, wire)
        assert payloads == {} and message == pb.SearchResponse.FromString(wire)
        for name in ("ids", "distances", "tokens", "values"):
            np.testing.assert_array_equal(
                convert.tensor_from_proto(getattr(message, name), name, data=payloads.get(name)), result[name])
        assert not message.HasField("keys") and not message.HasField("weights")


def test_parsed_keeps_empty_tensors_present_and_map_fields():
    response = pb.GetResponse(sources=["a"])
    convert.fill_tensor(response.optimizer_state["exp_avg"], np.ones((1, 2), np.float32))
    wire = framing.serialized(response, dict(ids=np.empty(0, np.int64), keys=np.empty((0, 3), np.float32)))
    message, payloads = framing.parsed(pb.GetResponse, wire)
    assert message.HasField("ids") and message.HasField("keys") and not message.HasField("values")
    assert convert.tensor_from_proto(message.keys, "keys", data=payloads.get("keys")).shape == (0, 3)
    assert list(message.sources) == ["a"] and list(message.optimizer_state["exp_avg"].shape) == [1, 2]


def test_parsed_hands_what_it_does_not_expect_to_protobuf():
    one = built_by_protobuf(pb.SearchResponse(), {"ids": np.arange(3)}).SerializeToString()
    two = built_by_protobuf(pb.SearchResponse(), {"ids": np.arange(2)}).SerializeToString()
    message, payloads = framing.parsed(pb.SearchResponse, one + two)  # a field twice: protobuf merges it
    assert payloads == {} and message == pb.SearchResponse.FromString(one + two)
    from google.protobuf.message import DecodeError

    with pytest.raises(DecodeError):
        framing.parsed(pb.SearchResponse, one[:-3] + b"\xff\xff")


def test_field_wraps_an_answer_as_a_decode_step_result():
    inner = framing.serialized(pb.SearchResponse(generation=2), {"ids": np.arange(4).reshape(1, 4)})
    result = pb.DecodeStepResult.FromString(framing.field(pb.DecodeStepResult, "search", inner))
    assert result.WhichOneof("step") == "search" and result.code == 0 and result.search.generation == 2
    assert convert.tensor_from_proto(result.search.ids, "ids").tolist() == [[0, 1, 2, 3]]
