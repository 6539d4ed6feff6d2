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


def test_concurrent_faiss_searches_of_every_size_agree(data):
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
@pytest.mark.parametrize("first_chunk", [None, 64])  # chunks of the block's size; 400, 400, 800, 1024, ...
def test_torch_kernel_one_or_many_chunks(data, metric, block_bytes, first_chunk, monkeypatch):
    keys, queries = data
    assert queries.shape[0] >= flat_index.FIRST_CHUNK_MIN_BATCH  # the batch that takes a small first chunk
    monkeypatch.setattr(flat_index, "FIRST_CHUNK_ROWS", first_chunk)
    if block_bytes is not None:
        monkeypatch.setattr(flat_index, "_SCORE_BLOCK_BYTES", block_bytes)
        monkeypatch.setattr(flat_index, "_SMALL_SCORE_BLOCK_BYTES", 0)  # chunks even for small searches
    k = torch.from_numpy(keys)
    norms = (k**2).sum(1)
    distances, rows = flat_index.torch_search(torch.from_numpy(queries), k, norms, 50, metric)
    oracle_d, oracle_rows = brute_force(queries, keys, 50, metric)
    assert distances.dtype == np.float32 and rows.dtype == np.int64
    assert_same_neighbours(rows, distances, oracle_d, oracle_rows)


def rows_in_order_of_distance(metric: str, dim: int = 32, stored: int = 6000, batch: int = 40):
    """Keys stored farthest first from where the queries are, so that every chunk of the torch kernel
    holds better rows than the ones before (the filter of later chunks lets most of them through)."""
    rng = np.random.default_rng(5)
    center = 3 * rng.standard_normal(dim)
    keys = rng.standard_normal((stored, dim)) + center
    closeness = -((keys - center) ** 2).sum(1) if metric == "l2" else keys @ center
    keys = keys[np.argsort(closeness, kind="stable")]
    queries = center + 0.05 * rng.standard_normal((batch, dim))
    return keys.astype(np.float32), queries.astype(np.float32)


def check_torch_kernel_on_rows_in_order_of_distance(device: str, metric: str, k: int, monkeypatch) -> None:
    monkeypatch.setattr(flat_index, "_SCORE_BLOCK_BYTES", 4 * 40 * 1000)  # 1024-row chunks at B=40
    monkeypatch.setattr(flat_index, "_SMALL_SCORE_BLOCK_BYTES", 0)  # chunks even for small searches
    keys, queries = rows_in_order_of_distance(metric)
    k_t = torch.from_numpy(keys).to(device)
    distances, rows = flat_index.torch_search(torch.from_numpy(queries).to(device), k_t, (k_t**2).sum(1), k, metric)
    oracle_d, oracle_rows = brute_force(queries, keys, k, metric)
    assert_same_neighbours(rows, distances, oracle_d, oracle_rows, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [1, 200])
@pytest.mark.parametrize("first_chunk", [None, 64])
def test_torch_kernel_when_every_chunk_holds_better_rows(metric, k, first_chunk, monkeypatch):
    """Later chunks are filtered by the best distances so far; with rows stored nearest last, every
    chunk passes more than the filter takes, and the kernel falls back to a top-k of the chunk."""
    monkeypatch.setattr(flat_index, "FIRST_CHUNK_ROWS", first_chunk)
    check_torch_kernel_on_rows_in_order_of_distance("cpu", metric, k, monkeypatch)


def test_chunk_bounds_start_small_and_double_for_a_large_batch(monkeypatch):
    monkeypatch.setattr(flat_index, "FIRST_CHUNK_ROWS", 100)
    bounds = list(flat_index._chunk_bounds(2000, 1024, keep=10, batch=64))
    assert bounds == [(0, 100), (100, 200), (200, 400), (400, 800), (800, 1600), (1600, 2000)]
    assert list(flat_index._chunk_bounds(2000, 1024, keep=10, batch=1)) == [(0, 1024), (1024, 2000)]
    assert list(flat_index._chunk_bounds(2000, 1024, keep=50, batch=64))[0] == (0, 400)  # >= 8 keep
    # Screened chunks (no score block) keep doubling past the block's rows; others stop at them.
    assert list(flat_index._chunk_bounds(2000, 256, keep=10, batch=64, screened=True)) == [
        (0, 100), (100, 200), (200, 400), (400, 800), (800, 1600), (1600, 2000)]
    assert list(flat_index._chunk_bounds(1000, 256, keep=10, batch=64)) == [
        (0, 100), (100, 200), (200, 400), (400, 656), (656, 912), (912, 1000)]


@pytest.mark.parametrize("block_bytes", [None, 4 * 40 * 1000])
def test_torch_kernel_pads_when_fewer_rows_than_k(data, block_bytes, monkeypatch):
    keys, queries = data
    if block_bytes is not None:
        monkeypatch.setattr(flat_index, "_SCORE_BLOCK_BYTES", block_bytes)
        monkeypatch.setattr(flat_index, "_SMALL_SCORE_BLOCK_BYTES", 0)  # chunks even for small searches
    k = torch.from_numpy(keys[:1500])
    distances, rows = flat_index.torch_search(torch.from_numpy(queries), k, (k**2).sum(1), 1024 + 700, "l2")
    assert (rows[:, 1500:] == -1).all() and np.isinf(distances[:, 1500:]).all()
    assert (np.sort(rows[:, :1500], axis=1) == np.arange(1500)).all()



def fp16_store_data(rng, stored=3000, dim=64, batch=48):
    """float32 keys with norms spread over [26, 500] (LM hidden states reach a few hundred), which a
    float16 store rounds, and float32 queries: half near a stored key, half random directions."""
    def scaled(count):
        directions = rng.standard_normal((count, dim))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        return directions * rng.uniform(26, 500, (count, 1))

    keys = scaled(stored)
    near = keys[: batch // 2] + rng.standard_normal((batch // 2, dim))
    return keys.astype(np.float32), np.concatenate([near, scaled(batch - batch // 2)]).astype(np.float32)


def assert_same_entries_below(got, want, threshold) -> None:
    """got and want: (distances, rows) [B, width] of each query's entries below its threshold (+inf in
    unused slots), from two filters of the same scores. The same entries per query, except ones at the
    threshold itself (another summation order may put them either side), with distances equal to
    float32 rounding."""
    for query in range(threshold.shape[0]):
        mine, theirs = ({row: d for row, d in zip(rows[query].tolist(), dists[query].tolist(), strict=True)
                         if d != float("inf")} for dists, rows in (got, want))
        limit = float(threshold[query])
        near = {row for row, d in {**mine, **theirs}.items() if abs(d - limit) <= 1e-3 * abs(d) + 1e-3}
        assert set(mine) - near == set(theirs) - near, query
        for row in set(mine) & set(theirs):
            assert abs(mine[row] - theirs[row]) <= 1e-4 * abs(theirs[row]) + 1e-3


def assert_float32_search_over_rounded_keys(queries, keys, rows, distances, metric, rtol=1e-5):
    """rows/distances [B, k] are what float32 search over `keys` (the float16-rounded keys) gives: each
    distance within rtol of its float64 value (for ip, plus rtol/10 of |q||k|: float32 sums of products
    that cancel lose that much), and the rows are the k nearest up to ties.
    Returns the largest relative distance error."""
    q, x = queries.astype(np.float64), keys.astype(np.float64)
    assert np.isfinite(distances).all() and (rows >= 0).all()
    assert all(len(set(r)) == len(r) for r in rows.tolist()), "a row returned twice"
    # float64 leaves an error of about 1e-16 |q| |k|: far below rtol of any distance here.
    every = (q**2).sum(1)[:, None] - 2 * q @ x.T + (x**2).sum(1)[None, :] if metric == "l2" else -(q @ x.T)
    truth = np.take_along_axis(every, rows, axis=1)
    allowed = rtol * np.abs(truth)
    if metric == "l2":
        assert (distances > 0).all(), "a zero distance (float16 overflow)"
    else:
        allowed += rtol / 10 * np.linalg.norm(q, axis=1)[:, None] * np.linalg.norm(x[rows], axis=2)
    np.testing.assert_array_less(np.abs(distances - truth), allowed + 1e-30)
    nearest = np.sort(every, axis=1)[:, : rows.shape[1]]  # within rtol of the k smallest: ties may swap
    np.testing.assert_array_less(np.abs(truth - nearest), allowed + 1e-30)
    return float((np.abs(distances - truth) / np.abs(truth)).max())


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("block_bytes", [None, 4 * 48 * 1000])  # one chunk; 1024-row chunks
@pytest.mark.parametrize("k", [1, 20, 2990])  # 2990: the candidate count is capped at the rows stored
def test_fp16_keys_give_fp32_distances_at_large_norms(rng, metric, block_bytes, k, monkeypatch):
    # float16 keys must give what an exact search over the rounded keys gives: the queries are not
    # rounded, and the scores must not overflow float16 (|q.k| reaches 250,000 here).
    if block_bytes is not None:
        monkeypatch.setattr(flat_index, "_SCORE_BLOCK_BYTES", block_bytes)
        monkeypatch.setattr(flat_index, "_SMALL_SCORE_BLOCK_BYTES", 0)  # chunks even for small searches
    keys, queries = fp16_store_data(rng)
    keys = keys.astype(np.float16)
    stored_keys = torch.from_numpy(keys)
    norms = (stored_keys.float() ** 2).sum(1)
    distances, rows = flat_index.torch_search(torch.from_numpy(queries), stored_keys, norms, k, metric)
    assert distances.dtype == np.float32 and rows.dtype == np.int64 and rows.shape == (len(queries), k)
    assert_float32_search_over_rounded_keys(queries, keys, rows, distances, metric)
    if k == 1 and metric == "l2":  # the queries near a key find it
        assert (rows[: len(queries) // 2, 0] == np.arange(len(queries) // 2)).all()


@pytest.mark.parametrize("metric", METRICS)
def test_fp16_keys_pad_when_fewer_rows_than_k(rng, metric):
    keys, queries = fp16_store_data(rng, stored=30)
    keys = keys.astype(np.float16)
    stored_keys = torch.from_numpy(keys)
    distances, rows = flat_index.torch_search(torch.from_numpy(queries), stored_keys,
                                              (stored_keys.float() ** 2).sum(1), 40, metric)
    assert (rows[:, 30:] == -1).all() and np.isinf(distances[:, 30:]).all()
    assert (np.sort(rows[:, :30], axis=1) == np.arange(30)).all()
    assert_float32_search_over_rounded_keys(queries, keys, rows[:, :30], distances[:, :30], metric)


def test_torch_kernel_k_beyond_two_chunks(data, monkeypatch):
    # The running top-k holds fewer than k rows until enough chunks are seen.
    keys, queries = data
    monkeypatch.setattr(flat_index, "_SCORE_BLOCK_BYTES", 4 * 40 * 1000)  # 1024-row chunks
    monkeypatch.setattr(flat_index, "_SMALL_SCORE_BLOCK_BYTES", 0)  # chunks even for small searches
    k = torch.from_numpy(keys)
    distances, rows = flat_index.torch_search(torch.from_numpy(queries), k, (k**2).sum(1), 2500, "l2")
    assert_same_neighbours(rows, distances, *brute_force(queries, keys, 2500, "l2"))


def test_the_sampled_pass_takes_a_bounded_sample_of_many_rows(monkeypatch):
    """The rows a float16 search samples, by its shape (only the shape counts: the keys are broadcast):
    about SAMPLE_RANK * stored / keep, at most an eighth of the rows, 256 MiB of [B, sample] scores and
    512 MiB of keys, and no sample of fewer than 65,536 rows (the chunked scan instead)."""
    monkeypatch.setattr(flat_index.gpu_select, "screens", lambda keys, batch: 32 <= batch <= 64)

    def rows(stored, dim, batch, k):
        keys = torch.zeros(1, dim, dtype=torch.float16).expand(stored, dim)
        return flat_index._sample_rows(keys, batch, flat_index._candidate_count(k, stored))

    assert rows(10_000_000, 1024, 64, 1024) == 232_559  # 48 expected below a query's keep-th best
    assert rows(10_000_000, 1024, 64, 4096) == 65_536  # at least SAMPLE_MIN_ROWS
    assert rows(10_000_000, 1024, 64, 32) == 262_144  # 512 MiB of keys
    assert rows(100_000_000, 64, 64, 32) == 1 << 20  # 256 MiB of scores
    assert rows(1_000_000, 768, 64, 32) == 125_000  # an eighth of the rows
    assert rows(500_000, 1024, 64, 4096) == 0  # an eighth is fewer than SAMPLE_MIN_ROWS
    keys = torch.zeros(1, 1024, dtype=torch.float16).expand(10_000_000, 1024)
    keep = flat_index._candidate_count(1024, 10_000_000)
    assert flat_index._float16_scans(keys, 64, keep) == ("sampled", "chunked", "checked")
    assert flat_index._float16_scans(keys[:500_000], 64, keep) == ("chunked", "checked")
    assert flat_index._float16_scans(keys, 128, keep) == ("chunked",)  # not the screen's batch


def test_the_sample_rank_leaves_five_standard_deviations_below_it():
    """r - 5 sqrt(r) >= the sample rows expected below a query's keep-th best, and r no more than the
    sample's rows."""
    for expected in (0.5, 2.1, 48.0, 537.9, 10_000.0):
        rank = flat_index._sample_rank(expected, 1 << 20)
        assert rank - 5 * rank**0.5 >= expected and rank - 1 - 5 * (rank - 1) ** 0.5 < expected
    assert flat_index._sample_rank(500.0, 300) == 300
