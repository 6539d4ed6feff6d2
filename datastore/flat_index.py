"""Exact (flat) k-nearest-neighbour search over a block of stored keys.

Two kernels with the same contract:
- ``faiss``: faiss's brute-force kernel (the one behind IndexFlatL2 /
  IndexFlatIP) run directly on the row store's float32 key buffer, so keys
  are held once, not copied into a separate index.
- ``torch``: matmul + top-k, chunked over the stored rows so the [B, chunk]
  score block stays bounded; used when the store lives on a CUDA device
  (keys may be float16 there).

Both return distances where smaller is nearer: squared L2 for ``l2``, the
negative inner product for ``ip``; slots past the number of rows are id -1
and distance +inf.
"""

from __future__ import annotations

import numpy as np
import torch

MISSING = -1
# Most bytes of one [B, chunk] float32 score block in the torch kernel (see _score_block_bytes).
_SCORE_BLOCK_BYTES = 1 << 30


def pad_results(distances: np.ndarray, rows: np.ndarray, k: int):
    """Pads [B, k'] results with (+inf, -1) up to [B, k]."""
    short = k - distances.shape[1]
    if short <= 0:
        return distances, rows
    batch = distances.shape[0]
    distances = np.concatenate([distances, np.full((batch, short), np.inf, np.float32)], axis=1)
    rows = np.concatenate([rows, np.full((batch, short), MISSING, np.int64)], axis=1)
    return distances, rows


# faiss (1.15) picks one of three kernels per call; its defaults do not suit our shapes:
# - a per-query scan (min(B, threads) threads, each reads all keys once per query), taken when
#   B * dim < faiss.cvar.distance_compute_blas_threshold (default 128000: B < 167 at dim 768);
# - BLAS (sgemm over blocks of 1024 keys): its cost hardly grows with B at small B. At dim 768,
#   100,000 keys, 2 threads: B=64 took 68 ms against 330 ms for the scan;
# - database-parallel BLAS, taken when B < threads: one query's keys split over the threads.
#   On 2 threads one query took 26 ms, against 10 ms for the 1-thread scan.
# So we choose per call: the scan up to _SCAN_MAX_QUERIES_PER_THREAD queries per thread (the
# measured crossover: 3-4 with 1 thread, ~4 with 2), BLAS above. The threshold is set once, to 0,
# so faiss takes BLAS unless we ask for the scan. We ask for it by passing an IDSelectorAll: faiss
# runs the scan for any selector, and this one selects every row. So the choice is per call and
# changes no process-wide state; the scan's thread count is min(B, threads), 1 for one query.
# faiss's database-parallel kernel is still left to run on hosts with more than
# _DB_PARALLEL_MIN_THREADS threads, where splitting one query over many threads should pay off
# (not measured here).
# BLAS makes one OpenMP fork/join per block of keys. So with several threads it suffers most
# when other processes share the CPUs: with one busy process beside it, B=64 took 4x as long
# (the scan 2x).
_SCAN_MAX_QUERIES_PER_THREAD = 3
_DB_PARALLEL_MIN_THREADS = 4
_faiss = None
_select_all = None


def _faiss_module():
    """faiss, imported and configured on first use (the threshold is process-wide; set once)."""
    global _faiss, _select_all
    if _faiss is None:
        import faiss

        faiss.cvar.distance_compute_blas_threshold = 0  # BLAS unless the scan is asked for; see above
        _select_all = faiss.IDSelectorAll()
        _faiss = faiss
    return _faiss


def _faiss_kernel(batch: int, threads: int) -> str:
    """The kernel for a batch: "scan", "blas", or "faiss" (faiss's own choice: database-parallel)."""
    if batch < threads and threads > _DB_PARALLEL_MIN_THREADS:
        return "faiss"
    return "scan" if batch <= _SCAN_MAX_QUERIES_PER_THREAD * threads else "blas"


def faiss_search(queries: np.ndarray, keys: np.ndarray, k: int, metric: str, key_norms: np.ndarray | None = None,
                 kernel: str | None = None):
    """queries float32 [B, dim]; keys float32 [N, dim] (CPU) -> (distances float32 [B, k], rows int64 [B, k]).

    key_norms: optional numpy float32 [N], the keys' squared norms (l2 only); spares the BLAS
    kernel a pass over the keys. kernel: "scan" / "blas" / "faiss" to force one (tests); None chooses.
    Thread-safe: no process-wide state is changed per call.
    """
    faiss = _faiss_module()
    batch, stored = queries.shape[0], keys.shape[0]
    if stored == 0:
        return pad_results(np.empty((batch, 0), np.float32), np.empty((batch, 0), np.int64), k)
    k_found = min(k, stored)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    keys = np.ascontiguousarray(keys, dtype=np.float32)
    kernel = kernel or _faiss_kernel(batch, faiss.omp_get_max_threads())
    selector = _select_all if kernel == "scan" else None
    D = np.empty((batch, k_found), np.float32)
    I = np.empty((batch, k_found), np.int64)
    ptr = faiss.swig_ptr
    dim = keys.shape[1]
    if metric == "l2":
        # Only the BLAS kernels read the norms; the array must outlive the call (swig_ptr holds no reference).
        norms = None if key_norms is None or selector is not None else np.ascontiguousarray(key_norms[:stored],
                                                                                             dtype=np.float32)
        faiss.knn_L2sqr(ptr(queries), ptr(keys), dim, batch, stored, k_found, ptr(D), ptr(I),
                        None if norms is None else ptr(norms), selector)
    else:
        faiss.knn_inner_product(ptr(queries), ptr(keys), dim, batch, stored, k_found, ptr(D), ptr(I), selector)
        np.negative(D, out=D)
    return pad_results(D, I, k)


def _score_block_bytes(device: torch.device) -> int:
    """Bytes one float32 [B, chunk] score block may take: _SCORE_BLOCK_BYTES, and on CUDA at most an
    eighth of the memory torch can still get (room for a float16 twin of the block and top-k's
    own buffers, which can be several times the block)."""
    budget = _SCORE_BLOCK_BYTES
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = min(budget, free // 8)
    return budget


def torch_search(queries: torch.Tensor, keys: torch.Tensor, key_norms: torch.Tensor | None, k: int, metric: str):
    """Chunked matmul + top-k.

    queries: float32 [B, dim], on the keys' device.
    keys: float32 or float16 [N, dim]. key_norms: float32 [N] (||k||^2), for l2.
    Returns (distances float32 [B, k], rows int64 [B, k]) as numpy arrays.

    The rows are scanned in chunks whose [B, chunk] score block fits _score_block_bytes (1 GiB:
    65,536 rows at B=4096, all of 100,000 rows in one chunk up to B=2684). One chunk takes
    one sorted top-k; with several, each chunk's top-k is merged into a running top-k, unsorted,
    and sorted once at the end.
    """
    batch, stored = queries.shape[0], keys.shape[0]
    k_found = min(k, stored)
    if k_found == 0:
        return pad_results(np.empty((batch, 0), np.float32), np.empty((batch, 0), np.int64), k)
    chunk = max(1024, _score_block_bytes(keys.device) // (4 * max(batch, 1)))
    one_chunk = chunk >= stored
    q = queries.to(keys.dtype)
    query_norms = (queries.float() ** 2).sum(dim=1, keepdim=True) if metric == "l2" else None
    best_d = best_i = None
    for start in range(0, stored, chunk):
        block = keys[start : start + chunk]
        scores = (q @ block.T).float()  # a new float32 block (a cast of a float16 one)
        if metric == "l2":  # in place: ||q||^2 - 2 q.k + ||k||^2, clamped at 0 against round-off
            distances = scores.mul_(-2.0).add_(query_norms).add_(key_norms[start : start + chunk][None, :])
            distances.clamp_min_(0.0)
        else:
            distances = scores.neg_()
        d, i = torch.topk(distances, min(k_found, block.shape[0]), dim=1, largest=False, sorted=one_chunk)
        del scores, distances
        if best_d is None:
            best_d, best_i = d, i
        else:
            i += start
            best_d, order = torch.topk(torch.cat([best_d, d], dim=1), k_found, dim=1, largest=False, sorted=False)
            best_i = torch.gather(torch.cat([best_i, i], dim=1), 1, order)
    if not one_chunk:
        best_d, order = torch.sort(best_d, dim=1)
        best_i = torch.gather(best_i, 1, order)
    return pad_results(best_d.cpu().numpy(), best_i.cpu().numpy().astype(np.int64, copy=False), k)
