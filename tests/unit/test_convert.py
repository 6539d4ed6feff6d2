import numpy as np
import pytest
import torch

from datastore.errors import InvalidArgument
from protos import convert
from protos import memory_pb2 as pb


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int32, np.int64])
def test_tensor_round_trip(dtype):
    array = (np.arange(24).reshape(2, 3, 4)).astype(dtype)
    back = convert.tensor_from_proto(convert.tensor_to_proto(array), "x")
    assert back.dtype == dtype and back.shape == (2, 3, 4)
    np.testing.assert_array_equal(back, array)
    assert back.flags.writeable


def test_torch_tensors_and_float64_travel_as_float32():
    t = convert.tensor_to_proto(torch.ones(2, 3, dtype=torch.float64))
    assert t.dtype == "float32" and list(t.shape) == [2, 3] and len(t.data) == 24


def test_raw_bytes_not_repeated_floats():
    t = convert.tensor_to_proto(np.ones((1000, 64), np.float32))
    assert len(t.SerializeToString()) < 1000 * 64 * 4 + 64


def test_byte_count_must_match_shape():
    with pytest.raises(InvalidArgument, match="carries 12 bytes but shape \\[2, 2\\] of float32 needs 16"):
        convert.tensor_from_proto(pb.Tensor(dtype="float32", shape=[2, 2], data=b"\0" * 12), "keys")


def test_unknown_dtype_is_named():
    with pytest.raises(InvalidArgument, match="keys has unknown dtype 'float64'"):
        convert.tensor_from_proto(pb.Tensor(dtype="float64", shape=[1], data=b"\0" * 8), "keys")
    with pytest.raises(InvalidArgument, match="cannot travel"):
        convert.tensor_to_proto(np.ones(2, np.complex64))
