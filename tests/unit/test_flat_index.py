"""The exact kernels of datastore/flat_index.py against the numpy oracle: every faiss kernel, the
per-call kernel choice, and the torch kernel with one or many chunks."""

import concurrent.futures

import numpy as np
import pytest
import torch
from monim.datastore import flat_index

from tests.conftest import assert_same_neighbours, brute_force

METRICS = ["l2", "ip"]


@pytest.fixture
def data(rng):
    keys = rng.standard_normal((3000, 24)).astype(np.float32)
    queries = rng.standard_normal((40, 24)).astype(np.float32)
    return keys, queries


@pytest.mark.parametrize("kernel", ["scan", "blas", "faiss", None])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("batch", [1, 3, 40])
def test_faiss_kernels_match_brute_force(data, kernel, metric, batch):
    keys, queries = data
    distances, rows = flat_index.faiss_search(queries[:batch], keys, 16, metric, kernel=kernel)
    oracle_d, oracle_rows = brute_force(queries[:batch], keys, 16, metric)
    assert distances.dtype == np.float32 and rows.dtype == np.int64 and rows.shape == (batch, 16)
    assert_same_neighbours(rows, distances, oracle_d, oracle_rows)


@pytest.mark.parametrize("kernel", ["scan", "blas", None])
def test_faiss_with_key_norms(data, kernel):
    keys, queries = data
    norms = (keys.astype(np.float64) ** 2).sum(1).astype(np.float32)
    distances, rows = flat_index.faiss_search(queries, keys, 10, "l2", key_norms=norms, kernel=kernel)
    oracle_d, oracle_rows = brute_force(queries, keys, 10, "l2")
    assert_same_neighbours(rows, distances, oracle_d, oracle_rows)


@pytest.mark.parametrize("kernel", ["scan", "blas"])
def test_faiss_pads_when_fewer_rows_than_k(data, kernel):
    keys, queries = data
    distances, rows = flat_index.faiss_search(queries[:5], keys[:3], 6, "l2", kernel=kernel)
    assert (rows[:, 3:] == -1).all() and np.isinf(distances[:, 3:]).all()
    assert sorted(rows[0, :3].tolist()) == [0, 1, 2]


def test_kernel_choice():
    # The per-query scan up to 3 queries per thread; BLAS above; faiss's own database-parallel
    # kernel only for batches smaller than a wide host's thread count.
    assert [flat_index._faiss_kernel(b, 1) for b in (1, 3, 4, 64)] == ["scan", "scan", "blas", "blas"]
    assert [flat_index._faiss_kernel(b, 2) for b in (1, 6, 7, 4096)] == ["scan", "scan", "blas", "blas"]
    assert [flat_index._faiss_kernel(b, 16) for b in (1, 15, 16, 48, 49)] == ["faiss", "faiss", "scan", "scan", "blas"]


def test_concurrent_searches_of_every_size_agree(data):
    # The kernel is chosen per call, with no process-wide state changed per call, so threads
    # searching with different batch sizes at once still get exact answers.
    keys, queries = data
    sizes = [1, 2, 40, 3, 1, 40, 5, 1] * 3
    expected = {b: brute_force(queries[:b], keys, 8, "l2") for b in set(sizes)}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda b: flat_index.faiss_search(queries[:b], keys, 8, "l2"), sizes))
    for b, (distances, rows) in zip(sizes, answers):
        assert_same_neighbours(rows, distances, *expected[b])


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("block_bytes", [None, 4 * 40 * 1000])  # one chunk; 1024-row chunks
def test_torch_kernel_one_or_many_chunks(data, metric, block_bytes, monkeypatch):
    keys, queries = data
    if block_bytes is not None:
        monkeypatch.setattr(flat_index, "_SCORE_BLOCK_BYTES", block_bytes)
    k = torch.from_numpy(keys)
    norms = (k**2).sum(1)
    distances, rows = flat_index.torch_search(torch.from_numpy(queries), k, norms, 50, metric)
    oracle_d, oracle_rows = brute_force(queries, keys, 50, metric)
    assert distances.dtype == np.float32 and rows.dtype == np.int64
    assert_same_neighbours(rows, distances, oracle_d, oracle_rows)


@pytest.mark.parametrize("block_bytes", [None, 4 * 40 * 1000])
def test_torch_kernel_pads_when_fewer_rows_than_k(data, block_bytes, monkeypatch):
    keys, queries = data
    if block_bytes is not None:
        monkeypatch.setattr(flat_index, "_SCORE_BLOCK_BYTES", block_bytes)
    k = torch.from_numpy(keys[:1500])
    distances, rows = flat_index.torch_search(torch.from_numpy(queries), k, (k**2).sum(1), 1024 + 700, "l2")
    assert (rows[:, 1500:] == -1).all() and np.isinf(distances[:, 1500:]).all()
    assert (np.sort(rows[:, :1500], axis=1) == np.arange(1500)).all()
