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
    parsed = pb.SearchRequest.FromString(framing.serialized_request(message, tensors))
    assert parsed == built_by_protobuf(message, tensors)
    array = np.asarray(ARRAYS[case])
    if array.dtype != np.float64:
        np.testing.assert_array_equal(convert.tensor_from_proto(parsed.queries, "queries"), array)


def test_several_tensor_fields_and_unset_ones():
    rng = np.random.default_rng(0)
    message = pb.AddRequest(namespace="ns", source="day 1", admit_below=-0.8, request_id="r" * 128, generation=3)
    tensors = dict(keys=rng.standard_normal((300, 64), dtype=np.float32), tokens=np.arange(300),
                   values=None, weights=rng.random(300, dtype=np.float32), logp=None)
    wire = framing.serialized_request(message, tensors)
    parsed = pb.AddRequest.FromString(wire)
    assert parsed == built_by_protobuf(message, tensors)
    assert not parsed.HasField("values") and not parsed.HasField("logp")
    assert len(wire) == built_by_protobuf(message, tensors).ByteSize()


def test_lengths_that_need_several_varint_bytes():
    data = np.zeros((2**21 + 3,), np.int64)  # 16 MiB + 24 bytes: a four-byte length
    parsed = pb.GetRequest.FromString(framing.serialized_request(pb.GetRequest(namespace="n"), {"ids": data}))
    assert len(parsed.ids.data) == data.nbytes and list(parsed.ids.shape) == [data.size]


def test_a_dtype_that_cannot_travel_is_refused_before_anything_is_sent():
    with pytest.raises(InvalidArgument, match="complex64 cannot travel"):
        framing.serialized_request(pb.SearchRequest(namespace="n"), {"queries": np.zeros(3, np.complex64)})
