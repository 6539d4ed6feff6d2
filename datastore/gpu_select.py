"""One pass over a GPU score block: the distances, and each query's entries below its threshold.

The torch kernel of flat_index scans the stored rows in chunks: a matmul writes a [B, chunk] float32
score block, the distances are a per-query multiply and add and a per-row add of the scores, and
only entries below the query's current k-th best distance can enter its top-k. Done with torch
operations that is five or six passes over the block (multiply, add, compare, count, compact),
each about as long as the matmul that wrote it at B=4096 (measured on an H100: 2M x 1024 float16
keys, B=4096, k=32: 28 ms of matmul, 150 ms of passes). This Triton kernel reads the block once:
it forms each distance, compares it with the query's threshold, and appends the entries below it to
the query's row of an output block (one atomic add per tile of a query's row reserves the tile's
slots).

Available where Triton imports and the block is on a CUDA device; flat_index falls back to torch
operations elsewhere (the same entries, in another order within a query: the caller takes a top-k of
them, so the order does not matter).
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds (CI) have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


BELOW_TILE = (1024, 4)      # rows, warps per program of _below_kernel
RERANK_TILE = (32, 128, 4)  # candidates, dims, warps per program of _rerank_kernel


def available(scores: torch.Tensor) -> bool:
    return triton is not None and scores.is_cuda


if triton is not None:

    @triton.jit
    def _below_kernel(scores, stride, row_mul, row_add, col_add, threshold, counts, out_d, out_i,
                      width, start, capacity, CLAMP: tl.constexpr, BLOCK: tl.constexpr):
        """One query (program_id 0), BLOCK rows of the block (program_id 1). The tile's entries below
        the threshold take consecutive slots from one atomic add to the query's counter."""
        query = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < width
        s = tl.load(scores + query.to(tl.int64) * stride + cols, mask=inside, other=0.0)
        d = s * tl.load(row_mul + query) + tl.load(row_add + query)
        d = d + tl.load(col_add + start + cols, mask=inside, other=0.0)
        if CLAMP:
            d = tl.maximum(d, 0.0)
        below = (inside & (d < tl.load(threshold + query))).to(tl.int32)
        found = tl.sum(below, axis=0)
        if found > 0:
            first = tl.atomic_add(counts + query, found)
            slot = first + tl.cumsum(below, axis=0) - 1
            kept = (below > 0) & (slot < capacity)
            where = query.to(tl.int64) * capacity + slot
            tl.store(out_d + where, d, mask=kept)
            tl.store(out_i + where, (cols + start).to(tl.int64), mask=kept)

    @triton.jit
    def _rerank_kernel(queries, keys, candidates, out, dim, keep, query_stride, key_stride,
                       L2: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
        query = tl.program_id(0)
        slots = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        slot_in = slots < keep
        rows = tl.load(candidates + query.to(tl.int64) * keep + slots, mask=slot_in, other=0)
        total = tl.zeros([BLOCK_C], dtype=tl.float32)
        for first in range(0, dim, BLOCK_D):
            dims = first + tl.arange(0, BLOCK_D)
            dim_in = dims < dim
            q = tl.load(queries + query.to(tl.int64) * query_stride + dims, mask=dim_in, other=0.0)
            k = tl.load(keys + rows[:, None] * key_stride + dims[None, :], mask=slot_in[:, None] & dim_in[None, :],
                        other=0.0).to(tl.float32)
            if L2:
                difference = k - q[None, :]
                total += tl.sum(difference * difference, axis=1)
            else:
                total += tl.sum(k * q[None, :], axis=1)
        if not L2:
            total = -total
        tl.store(out + query.to(tl.int64) * keep + slots, total, mask=slot_in)


def rerank_distances(queries: torch.Tensor, keys: torch.Tensor, candidates: torch.Tensor, metric: str) -> torch.Tensor:
    """Exact float32 distances from each query to its candidate rows, [B, keep]: sum of (q - k)^2 (l2)
    or -sum of q * k (ip), the keys read where they are stored (float16) and upcast in registers,
    none gathered into memory. queries: float32 [B, dim]; candidates: int64 [B, keep]."""
    queries, candidates = queries.contiguous(), candidates.contiguous()
    batch, keep = candidates.shape
    out = torch.empty((batch, keep), dtype=torch.float32, device=queries.device)
    block_c, block_d, warps = RERANK_TILE
    grid = (batch, triton.cdiv(keep, block_c))
    _rerank_kernel[grid](queries, keys, candidates, out, keys.shape[1], keep, queries.stride(0), keys.stride(0),
                         L2=metric == "l2", BLOCK_C=block_c, BLOCK_D=block_d, num_warps=warps)
    return out


def below_threshold(scores: torch.Tensor, row_mul: torch.Tensor, row_add: torch.Tensor, col_add: torch.Tensor,
                    clamp: bool, threshold: torch.Tensor, start: int, capacity: int):
    """Distances d = scores * row_mul[:, None] + row_add[:, None] + col_add[None, start:start + width]
    (then max(d, 0) if clamp) of a [B, width] float32 block, and each query's entries with
    d < threshold, packed to the left of a [B, widest] block (distances, rows + start; +inf past each
    query's count). Returns (distances, rows), (None, None) if no query has any, or None if some
    query has more than `capacity` of them (the caller takes a full top-k of that block instead).
    row_mul, row_add, threshold: float32 [B]; col_add: float32 [rows stored], contiguous. The output
    block is [B, capacity], so capacity is what one call may allocate: a few times k, not the chunk."""
    batch, width = scores.shape
    counts = torch.zeros(batch, dtype=torch.int32, device=scores.device)
    out_d = torch.empty((batch, capacity), dtype=torch.float32, device=scores.device)  # filled below, to widest
    out_i = torch.empty((batch, capacity), dtype=torch.int64, device=scores.device)
    block, warps = BELOW_TILE
    _below_kernel[(batch, triton.cdiv(width, block))](
        scores, scores.stride(0), row_mul, row_add, col_add, threshold, counts, out_d, out_i, width, start, capacity,
        CLAMP=clamp, BLOCK=block, num_warps=warps)
    widest = int(counts.max())
    if widest == 0:
        return None, None
    if widest > capacity:
        return None
    past = torch.arange(widest, device=scores.device)[None, :] >= counts[:, None]  # slots no entry took
    return out_d[:, :widest].masked_fill_(past, float("inf")), out_i[:, :widest].masked_fill_(past, start)
