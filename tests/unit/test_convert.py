import numpy as np
import pytest
import torch
from monim.protos import convert, framing
from monim.protos import memory_pb2 as pb
from monim.protos.errors import InvalidArgument


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


def test_fill_tensor_writes_the_field_in_place_and_replaces_its_shape():
    response = pb.SearchResponse()
    convert.fill_tensor(response.ids, np.arange(6, dtype=np.int64).reshape(2, 3))
    convert.fill_tensor(response.ids, np.arange(4, dtype=np.int64))
    assert response.HasField("ids") and not response.HasField("keys")
    np.testing.assert_array_equal(convert.tensor_from_proto(response.ids, "ids"), np.arange(4))


def test_non_contiguous_big_endian_and_float64_arrays_travel_as_values():
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    for array in (base[:, ::2], base.T, base.astype(">f4"), base.astype(np.float64)[1:3]):
        back = convert.tensor_from_proto(convert.tensor_to_proto(array), "x")
        assert back.dtype == np.float32 and back.dtype.isnative and back.flags.c_contiguous
        np.testing.assert_array_equal(back, array)


def read_both_ways(message_class, wire: bytes):
    """An answer as the client reads it (framing.parsed: payloads left in the received bytes) and as
    protobuf parses it whole (a decode stream's steps): (message, payloads) for each."""
    yield framing.parsed(message_class, wire)
    yield message_class.FromString(wire), None


def test_search_result_round_trip_with_and_without_optional_fields():
    from monim.datastore import SearchResult

    rng = np.random.default_rng(0)
    plain = SearchResult(ids=np.arange(6).reshape(2, 3), distances=rng.random((2, 3), dtype=np.float32),
                         tokens=np.arange(6, dtype=np.int32).reshape(2, 3), generation=9)
    message = pb.SearchResponse.FromString(convert.search_result_to_wire(plain))
    assert not any(message.HasField(f) for f in ("keys", "values", "weights"))
    full = SearchResult(plain.ids, plain.distances, plain.tokens, keys=rng.random((2, 3, 4), dtype=np.float32),
                        values=rng.random((2, 3, 5), dtype=np.float32), weights=rng.random((2, 3), dtype=np.float32))
    for result in (plain, full):
        for response, payloads in read_both_ways(pb.SearchResponse, convert.search_result_to_wire(result)):
            back = convert.search_result_from_proto(response, payloads)
            assert back.generation == result.generation
            for name in ("ids", "distances", "tokens", "keys", "values", "weights"):
                expected, got = getattr(result, name), getattr(back, name)
                if expected is None:
                    assert got is None
                else:
                    assert got.dtype == expected.dtype and got.flags.writeable, name
                    np.testing.assert_array_equal(got, expected)


def test_rows_add_and_retrieve_results_round_trip():
    from monim.datastore import Rows
    from monim.protos.results import AddResult, RetrieveResult

    rows = Rows(ids=np.array([3, 1]), keys=np.ones((2, 4), np.float32), tokens=np.array([7, 8], np.int32),
                values=np.zeros((2, 2), np.float32), weights=np.array([1, 2], np.float32), sources=["a", "b"],
                optimizer_state={"exp_avg": np.full((2, 2), 0.5, np.float32), "step": np.array([4])})
    for response, payloads in read_both_ways(pb.GetResponse, convert.rows_to_wire(rows)):
        back = convert.rows_from_proto(response, payloads)
        assert back.sources == ["a", "b"] and back.tokens.tolist() == [7, 8] and back.ids.tolist() == [3, 1]
        np.testing.assert_array_equal(back.values, rows.values)
        np.testing.assert_array_equal(back.optimizer_state["exp_avg"], rows.optimizer_state["exp_avg"])
        assert back.optimizer_state["step"].tolist() == [4]
    added = AddResult(ids=np.array([0, -1]), admitted=np.array([True, False]), merged=np.array([False, False]))
    for response, payloads in read_both_ways(pb.AddResponse, convert.add_result_to_wire(added)):
        back = convert.add_result_from_proto(response, payloads)
        assert back.ids.tolist() == [0, -1] and back.admitted.tolist() == [True, False] and back.admitted.dtype == bool
    retrieved = RetrieveResult(memory=np.ones((1, 2), np.float32), ids=np.array([[4, 5]]),
                               alpha=np.array([[0.25, 0.75]], np.float32), distances=np.zeros((1, 2), np.float32),
                               tokens=np.array([[1, 2]], np.int32), weights=np.ones((1, 2), np.float32),
                               handle="h-1")
    for response, payloads in read_both_ways(pb.RetrieveResponse, convert.retrieve_result_to_wire(retrieved)):
        back = convert.retrieve_result_from_proto(response, None, 1.0, payloads)
        assert back.ids.tolist() == [[4, 5]] and back.alpha.tolist() == [[0.25, 0.75]] and back.handle == "h-1"


def test_namespace_config_round_trip_with_the_index_options():
    from monim.protos.config import NamespaceConfig

    for config in (NamespaceConfig("g", dim=8, index="hnsw", hnsw_m=16, ef_construction=200, train_min_rows=5000),
                   NamespaceConfig("d", dim=8, index="hnsw"),
                   NamespaceConfig("p", dim=16, index="ivf_pq", nlist=8, pq_m=4, train_min_rows=512),
                   NamespaceConfig("f", dim=4)):
        message = pb.NamespaceConfig.FromString(convert.config_to_proto(config).SerializeToString())
        assert convert.config_from_proto(message) == config
    message = convert.config_to_proto(NamespaceConfig("g", dim=8, index="hnsw", hnsw_m=16, ef_construction=200))
    assert (message.hnsw_m, message.ef_construction, message.train_min_rows) == (16, 200, 10_000)
    # a config sent without them (an older client) takes the defaults
    bare = convert.config_from_proto(pb.NamespaceConfig(name="g", dim=8, index="hnsw"))
    assert (bare.hnsw_m, bare.ef_construction, bare.train_min_rows) == (32, 64, 10_000)
    with pytest.raises(InvalidArgument, match="hnsw_m applies to index hnsw, not 'flat'"):
        convert.config_from_proto(pb.NamespaceConfig(name="f", dim=8, hnsw_m=16))


class _Sized:
    """Stands for bytes of a given length (a tensor's data in a client's region): only its length is read."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self):
        return self.size


@pytest.mark.parametrize("shape, data", [([0, 2**40], b""),            # empty, a dimension numpy cannot shape
                                         ([2**29 + 1, 1], _Sized(2**31 + 4))])  # 2 GiB and more of float32
def test_a_tensor_past_the_span_bound_is_refused_before_it_is_read(shape, data):
    tensor = pb.Tensor(dtype="float32", shape=shape)
    with pytest.raises(InvalidArgument, match="dimension too large"):
        convert.tensor_from_proto(tensor, "grads", data=data)
