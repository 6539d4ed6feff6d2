"""Exact (flat) k-nearest-neighbour search over a block of stored keys.

Two kernels with the same contract:
- ``faiss``: faiss's brute-force kernel (the one behind IndexFlatL2 /
  IndexFlatIP) run directly on the row store's float32 key buffer, so keys
  are held once, not copied into a separate index.
- ``torch``: matmul + top-k, chunked over the stored rows so the [B, chunk]
  score block stays bounded; used when the store lives on a CUDA device
  (keys may be float16 there). The first chunk takes a top-k; later ones
  only pass on the entries below each query's best so far (on a GPU in one
  Triton pass over the block, datastore/gpu_select.py; for 32-64 queries over
  float16 keys in one Triton kernel with the matmul, no block written at all,
  and over many rows in one such pass at thresholds set from a sample). float16 keys give
  what float32 search over the rounded keys gives: a float16 matmul screens
  candidates, which are then ranked again exactly in float32 with the
  unrounded queries (on a GPU by a Triton kernel that reads the candidates'
  keys where they are stored).

Both return distances where smaller is nearer: squared L2 for ``l2``, the
negative inner product for ``ip``; slots past the number of rows are id -1
and distance +inf.
"""

from __future__ import annotations

import numpy as np
import torch
from monim.datastore import gpu_select
from monim.datastore.transfer import to_host

MISSING = -1
# Most bytes of one [B, chunk] float32 score block in the torch kernel (see _score_block_bytes).
_SCORE_BLOCK_BYTES = 1 << 30
# A whole score block this small is taken without asking the device how much memory is left (the
# question costs about 0.5 ms, a fifth of a B=1 search over 1M keys on an H100).
_SMALL_SCORE_BLOCK_BYTES = 64 << 20
# Rows of the first chunk of a scan of FIRST_CHUNK_MIN_BATCH queries or more at most (the one chunk
# that takes a full top-k); later chunks double up to the score block's size (see _chunk_bounds).
# None: every chunk as large as the block. On an H100, 10M x 1024 float16 keys: B=64 16.9 -> 12.6 ms
# (k=32) and 17.5 -> 14.7 ms (k=1024) with 2^19 rows; B=1 took 8.9 -> 10.9 ms with it (one long
# row's top-k is cheap), hence the batch floor. 2^16 rather than 2^19: over 1M x 768 float16 keys
# batches of 256 to 2048 queries took 10-45% less (B=1024, k=1024: 14.7 -> 11.5 ms; B=512, k=32:
# 11.6 -> 6.5 ms; docs/BENCHMARKS.md, "Search split into calls"), B=64 and B=4096 the same.
FIRST_CHUNK_ROWS: int | None = 1 << 16
FIRST_CHUNK_MIN_BATCH = 32
# The sampled scan of screened batches (_sampled_candidates): a strided sample of the rows sets each
# query's threshold. Its rows (_sample_rows): enough that about SAMPLE_RANK of them fall below a
# query's keep-th best, but at most 1 / SAMPLE_MIN_STEP of the rows, SAMPLE_MAX_BYTES of [B, sample]
# float32 scores and SAMPLE_MAX_READ bytes of keys (a smaller sample gives looser thresholds: more
# entries pass); none below SAMPLE_MIN_ROWS (then the doubling chunks of _chunked_topk). Thresholds
# and the output's capacity are set SAMPLE_SIGMAS standard deviations wide. On an H100, B=64 and 32,
# k 32 to 4096: 1.02-1.20x faster than the chunks over 10M x 1024 float16 keys, 1.37-1.57x over 1M x
# 768 (docs/BENCHMARKS.md, twentieth session).
SAMPLE_RANK = 48
SAMPLE_MIN_ROWS = 1 << 16
SAMPLE_MIN_STEP = 8
SAMPLE_MAX_BYTES = 256 << 20
SAMPLE_MAX_READ = 512 << 20
SAMPLE_SIGMAS = 5.0


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


def _score_block_bytes(device: torch.device, whole: int) -> int:
    """Bytes one float32 [B, chunk] score block may take, ``whole`` being the bytes of every score of
    the search at once: all of them when that is small (_SMALL_SCORE_BLOCK_BYTES); else
    _SCORE_BLOCK_BYTES, and on CUDA at most an eighth of the memory torch can still get (room for a
    float16 twin of the block and top-k's own buffers, which can be several times the block)."""
    if whole <= _SMALL_SCORE_BLOCK_BYTES:
        return max(whole, 1)
    budget = _SCORE_BLOCK_BYTES
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # The nested form: torch.cuda.memory_reserved() flattens every statistic in Python first.
        stats = torch.cuda.memory_stats_as_nested_dict(device)
        free += stats["reserved_bytes"]["all"]["current"] - stats["allocated_bytes"]["all"]["current"]
        budget = min(budget, free // 8)
    return budget


def _score_blocks(device: torch.device, batch: int, stored: int) -> tuple[int, int]:
    """(_score_block_bytes of a search of batch queries over stored rows, the rows of one block)."""
    block_bytes = _score_block_bytes(device, 4 * batch * stored)
    return block_bytes, max(1024, block_bytes // (4 * max(batch, 1)))


def one_block(batch: int, stored: int) -> bool:
    """Whether a search of batch queries over stored rows scans them as one score block: no chunk
    filtered against a threshold, nothing the host must look at before the answer is made (so the
    search can be captured as a CUDA graph: datastore/search_graphs.py)."""
    return 4 * batch * stored <= _SMALL_SCORE_BLOCK_BYTES


def _candidate_count(k: int, stored: int) -> int:
    """Candidates the float16 screen keeps per query for the exact float32 re-rank: 2k + 16, at most
    every row. The margin absorbs the screen's error (queries rounded to float16)."""
    return min(2 * k + 16, stored)


# |q.k| bound the float16 screen scales each query to, far below float16's largest value (65504), so
# neither the product nor a partial sum of it overflows even with the key norms off by rounding.
_SCREEN_SCORE_BOUND = 2.0**14
_takes_out_dtype: dict[str, bool] = {}  # device type -> whether torch.mm takes out_dtype=float32 for float16


def _half_matmul_float(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a float16 [B, dim] @ b float16 [dim, chunk] -> float32 [B, chunk].

    Accumulated and written in float32 where torch.mm takes out_dtype (CUDA in recent torch): cuBLAS may
    otherwise reduce in float16. Elsewhere (CPU) a float16 product, cast."""
    kind = a.device.type
    if kind not in _takes_out_dtype:  # probed once per device type, on a 1x1 product
        probe = torch.zeros(1, 1, dtype=torch.float16, device=a.device)
        try:
            torch.mm(probe, probe, out_dtype=torch.float32)
            _takes_out_dtype[kind] = True
        except (TypeError, NotImplementedError, RuntimeError):
            _takes_out_dtype[kind] = False
    if _takes_out_dtype[kind]:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b).float()


def _merge(best_d, best_i, d, i, keep: int):
    """The `keep` smallest of two unsorted candidate sets (distances, rows) per query."""
    if best_d is None:
        return d, i
    merged = torch.cat([best_d, d], dim=1)  # fewer than keep while keep exceeds the rows seen
    best_d, order = torch.topk(merged, min(keep, merged.shape[1]), dim=1, largest=False, sorted=False)
    return best_d, torch.gather(torch.cat([best_i, i], dim=1), 1, order)


class _Distances:
    """How a block of matmul scores becomes distances (smaller is nearer):
    d = score * row_mul[query] + row_add[query] + col_add[row], then max(d, 0) if clamp.
    row_mul, row_add: float32 [B]; col_add: float32 [rows stored] (zeros where not needed)."""

    def __init__(self, row_mul: torch.Tensor, row_add: torch.Tensor, col_add: torch.Tensor, clamp: bool):
        self.row_mul, self.row_add, self.col_add, self.clamp = row_mul, row_add, col_add.contiguous(), clamp

    def apply_(self, scores: torch.Tensor, start: int, step: int = 1) -> torch.Tensor:
        """The distances, in place of the scores of the rows start, start + step, ... (step > 1: a
        strided sample of the rows, their col_add read in place)."""
        scores.mul_(self.row_mul[:, None]).add_(self.row_add[:, None])
        scores.add_(self.col_add[start : start + scores.shape[1] * step : step][None, :])
        return scores.clamp_min_(0.0) if self.clamp else scores

    def below(self, scores: torch.Tensor, threshold: torch.Tensor, start: int, most: int):
        """Each query's distances below its threshold, packed to the left of a [B, widest] block
        (distances, rows + start; the rest +inf); (None, None) if no query has any; None if some
        query has more than `most` (the scores are left as they were). One pass on a GPU
        (gpu_select); elsewhere the distances are formed in place and the entries compacted."""
        if gpu_select.available(scores):
            return gpu_select.below_threshold(scores, self.row_mul, self.row_add, self.col_add, self.clamp,
                                              threshold, start, most)
        below = self.apply_(scores.clone(), start) < threshold[:, None]
        counts = below.sum(dim=1)
        widest = int(counts.max())
        if widest == 0:
            return None, None
        if widest > most:
            return None
        distances = self.apply_(scores, start)
        queries, rows = below.nonzero(as_tuple=True)  # row-major: each query's entries together
        slots = torch.arange(queries.numel(), device=scores.device) - (torch.cumsum(counts, 0) - counts)[queries]
        packed_d = torch.full((scores.shape[0], widest), float("inf"), dtype=scores.dtype, device=scores.device)
        packed_i = torch.zeros((scores.shape[0], widest), dtype=torch.int64, device=scores.device)
        packed_d[queries, slots] = distances[queries, rows]
        packed_i[queries, slots] = rows + start
        return packed_d, packed_i


def _chunk_bounds(stored: int, chunk: int, keep: int, batch: int, screened: bool = False):
    """(start, end) of each chunk of a scan: for a batch of FIRST_CHUNK_MIN_BATCH queries or more, a
    first chunk of at most FIRST_CHUNK_ROWS rows (but at least 8 * keep), then chunks as large as all
    the rows before them, up to ``chunk`` (without that bound if ``screened``: a screened chunk writes
    no score block); else every chunk ``chunk`` rows. The first
    chunk's top-k over a [B, rows] block is the scan's dearest step at small B (64 queries over 4M
    rows: a top-k over 64 very long rows), and a chunk as large as all rows before it has about keep
    entries per query below the threshold, as _filter_capacity expects of chunks in no order."""
    capped = FIRST_CHUNK_ROWS is not None and batch >= FIRST_CHUNK_MIN_BATCH
    size = min(chunk, max(FIRST_CHUNK_ROWS, 8 * keep)) if capped else chunk
    start = 0
    while start < stored:
        end = min(stored, start + size)
        yield start, end
        start = end
        size = start if screened else min(chunk, start)


def _filter_capacity(keep: int, rows: int) -> int:
    """Most entries one query may have below its threshold in a filtered chunk before the chunk takes a
    top-k instead: about keep of them in the second chunk, keep / i in the i-th for rows in no
    particular order; more only when rows are stored in order of distance."""
    return min(rows, 2 * keep + 64)


def _chunked_topk(keys: torch.Tensor, block_scores, distances: _Distances, keep: int, chunk: int, sort: bool,
                  screen=None, checked: bool = False):
    """Each query's `keep` smallest distances over all rows, scanned `chunk` rows at a time.

    block_scores(start, block) -> float32 [B, rows in block], the matmul scores that `distances`
    turns into distances; it may reuse its own buffers. The first chunk takes a top-k. Later chunks
    are filtered first: only entries below the query's current keep-th best can enter its set, and
    in a chunk of rows in no particular order there are about keep / i of them in the i-th chunk,
    so the top-k of the merge runs on a few candidates rather than on the chunk, and once for
    several chunks (when their candidates add up to keep). A chunk where some
    query has more than _filter_capacity entries below its threshold (rows stored in order of
    distance) takes a top-k instead. The result is the same either way. Unsorted until the end;
    sorted there if `sort`.

    screen(start, end, threshold, most) -> (distances, rows, counts): the filter of a later chunk in
    one kernel with its matmul (gpu_select.screen_below: no score block), in place of block_scores +
    distances.below. Screened chunks double past `chunk` rows and are merged one by one, without
    waiting for the GPU: whether some query had more than `most` entries in a chunk is left to the
    caller, which scans again `checked` if one had (each screened chunk's counts read at once, a chunk
    past its capacity taken by a top-k of its blocks).
    Returns (distances float32 [B, keep], rows int64 [B, keep], overflowed) on the keys' device;
    overflowed: a device bool, whether some unchecked screened chunk passed more entries than it kept
    (then the answer may be wrong), or None where no chunk was screened unchecked.
    """
    stored = keys.shape[0]
    bounds = list(_chunk_bounds(stored, chunk, keep, distances.row_mul.shape[0], screened=screen is not None))
    one_chunk = len(bounds) == 1
    best_d = best_i = None
    overflowed = None  # a device bool: some unchecked screened chunk passed more entries than it kept
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # entries below the threshold, merged by the keep

    def merge_pending():
        nonlocal best_d, best_i
        if pending:
            best_d, best_i = _merge(best_d, best_i, torch.cat([d for d, _ in pending], dim=1),
                                    torch.cat([i for _, i in pending], dim=1), keep)
            pending.clear()

    for start, end in bounds:
        scores = None
        if best_d is not None and best_d.shape[1] == keep:
            # The threshold of the last merge: above the true one while entries wait, so a few more pass.
            threshold, most = best_d.amax(dim=1), _filter_capacity(keep, end - start)
            if screen is not None:
                d, i, counts = screen(start, end, threshold, most)
                if not checked:
                    over = counts.max() > most
                    overflowed = over if overflowed is None else overflowed | over
                    best_d, best_i = _merge(best_d, best_i, d, i, keep)
                    continue
                below = gpu_select.packed(counts, d, i, most, start)
            else:
                scores = block_scores(start, keys[start:end])
                below = distances.below(scores, threshold, start, most)
            if below is not None:
                if below[0] is not None:
                    pending.append(below)
                    if screen is not None or sum(d.shape[1] for d, _ in pending) >= keep:
                        merge_pending()
                continue
        for block_start in range(start, end, chunk):  # one block, but a screened chunk may span several
            block_end = min(end, block_start + chunk)
            block, scores = (block_scores(block_start, keys[block_start:block_end]) if scores is None else scores), None
            block_d = distances.apply_(block, block_start)
            d, i = torch.topk(block_d, min(keep, block_end - block_start), dim=1, largest=False,
                              sorted=one_chunk and sort)
            del block_d, block
            best_d, best_i = _merge(best_d, best_i, d, i.add_(block_start), keep)
    merge_pending()
    if sort and not one_chunk:
        best_d, order = torch.sort(best_d, dim=1)
        best_i = torch.gather(best_i, 1, order)
    return best_d, best_i, overflowed


def _sample_rows(keys: torch.Tensor, batch: int, keep: int) -> int:
    """How many rows _sampled_candidates samples for a search of batch queries keeping keep candidates:
    about SAMPLE_RANK * stored / keep, within the bounds above; 0 where it takes no sample."""
    stored = keys.shape[0]
    rows = min(max(SAMPLE_MIN_ROWS, -(-SAMPLE_RANK * stored // keep)), stored // SAMPLE_MIN_STEP,
               SAMPLE_MAX_BYTES // (4 * batch), SAMPLE_MAX_READ // max(1, keys.shape[1] * keys.element_size()))
    return rows if rows >= SAMPLE_MIN_ROWS else 0


def _sample_rank(expected: float, rows: int) -> int:
    """The rank r of a query's threshold among its sample's distances, where `expected` sample rows fall
    below its keep-th best: the fraction of all rows below the r-th sample distance has mean r / rows
    and standard deviation about sqrt(r) / rows, so with r - SAMPLE_SIGMAS sqrt(r) >= expected fewer
    than keep rows fall below it only past SAMPLE_SIGMAS standard deviations."""
    root = (SAMPLE_SIGMAS + (SAMPLE_SIGMAS**2 + 4 * expected) ** 0.5) / 2
    return min(rows, int(root * root) + 1)


def _sampled_candidates(keys: torch.Tensor, block_scores, distances: _Distances, keep: int, screen):
    """Each query's `keep` best rows by one screened pass over all rows at a threshold set from a sample.

    The sample: S = _sample_rows rows, every step-th. Of them about e = keep * S / stored fall below a
    query's keep-th best distance over all rows; the threshold is the query's r-th best sample
    distance (_sample_rank: fewer than keep rows below it only past SAMPLE_SIGMAS standard deviations,
    for rows in no particular order), so that r * stored / S entries of all rows fall below it (1.2-2
    keep where e is 48 or more; more where the sample is smaller, which costs atomic adds, not passes).
    The screen then passes each query's entries below its threshold in one kernel launch (no running
    set, no merge per chunk, where the chunked scan passes about keep per chunk), and a top-k of them
    is the answer. That holds when every query has between keep and the output's capacity (its
    expected count SAMPLE_SIGMAS standard deviations wide, + 64) entries below: all rows not passed
    are then farther than every entry passed.
    Returns (rows int64 [B, keep], unsorted; unsure): unsure a device bool, left for the caller to read
    once it has queued the re-rank, True where some query's count says the answer may be wrong (a
    sample unlike the rest of the rows: the caller scans in chunks instead).
    """
    stored, batch = keys.shape[0], distances.row_mul.shape[0]
    rows = _sample_rows(keys, batch, keep)
    step = stored // rows
    sample = keys[: rows * step : step]
    rank = _sample_rank(keep * rows / stored, rows)
    sample_d = distances.apply_(block_scores(0, sample), 0, step)
    # amax of the rank best, not kthvalue: one launch, but one thread block per query (0.26 ms where the
    # multi-block top-k took 0.1 over 64 x 65k sample distances on an H100).
    threshold = torch.topk(sample_d, rank, dim=1, largest=False, sorted=False).values.amax(dim=1)
    del sample_d
    capacity = min(stored, int((rank + SAMPLE_SIGMAS * rank**0.5 + 5) * stored / rows) + 64)
    passed_d, passed_i, counts = screen(0, stored, threshold, capacity)
    unsure = ((counts < keep) | (counts > capacity)).any()
    order = torch.topk(passed_d, keep, dim=1, largest=False, sorted=False).indices
    return torch.gather(passed_i, 1, order), unsure


def _float32_nearest(queries, keys, key_norms, k_found, metric, chunk):
    """The exact kernel for float32 keys: ||q||^2 - 2 q.k + ||k||^2 (l2) or -q.k (ip) from one matmul."""
    q = queries.to(keys.dtype)
    batch = q.shape[0]
    if metric == "l2":  # clamped at 0 against round-off
        distances = _Distances(torch.full((batch,), -2.0, device=q.device), (queries.float() ** 2).sum(dim=1),
                               key_norms, clamp=True)
    else:
        distances = _Distances(torch.full((batch,), -1.0, device=q.device), torch.zeros(batch, device=q.device),
                               torch.zeros(keys.shape[0], device=q.device), clamp=False)
    return _chunked_topk(keys, lambda start, block: q @ block.T, distances, k_found, chunk, sort=True)[:2]


def _float16_scans(keys: torch.Tensor, batch: int, keep: int) -> tuple[str, ...]:
    """The scans _float16_candidates takes in turn for a search, each until one's answer holds: for the
    batches the screen kernel serves, the sampled pass (where it takes a sample: _sample_rows), then
    the chunked scan (its chunks' counts read once, at the end), then the chunked scan with each
    chunk's counts read at once; elsewhere the chunked scan, its filter checked chunk by chunk as it
    goes."""
    if not gpu_select.screens(keys, batch):
        return ("chunked",)
    if _sample_rows(keys, batch, keep):
        return ("sampled", "chunked", "checked")
    return ("chunked", "checked")


def _scaled_queries(queries: torch.Tensor, key_squared: torch.Tensor, l2: bool):
    """(the queries scaled and rounded to float16 [B, dim], row_mul float32 [B]) for the float16 screen.

    Each query is scaled by a power of two so that |q.k| <= _SCREEN_SCORE_BOUND for every key
    (Cauchy-Schwarz with the largest key length, the square root of key_squared, a 0-d float32
    tensor): unscaled, LM hidden states (norms of a few hundred) overflow float16 scores, and tiny
    queries would fall into float16's subnormals. row_mul turns the scaled scores into distances:
    -2 / scale (l2), -1 (ip: the per-query scale does not change a query's order). On a GPU one
    Triton kernel (gpu_select.scaled_queries: a dozen launches fewer), elsewhere torch operations.
    """
    if gpu_select.available(queries):
        return gpu_select.scaled_queries(queries, key_squared, l2, _SCREEN_SCORE_BOUND)
    queries = queries.float()
    # The scaled query's own length is kept under the bound too (key length >= 1), so its entries fit.
    bound = queries.norm(dim=1) * key_squared.sqrt().clamp_min(1.0)
    exponent = torch.floor(torch.log2(_SCREEN_SCORE_BOUND / bound)).clamp_(-120.0, 120.0)  # a zero query: +inf
    scale = torch.exp2(exponent)
    row_mul = -2.0 / scale if l2 else torch.full_like(scale, -1.0)
    return (queries * scale[:, None]).to(torch.float16), row_mul


def _float16_candidates(queries, keys, key_norms, keep, metric, chunk, scan: str):
    """The float16 screen: each query's `keep` best rows by a float16 matmul, unsorted, rows int64 [B, keep],
    by the scan named (one of _float16_scans'), and whether they are unsure: a device bool (True: some
    query's counts say the rows may be wrong, see _sampled_candidates and _chunked_topk) or None.

    The queries are scaled (_scaled_queries); for l2 the screen ranks by ||k||^2 - 2 q.k (||q||^2 is
    the same for every row of a query).
    """
    if key_norms is not None:
        key_squared = key_norms.max()
    else:
        key_squared = keys.abs().max().float() ** 2 * keys.shape[1]
    q, row_mul = _scaled_queries(queries, key_squared, metric == "l2")
    batch = q.shape[0]
    col_add = key_norms if metric == "l2" else torch.zeros(keys.shape[0], device=q.device)
    distances = _Distances(row_mul, torch.zeros(batch, device=q.device), col_add, clamp=False)

    def block_scores(start, block):
        return _half_matmul_float(q, block.T)

    screen = None
    if gpu_select.screens(keys, batch):
        def screen(start, end, threshold, most):
            return gpu_select.screen_below(q, keys, distances.row_mul, distances.row_add, distances.col_add,
                                           distances.clamp, threshold, start, end, most)
        if scan == "sampled":
            return _sampled_candidates(keys, block_scores, distances, keep, screen)
    _, rows, overflowed = _chunked_topk(keys, block_scores, distances, keep, chunk, sort=False, screen=screen,
                                        checked=scan == "checked")
    return rows, overflowed


def _rerank(queries, keys, candidates, k_found, metric, block_bytes):
    """Exact float32 distances to the candidate rows, the keys upcast from float16: sum of (q - k)^2 (l2),
    -sum of q*k (ip); elementwise, so neither cancellation in ||q||^2 - 2 q.k + ||k||^2 nor TF32 matmul
    touches them. Queries are taken in groups whose gathered keys ([b, keep, dim], float16 and a float32
    copy) fit block_bytes (None where the Triton kernel re-ranks: it copies nothing). Returns each
    query's k_found best, sorted: (distances [B, k_found], rows).
    """
    queries = queries.float()
    batch, keep = candidates.shape
    if gpu_select.available(keys):  # one kernel: the candidates' keys are read once, never copied
        distances = gpu_select.rerank_distances(queries, keys, candidates, metric)
        d, order = torch.topk(distances, k_found, dim=1, largest=False, sorted=True)
        return d, torch.gather(candidates, 1, order)
    group = max(1, block_bytes // (6 * keep * keys.shape[1]))
    parts_d, parts_i = [], []
    for start in range(0, batch, group):
        rows = candidates[start : start + group]
        q = queries[start : start + group, None, :]
        gathered = keys[rows].float()
        if metric == "l2":
            distances = gathered.sub_(q).square_().sum(dim=2)
        else:
            distances = gathered.mul_(q).sum(dim=2).neg_()
        del gathered
        d, order = torch.topk(distances, k_found, dim=1, largest=False, sorted=True)
        parts_d.append(d)
        parts_i.append(torch.gather(rows, 1, order))
    return torch.cat(parts_d), torch.cat(parts_i)


def torch_search(queries: torch.Tensor, keys: torch.Tensor, key_norms: torch.Tensor | None, k: int, metric: str):
    """torch_nearest's answer as numpy arrays: (distances float32 [B, k], rows int64 [B, k])."""
    distances, rows = torch_nearest(queries, keys, key_norms, k, metric)
    return to_host(distances), to_host(rows)


def torch_nearest(queries: torch.Tensor, keys: torch.Tensor, key_norms: torch.Tensor | None, k: int, metric: str):
    """Chunked matmul + top-k.

    queries: float32 (or float16) [B, dim], on the keys' device; never rounded further.
    keys: float32 or float16 [N, dim]. key_norms: float32 [N] (||k||^2 of the keys as stored), for l2.
    Returns (distances float32 [B, k], rows int64 [B, k]) on the keys' device, padded with
    (+inf, -1) past the rows stored.

    float32 keys: one exact pass. The rows are scanned in chunks whose [B, chunk] score block fits
    _score_block_bytes (1 GiB: 65,536 rows at B=4096, all of 100,000 rows in one chunk up to B=2684).
    float16 keys, in two stages:
    1. screen: the same chunked scan with a float16 matmul (queries scaled against overflow, float32
       output where torch allows), keeping _candidate_count(k) rows per query; for 32-64 queries
       over many rows, one screened pass at thresholds from a sample of the rows instead
       (_sampled_candidates; _float16_scans names the scans tried, in turn, until one's counts hold);
    2. re-rank: exact float32 distances from those rows' keys upcast to float32 and the float32
       queries, top-k of them. The answers are those of float32 search over the rounded keys, unless
       a true neighbour ranks past the candidates in the screen.
    """
    batch, stored = queries.shape[0], keys.shape[0]
    k_found = min(k, stored)
    if k_found == 0:
        best_d = torch.empty((batch, 0), dtype=torch.float32, device=keys.device)
        best_i = torch.empty((batch, 0), dtype=torch.int64, device=keys.device)
    else:
        if keys.dtype == torch.float16:
            keep = _candidate_count(k_found, stored)
            block_bytes = chunk = None  # asked of the device (about 0.5 ms) only for a scan in chunks
            for scan in _float16_scans(keys, batch, keep):
                if scan != "sampled" and block_bytes is None:
                    block_bytes, chunk = _score_blocks(keys.device, batch, stored)
                candidates, unsure = _float16_candidates(queries, keys, key_norms, keep, metric, chunk, scan)
                best_d, best_i = _rerank(queries, keys, candidates, k_found, metric, block_bytes)
                # Read once the re-rank is queued: the GPU runs it while the host waits for the answer.
                if unsure is None or not bool(unsure):
                    break
        else:
            best_d, best_i = _float32_nearest(queries, keys, key_norms, k_found, metric,
                                              _score_blocks(keys.device, batch, stored)[1])
    if k_found < k:
        best_d = torch.cat([best_d, best_d.new_full((batch, k - k_found), float("inf"))], dim=1)
        best_i = torch.cat([best_i, best_i.new_full((batch, k - k_found), MISSING)], dim=1)
    return best_d, best_i.long()
