"""validation.check_search_options: which of nprobe, rerank (ivf) and ef (hnsw) each index takes,
their defaults and their ranges."""

import numpy as np
import pytest
from monim.protos.errors import InvalidArgument
from monim.protos.validation import DEFAULT_EF, MAX_EF, check_search_options


def test_flat_takes_none_of_them():
    assert check_search_options("flat", 0, 10, 0, 0, 0) == (0, 0, 0)
    assert check_search_options("flat", 0, 10, 0, 0) == (0, 0, 0)  # ef defaults to 0
    for options in (dict(nprobe=4), dict(rerank=20), dict(ef=64)):
        given = dict(dict(nprobe=0, rerank=0, ef=0), **options)
        with pytest.raises(InvalidArgument) as refused:
            check_search_options("flat", 0, 10, **given)
        assert refused.value.message == (
            "nprobe and rerank apply to ivf indexes, ef to hnsw indexes; namespace index is flat (exact): leave them "
            f"0, got nprobe {given['nprobe']}, rerank {given['rerank']}, ef {given['ef']}")


@pytest.mark.parametrize("index", ["ivf_flat", "ivf_pq"])
def test_ivf_takes_nprobe_and_rerank_not_ef(index):
    assert check_search_options(index, 8, 10, 0, 0, 0) == (8, 0, 0)
    assert check_search_options(index, 1024, 10, 0, 0) == (32, 0, 0)
    assert check_search_options(index, 1024, 10, 5, 40, 0) == (5, 40, 0)
    with pytest.raises(InvalidArgument) as refused:
        check_search_options(index, 8, 10, 0, 0, 64)
    assert refused.value.message == f"ef applies to hnsw indexes; namespace index is {index}: leave it 0, got ef 64"


def test_hnsw_takes_ef_and_defaults_it_to_max_64_k():
    assert check_search_options("hnsw", 0, 10, 0, 0, 0) == (0, 0, DEFAULT_EF) == (0, 0, 64)
    assert check_search_options("hnsw", 0, 10, 0, 0) == (0, 0, 64)
    assert check_search_options("hnsw", 0, 200, 0, 0, 0) == (0, 0, 200)
    assert check_search_options("hnsw", 0, 10, 0, 0, 10) == (0, 0, 10)  # ef = k
    assert check_search_options("hnsw", 0, 10, 0, 0, MAX_EF) == (0, 0, 32768)
    assert check_search_options("hnsw", 0, 10, 0, 0, np.int64(100)) == (0, 0, 100)
    assert type(check_search_options("hnsw", 0, 10, 0, 0, np.int32(100))[2]) is int


@pytest.mark.parametrize("nprobe, rerank", [(4, 0), (0, 20), (4, 20)])
def test_hnsw_refuses_nprobe_and_rerank(nprobe, rerank):
    with pytest.raises(InvalidArgument) as refused:
        check_search_options("hnsw", 0, 10, nprobe, rerank, 0)
    assert refused.value.message == (
        "nprobe and rerank apply to ivf indexes; namespace index is hnsw (use ef for recall): leave them 0, got "
        f"nprobe {nprobe}, rerank {rerank}")


@pytest.mark.parametrize("ef", [9, 1, 32769])
def test_hnsw_ef_out_of_range_is_refused(ef):
    with pytest.raises(InvalidArgument) as refused:
        check_search_options("hnsw", 0, 10, 0, 0, ef)
    assert refused.value.message == f"ef must be 0 (the default) or in [k, 32768] = [10, 32768], got {ef}"


@pytest.mark.parametrize("index", ["flat", "ivf_flat", "hnsw"])
@pytest.mark.parametrize("ef, message", [
    (-1, "ef must be >= 0 (0: the default), got -1"),
    (True, "ef must be an integer, got True"),
    (64.0, "ef must be an integer, got 64.0"),
    ("64", "ef must be an integer, got '64'"),
])
def test_ef_must_be_a_non_negative_integer_on_every_index(index, ef, message):
    with pytest.raises(InvalidArgument) as refused:
        check_search_options(index, 8, 10, 0, 0, ef)
    assert refused.value.message == message
