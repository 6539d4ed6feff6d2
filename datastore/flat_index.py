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
# Bytes of one [B, chunk] float32 score block in the torch kernel.
_SCORE_BLOCK_BYTES = 1 << 28


def pad_results(distances: np.ndarray, rows: np.ndarray, k: int):
    """Pads [B, k'] results with (+inf, -1) up to [B, k]."""
    short = k - distances.shape[1]
    if short <= 0:
        return distances, rows
    batch = distances.shape[0]
    distances = np.concatenate([distances, np.full((batch, short), np.inf, np.float32)], axis=1)
    rows = np.concatenate([rows, np.full((batch, short), MISSING, np.int64)], axis=1)
    return distances, rows


def faiss_search(queries: np.ndarray, keys: np.ndarray, k: int, metric: str):
    """queries float32 [B, dim]; keys float32 [N, dim] (CPU) -> (distances float32 [B, k], rows int64 [B, k])."""
    import faiss

    stored = keys.shape[0]
    if stored == 0:
        return pad_results(np.empty((queries.shape[0], 0), np.float32), np.empty((queries.shape[0], 0), np.int64), k)
    k_found = min(k, stored)
    faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    D, I = faiss.knn(queries, keys, k_found, metric=faiss_metric)
    if metric == "ip":
        D = -D
    return pad_results(D.astype(np.float32, copy=False), I.astype(np.int64, copy=False), k)


def torch_search(queries: torch.Tensor, keys: torch.Tensor, key_norms: torch.Tensor | None, k: int, metric: str):
    """Chunked matmul + top-k.

    queries: float32 [B, dim], on the keys' device.
    keys: float32 or float16 [N, dim]. key_norms: float32 [N] (||k||^2), for l2.
    Returns (distances float32 [B, k], rows int64 [B, k]) as numpy arrays.
    """
    batch, stored = queries.shape[0], keys.shape[0]
    k_found = min(k, stored)
    if k_found == 0:
        return pad_results(np.empty((batch, 0), np.float32), np.empty((batch, 0), np.int64), k)
    chunk = max(1024, _SCORE_BLOCK_BYTES // (4 * max(batch, 1)))
    q = queries.to(keys.dtype)
    query_norms = (queries.float() ** 2).sum(dim=1, keepdim=True) if metric == "l2" else None
    best_d = best_i = None
    for start in range(0, stored, chunk):
        block = keys[start : start + chunk]
        scores = (q @ block.T).float()
        if metric == "l2":
            distances = (query_norms - 2.0 * scores + key_norms[start : start + chunk][None, :]).clamp_min_(0.0)
        else:
            distances = scores.neg_()
        d, i = torch.topk(distances, min(k_found, block.shape[0]), dim=1, largest=False, sorted=True)
        i = i + start
        if best_d is None:
            best_d, best_i = d, i
        else:
            merged_d = torch.cat([best_d, d], dim=1)
            merged_i = torch.cat([best_i, i], dim=1)
            best_d, order = torch.topk(merged_d, k_found, dim=1, largest=False, sorted=True)
            best_i = torch.gather(merged_i, 1, order)
    return pad_results(best_d.cpu().numpy(), best_i.cpu().numpy().astype(np.int64, copy=False), k)
