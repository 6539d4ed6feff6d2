"""The GPU search kernels of datastore/gpu_select.py in Triton's interpreter, on CPU tensors: the
same entries as the torch operations they replace, and flat_index's scan through them answering as
it does without them. On a machine with a GPU, tests/unit/test_gpu.py runs the compiled kernels
instead (these skip there); without Triton installed (`make test` installs it) they skip too."""

import os

import numpy as np
import pytest
import torch
from monim.datastore import flat_index, gpu_select

from tests.unit.test_flat_index import (
    assert_float32_search_over_rounded_keys,
    assert_same_entries_below,
    fp16_store_data,
    rows_in_order_of_distance,
)

pytestmark = pytest.mark.skipif(gpu_select.triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs Triton in interpreter mode (no GPU; tests/conftest.py sets it)")


def _block(batch: int, dim: int, stored: int = 3000, seed: int = 7):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(stored, dim, generator=generator).half()
    queries = torch.randn(batch, dim, generator=generator).half()
    row_mul = -2.0 * torch.rand(batch, generator=generator) - 0.5
    row_add = torch.randn(batch, generator=generator)
    col_add = (keys.float() ** 2).sum(1)
    return keys, queries, row_mul, row_add, col_add


@pytest.mark.parametrize("batch", [32, 40, 70])  # the tile of B <= 32; one tile of queries; a full and a partial one
@pytest.mark.parametrize("dim", [64, 100])  # a multiple of the tile's dims, and not
@pytest.mark.parametrize("clamp", [False, True])
def test_screen_and_filter_kernels_pass_the_entries_the_torch_filter_does(batch, dim, clamp):
    keys, queries, row_mul, row_add, col_add = _block(batch, dim)
    start, end = 300, 2900
    scores = queries.float() @ keys[start:end].float().T
    distances = flat_index._Distances(row_mul, row_add, col_add, clamp)
    threshold = torch.quantile(distances.apply_(scores.clone(), start), 0.02, dim=1)  # ~50 entries a query
    capacity = 200
    screened_d, screened_i, counts = gpu_select.screen_below(queries, keys, row_mul, row_add, col_add, clamp,
                                                             threshold, start, end, capacity)
    filtered = gpu_select.below_threshold(scores.clone(), row_mul, row_add, col_add, clamp, threshold, start,
                                          capacity)
    torch_below = distances.below(scores.clone(), threshold, start, capacity)  # the CPU path: torch operations
    assert filtered is not None and torch_below is not None and int(counts.max()) <= capacity
    assert (torch.isfinite(screened_d).sum(dim=1) == counts).all()  # +inf past each query's count
    for got in ((screened_d, screened_i), filtered):
        assert_same_entries_below(got, torch_below, threshold)
    # Too small a capacity: the counts say so (the screen's caller scans again; the filter answers None).
    _, _, small = gpu_select.screen_below(queries, keys, row_mul, row_add, col_add, clamp, threshold, start, end, 5)
    assert (small == counts).all() and int(small.max()) > 5
    assert gpu_select.below_threshold(scores.clone(), row_mul, row_add, col_add, clamp, threshold, start, 5) is None


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_the_rerank_kernel_gives_float32_distances_to_the_candidates(metric):
    keys, queries, *_ = _block(12, 100)
    queries = queries.float() * 3
    candidates = torch.randint(0, keys.shape[0], (12, 37), generator=torch.Generator().manual_seed(1))
    got = gpu_select.rerank_distances(queries, keys, candidates, metric)
    gathered = keys[candidates].double()
    want = ((queries.double()[:, None, :] - gathered) ** 2).sum(-1) if metric == "l2" else \
        -(queries.double()[:, None, :] * gathered).sum(-1)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-4)


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """flat_index takes the Triton kernels for CPU tensors, as it does for CUDA ones on a GPU."""
    monkeypatch.setattr(gpu_select, "available", lambda tensor: True)
    monkeypatch.setattr(gpu_select, "screens", lambda keys, batch: keys.dtype == torch.float16 and
                        gpu_select.SCREEN_MIN_BATCH <= batch <= gpu_select.SCREEN_MAX_BATCH)
    monkeypatch.setattr(flat_index, "_SCORE_BLOCK_BYTES", 4 * 40 * 1024)  # 1024-row score blocks at B=40
    monkeypatch.setattr(flat_index, "_SMALL_SCORE_BLOCK_BYTES", 0)


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("k", [1, 50])
def test_the_screened_scan_answers_as_the_torch_scan(kernels_on_cpu, metric, k, monkeypatch):
    """float16 keys at LM norms, 40 queries (the screen's batches), a first chunk of 256 rows (8 keep
    at k=50) and screened chunks doubling past the 1024-row score block: float32 search over the
    rounded keys, the same as the scan with torch operations."""
    monkeypatch.setattr(flat_index, "FIRST_CHUNK_ROWS", 256)
    keys, queries = fp16_store_data(np.random.default_rng(3), stored=5000, dim=64, batch=40)
    k_t = torch.from_numpy(keys).half()
    norms = (k_t.float() ** 2).sum(1)
    screened = []
    real = gpu_select.screen_below
    monkeypatch.setattr(gpu_select, "screen_below", lambda *args: screened.append(args[7:9]) or real(*args))
    distances, rows = flat_index.torch_search(torch.from_numpy(queries), k_t, norms, k, metric)
    first = max(256, 8 * flat_index._candidate_count(k, 5000))
    assert screened[0] == (first, 2 * first) and screened[-1][1] == 5000
    assert any(end - start > 1024 for start, end in screened)  # wider than a score block (1024 rows at least)
    assert_float32_search_over_rounded_keys(queries, keys.astype(np.float16), rows, distances, metric)
    monkeypatch.undo()
    plain_d, plain_rows = flat_index.torch_search(torch.from_numpy(queries), k_t, norms, k, metric)
    np.testing.assert_allclose(distances, plain_d, rtol=1e-5)
    assert (rows == plain_rows).mean() > 0.99  # the rest: ties of float32 distances


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_the_screened_scan_when_every_chunk_holds_better_rows(kernels_on_cpu, metric, monkeypatch):
    """Rows stored nearest last: every screened chunk passes more entries than it keeps; the scan
    notices at its end and runs again checked, each such chunk taken by a top-k. Exact all the same."""
    monkeypatch.setattr(flat_index, "FIRST_CHUNK_ROWS", 64)
    keys, queries = rows_in_order_of_distance(metric, stored=3000)
    k_t = torch.from_numpy(keys).half()
    calls = []
    real = flat_index._chunked_topk

    def counted(*args, **kwargs):
        calls.append(kwargs.get("checked", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(flat_index, "_chunked_topk", counted)
    distances, rows = flat_index.torch_search(torch.from_numpy(queries), k_t, (k_t.float() ** 2).sum(1), 20, metric)
    assert calls == [False, True]  # overflowed, then checked
    assert_float32_search_over_rounded_keys(queries, keys.astype(np.float16), rows, distances, metric, rtol=1e-4)


def _count_chunked_scans(monkeypatch) -> list:
    calls = []
    real = flat_index._chunked_topk
    monkeypatch.setattr(flat_index, "_chunked_topk", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    return calls


@pytest.fixture
def small_samples(monkeypatch):
    """The sampled scan for a few thousand rows: 8 sample rows expected below a query's keep-th best."""
    monkeypatch.setattr(flat_index, "SAMPLE_MIN_ROWS", 256)
    monkeypatch.setattr(flat_index, "SAMPLE_RANK", 8)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_the_sampled_scan_answers_as_the_torch_scan(kernels_on_cpu, small_samples, metric, monkeypatch):
    """k=50 of 6000 rows for 40 queries: a threshold from every 14th row, then one screened pass over all
    rows and no chunked scan; float32 search over the rounded keys, as the scan with torch operations."""
    keys, queries = fp16_store_data(np.random.default_rng(5), stored=6000, dim=64, batch=40)
    k_t = torch.from_numpy(keys).half()
    assert flat_index._sample_rows(k_t, 40, flat_index._candidate_count(50, 6000)) == 414  # every 14th row
    norms = (k_t.float() ** 2).sum(1)
    chunked = _count_chunked_scans(monkeypatch)
    distances, rows = flat_index.torch_search(torch.from_numpy(queries), k_t, norms, 50, metric)
    assert chunked == []
    assert_float32_search_over_rounded_keys(queries, keys.astype(np.float16), rows, distances, metric)
    monkeypatch.undo()
    plain_d, plain_rows = flat_index.torch_search(torch.from_numpy(queries), k_t, norms, 50, metric)
    np.testing.assert_allclose(distances, plain_d, rtol=1e-5)
    assert (rows == plain_rows).mean() > 0.99  # the rest: ties of float32 distances


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("sample_scale", [0.01, 10.0])  # the sampled rows nearer or farther than the rest
def test_the_sampled_scan_when_the_sample_is_unlike_the_rest(kernels_on_cpu, small_samples, metric, sample_scale,
                                                             monkeypatch):
    """The rows the sample takes scaled apart from the others: too many or too few entries fall below
    the sample's thresholds, the counts say so, and the chunked scan answers. Exact all the same."""
    keys, queries = fp16_store_data(np.random.default_rng(6), stored=6000, dim=64, batch=40)
    rows = flat_index._sample_rows(torch.from_numpy(keys), 40, flat_index._candidate_count(50, 6000))
    keys[: rows * (6000 // rows) : 6000 // rows] *= sample_scale
    k_t = torch.from_numpy(keys).half()
    chunked = _count_chunked_scans(monkeypatch)
    distances, rows = flat_index.torch_search(torch.from_numpy(queries), k_t, (k_t.float() ** 2).sum(1), 50, metric)
    assert chunked == [1]
    assert_float32_search_over_rounded_keys(queries, keys.astype(np.float16), rows, distances, metric, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:divide by zero")  # the zero query's bound / 0 = +inf, as on a GPU
@pytest.mark.parametrize("l2", [True, False])
@pytest.mark.parametrize("dim", [64, 100])
def test_the_query_scaling_kernel_scales_as_the_torch_operations(l2, dim, monkeypatch):
    """Queries of lengths 1e-3 to 500, a zero one and a float16 one: the same power-of-two scales,
    float16 rows and row_mul as the torch operations of flat_index._scaled_queries."""
    generator = torch.Generator().manual_seed(8)
    queries = torch.randn(12, dim, generator=generator)
    queries *= torch.logspace(-3, 2.7, 12)[:, None] / queries.norm(dim=1, keepdim=True)
    queries[5] = 0.0
    for key_squared in (torch.tensor(0.25), torch.tensor(3.0e5)):  # key lengths under 1 count as 1
        got = gpu_select.scaled_queries(queries, key_squared, l2, flat_index._SCREEN_SCORE_BOUND)
        monkeypatch.setattr(gpu_select, "available", lambda tensor: False)
        want = flat_index._scaled_queries(queries, key_squared, l2)
        monkeypatch.undo()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert got[0].dtype == torch.float16 and torch.isfinite(got[0]).all()
    half = gpu_select.scaled_queries(queries.half(), torch.tensor(9.0), l2, flat_index._SCREEN_SCORE_BOUND)
    assert torch.equal(half[0], flat_index._scaled_queries(queries.half(), torch.tensor(9.0), l2)[0])
    every_other = queries[:, ::2]  # not contiguous: copied first
    got = gpu_select.scaled_queries(every_other, torch.tensor(9.0), l2, flat_index._SCREEN_SCORE_BOUND)
    assert torch.equal(got[0], gpu_select.scaled_queries(every_other.contiguous(), torch.tensor(9.0), l2,
                                                         flat_index._SCREEN_SCORE_BOUND)[0])
