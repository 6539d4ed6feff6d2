"""The GPU passes of flat_index's scan: each query's entries below its threshold, from a score block or
straight from the keys; and the exact re-rank of float16 candidates.

The torch kernel of flat_index scans the stored rows in chunks: a matmul writes a [B, chunk] float32
score block, the distances are a per-query multiply and add and a per-row add of the scores, and
only entries below the query's current k-th best distance can enter its top-k. Done with torch
operations that is five or six passes over the block (multiply, add, compare, count, compact),
each about as long as the matmul that wrote it at B=4096 (measured on an H100: 2M x 1024 float16
keys, B=4096, k=32: 28 ms of matmul, 150 ms of passes). This Triton kernel reads the block once:
it forms each distance, compares it with the query's threshold, and appends the entries below it to
the query's row of an output block (each entry below takes its slot by an atomic add to the query's
counter).

For batches of SCREEN_MIN_BATCH to SCREEN_MAX_BATCH queries over float16 keys (decoding and small
training batches, where the search is bound by reading the keys) a third kernel, _screen_kernel, does
the matmul too: the products stay in registers, and no score block is written or read at all.

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
# Tiles of _screen_kernel by batch: (most queries, (queries, rows, dims, warps, stages) per program).
# The first entry whose batch bound is at least the batch is taken.
# Measured on an H100 (10M x 1024 float16 keys, k 32/1024/4096, docs/BENCHMARKS.md): at B=48-64,
# 64 x 64 with 4 warps and 4 stages was the fastest of 16-64 x 64-256 (8.7/10.1/11.3 ms at B=64
# against 64 x 128's 9.7/10.5/12.4); at B=32, 32 x 128 at k >= 1024.
SCREEN_TILES = [
    (32, (32, 128, 64, 4, 4)),
    (None, (64, 64, 64, 4, 4)),
]
# The batches the screen serves. Smaller ones: one matmul and a top-k (a tile would waste most of its
# rows). Larger ones: cuBLAS and below_threshold, as the matmul is compute-bound there and Triton's is
# slower than cuBLAS's (at B=4096 its main loop alone took 35 ms against cuBLAS's 31 ms for 2M rows,
# and its epilogue as long again).
# At B=128 the screen was slower than cuBLAS and the filter for k >= 1024 (14.8 against 12.1 ms).
SCREEN_MIN_BATCH = 32
SCREEN_MAX_BATCH = 64
COUNTER_STRIDE = 32  # int32s between two queries' counters of _screen_kernel (32: one 128-byte line each)


def available(scores: torch.Tensor) -> bool:
    return triton is not None and scores.is_cuda


def screens(keys: torch.Tensor, batch: int) -> bool:
    """Whether screen_below serves a batch over these keys: float16 keys on a CUDA device, Triton, a
    batch of SCREEN_MIN_BATCH to SCREEN_MAX_BATCH queries."""
    return (triton is not None and keys.is_cuda and keys.dtype == torch.float16
            and SCREEN_MIN_BATCH <= batch <= SCREEN_MAX_BATCH)


def _screen_tile(batch: int):
    return next(tile for most, tile in SCREEN_TILES if most is None or batch <= most)


if triton is not None:

    @triton.jit
    def _below_kernel(scores, stride, row_mul, row_add, col_add, threshold, counts, out_d, out_i,
                      width, start, capacity, CLAMP: tl.constexpr, BLOCK: tl.constexpr):
        """One query (program_id 0), BLOCK rows of the block (program_id 1). Each entry below the
        threshold takes its slot by an atomic add to the query's counter: a few per program, and no
        reduction across the program's warps (a sum and a prefix sum per tile took twice as long:
        1.15 against 2.4 TB/s on an H200)."""
        query = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < width
        s = tl.load(scores + query.to(tl.int64) * stride + cols, mask=inside, other=0.0)
        d = s * tl.load(row_mul + query) + tl.load(row_add + query)
        d = d + tl.load(col_add + start + cols, mask=inside, other=0.0)
        if CLAMP:
            d = tl.maximum(d, 0.0)
        below = inside & (d < tl.load(threshold + query))
        slot = tl.atomic_add(counts + query + tl.zeros((BLOCK,), dtype=tl.int32), 1, mask=below, sem="relaxed")
        kept = below & (slot < capacity)
        where = query.to(tl.int64) * capacity + slot
        tl.store(out_d + where, d, mask=kept)
        tl.store(out_i + where, (cols + start).to(tl.int64), mask=kept)

    @triton.jit
    def _screen_kernel(queries, keys, row_mul, row_add, col_add, threshold, counts, out_d, out_i,
                       batch, width, start, capacity, dim, query_stride, key_stride, counter_stride,
                       CLAMP: tl.constexpr, EVEN_DIM: tl.constexpr,
                       BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """A [BLOCK_Q queries, BLOCK_R rows] tile of float16 products accumulated in float32, turned into
        distances in registers, and each query's entries below its threshold appended to its row of
        the output (an atomic add per entry below). No score block is written. Programs run
        query tiles fastest, so the programs in flight share a few row tiles: the keys are read from
        memory about once, the queries (a few MB) stay in the L2 cache."""
        program = tl.program_id(0)
        query_tiles = tl.cdiv(batch, BLOCK_Q)
        q_rows = (program % query_tiles) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        cols = (program // query_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
        q_in = q_rows < batch
        col_in = cols < width
        rows = (cols + start).to(tl.int64)
        dims = tl.arange(0, BLOCK_D)
        q_ptrs = queries + q_rows.to(tl.int64)[:, None] * query_stride + dims[None, :]
        k_ptrs = keys + rows[None, :] * key_stride + dims[:, None]
        acc = tl.zeros((BLOCK_Q, BLOCK_R), dtype=tl.float32)
        for first in range(0, dim, BLOCK_D):
            if EVEN_DIM:
                a = tl.load(q_ptrs, mask=q_in[:, None], other=0.0)
                b = tl.load(k_ptrs, mask=col_in[None, :], other=0.0)
            else:
                a = tl.load(q_ptrs, mask=q_in[:, None] & (dims[None, :] + first < dim), other=0.0)
                b = tl.load(k_ptrs, mask=col_in[None, :] & (dims[:, None] + first < dim), other=0.0)
            acc = tl.dot(a, b, acc)
            q_ptrs += BLOCK_D
            k_ptrs += BLOCK_D
        d = acc * tl.load(row_mul + q_rows, mask=q_in, other=0.0)[:, None]
        d = d + tl.load(row_add + q_rows, mask=q_in, other=0.0)[:, None]
        d = d + tl.load(col_add + rows, mask=col_in, other=0.0)[None, :]
        if CLAMP:
            d = tl.maximum(d, 0.0)
        limit = tl.load(threshold + q_rows, mask=q_in, other=float("-inf"))
        below = q_in[:, None] & col_in[None, :] & (d < limit[:, None])
        # Each entry below takes its slot by its own atomic add (a count and a prefix sum per query of
        # the tile took 0.85-0.93x longer at k >= 1024, where nearly every tile has a few entries below).
        if tl.sum(tl.sum(below.to(tl.int32), axis=1), axis=0) > 0:
            counters = counts + q_rows[:, None] * counter_stride
            slot = tl.atomic_add(counters + tl.zeros((BLOCK_Q, BLOCK_R), dtype=tl.int32), 1, mask=below, sem="relaxed")
            kept = below & (slot < capacity)
            where = q_rows.to(tl.int64)[:, None] * capacity + slot
            tl.store(out_d + where, d, mask=kept)
            tl.store(out_i + where, rows[None, :] + tl.zeros((BLOCK_Q, BLOCK_R), dtype=tl.int64), mask=kept)

    @triton.jit
    def _scaled_queries_kernel(queries, key_squared, out, row_mul, dim, query_stride, bound,
                               L2: tl.constexpr, BLOCK_D: tl.constexpr):
        """One query per program: its length, its power-of-two scale, its float16 row and row_mul."""
        query = tl.program_id(0)
        row = queries + query.to(tl.int64) * query_stride
        dims = tl.arange(0, BLOCK_D)
        total = tl.zeros([BLOCK_D], dtype=tl.float32)
        for first in range(0, dim, BLOCK_D):
            x = tl.load(row + first + dims, mask=first + dims < dim, other=0.0).to(tl.float32)
            total += x * x
        key_length = tl.maximum(tl.sqrt(tl.load(key_squared)), 1.0)
        exponent = tl.floor(tl.log2(bound / (tl.sqrt(tl.sum(total, axis=0)) * key_length)))  # a zero query: +inf
        scale = tl.exp2(tl.minimum(tl.maximum(exponent, -120.0), 120.0))
        for first in range(0, dim, BLOCK_D):
            inside = first + dims < dim
            x = tl.load(row + first + dims, mask=inside, other=0.0).to(tl.float32)
            tl.store(out + query.to(tl.int64) * dim + first + dims, (x * scale).to(tl.float16), mask=inside)
        if L2:
            tl.store(row_mul + query, -2.0 / scale)
        else:
            tl.store(row_mul + query, -1.0)

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


def scaled_queries(queries: torch.Tensor, key_squared: torch.Tensor, l2: bool, bound: float):
    """flat_index._scaled_queries in one kernel: (each query times 2^floor(log2(bound / (|q| max(|k|, 1))))
    clamped to 2^-120..2^120, rounded to float16 [B, dim]; row_mul float32 [B]: -2 / scale (l2) or -1).
    queries: float32 (or float16) [B, dim]; key_squared: the largest squared key length, a 0-d
    float32 tensor on the same device."""
    queries = queries.contiguous()
    batch, dim = queries.shape
    out = torch.empty((batch, dim), dtype=torch.float16, device=queries.device)
    row_mul = torch.empty(batch, dtype=torch.float32, device=queries.device)
    _scaled_queries_kernel[(batch,)](queries, key_squared, out, row_mul, dim, queries.stride(0), bound, L2=l2,
                                     BLOCK_D=min(triton.next_power_of_2(dim), 1024), num_warps=4)
    return out, row_mul


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
    return packed(counts, out_d, out_i, capacity, start)


def screen_below(queries: torch.Tensor, keys: torch.Tensor, row_mul: torch.Tensor, row_add: torch.Tensor,
                 col_add: torch.Tensor, clamp: bool, threshold: torch.Tensor, start: int, end: int, capacity: int):
    """below_threshold of the scores queries @ keys[start:end].T, without the score block: the float16
    products (accumulated in float32) become distances in the matmul's registers and only the entries
    below each query's threshold leave the kernel. queries: float16 [B, dim], contiguous; keys: float16
    [N, dim], rows contiguous; the other arguments as below_threshold's.
    Returns (distances [B, capacity], rows [B, capacity], counts [B]) without waiting for the GPU:
    each query's entries packed to the left (+inf and row `start` past them); a query whose count
    exceeds capacity lost the entries past it (the caller checks counts, or takes packed(...) of them)."""
    batch, dim = queries.shape
    assert keys.stride(1) == 1 and queries.stride(1) == 1
    counts = torch.zeros((batch, COUNTER_STRIDE), dtype=torch.int32, device=keys.device)
    out_d = torch.full((batch, capacity), float("inf"), dtype=torch.float32, device=keys.device)
    out_i = torch.full((batch, capacity), start, dtype=torch.int64, device=keys.device)
    block_q, block_r, block_d, warps, stages = _screen_tile(batch)
    grid = (triton.cdiv(batch, block_q) * triton.cdiv(end - start, block_r),)
    _screen_kernel[grid](queries, keys, row_mul, row_add, col_add, threshold, counts, out_d, out_i,
                         batch, end - start, start, capacity, dim, queries.stride(0), keys.stride(0),
                         COUNTER_STRIDE, CLAMP=clamp, EVEN_DIM=dim % block_d == 0,
                         BLOCK_Q=block_q, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps, num_stages=stages)
    return out_d, out_i, counts[:, 0]


def packed(counts: torch.Tensor, out_d: torch.Tensor, out_i: torch.Tensor, capacity: int, start: int):
    """The filled part of a [B, capacity] output: (distances, rows) up to the widest query's count, +inf
    and row `start` past each query's own; (None, None) if no query has any; None past capacity."""
    widest = int(counts.max())
    if widest == 0:
        return None, None
    if widest > capacity:
        return None
    past = torch.arange(widest, device=counts.device)[None, :] >= counts[:, None]  # slots no entry took
    return out_d[:, :widest].masked_fill_(past, float("inf")), out_i[:, :widest].masked_fill_(past, start)
