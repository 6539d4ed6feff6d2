"""The approximate index of an ``ivf_flat`` / ``ivf_pq`` namespace's store: faiss IVF, trained in
the background, swapped in atomically.

Lifecycle of one store's index (its ``state``, which DescribeNamespace shows per shard):
- ``exact``: fewer than ``train_min_rows`` rows; the store answers by exact search over its rows.
- ``training``: the threshold was reached (or the drift monitor asked for a retrain). On the
  index's worker thread, without the store's lock: a random sample of the keys (copied under the
  lock) trains a new faiss index; every row present when the build began is added to it in
  chunks (each chunk's keys copied under the lock); the rows added and deleted meanwhile are kept
  in a journal. Searches meanwhile are answered exactly (first training) or by the previous
  index (a retrain): never by the index being built.
- the swap, under the store's lock: the journal's adds go into the new index, its deletes become
  tombstones, and the new index replaces the old in one assignment (``trained``). A search holds
  the same lock, so it sees the old answer path or the new one, never a half-built index.
- ``trained``: adds are encoded into the live lists as they come (under the lock, like any
  write). Deletes are tombstones: a search excludes them (faiss IDSelector in the search
  parameters, so they take no top-k slot), and once they pass COMPACT_FRACTION of the indexed
  rows the worker removes them with ``remove_ids`` (under the lock: a pause of one pass over the
  lists). Keys never change after an add (values do), so an index entry never goes stale.

Drift: each add's keys are assigned to their nearest coarse centroid, which ``add`` does anyway.
The mean squared distance to it over the last DRIFT_WINDOW_ROWS added rows, against the same
mean over the training sample, is the drift ratio; past DRIFT_RETRAIN_RATIO a retrain starts
(a new sample of all rows, the same build and swap).

Ids: faiss holds the entries' own int64 ids (``add_with_ids``), so a search's labels are ids,
mapped to rows through the store's id map; rows move on deletes, ids do not.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import queue
import threading
import time

import numpy as np
import torch
from monim.datastore.flat_index import pad_results

log = logging.getLogger(__name__)

# Rows the k-means of a training sees: enough for faiss's own caps (256 per centroid for the
# coarse quantizer, 65,536 for each PQ sub-quantizer), at least 64 per list.
TRAIN_SAMPLE_MIN_ROWS = 1 << 14
TRAIN_ROWS_PER_LIST = 64
# Rows copied under the lock per step when a build adds the existing rows to its new index.
BUILD_CHUNK_ROWS = 1 << 16
# A build catches up with the rows added meanwhile outside the lock while more than this many wait.
CATCH_UP_ROWS = 4096
# Tombstones past this fraction of the indexed rows are removed from the lists (remove_ids).
COMPACT_FRACTION = 0.1
COMPACT_MIN_TOMBSTONES = 1024
# The drift monitor: a window of recent adds, and the ratio of their mean quantization error to
# the training sample's past which the index is trained again.
DRIFT_WINDOW_ROWS = 10_000
DRIFT_RETRAIN_RATIO = 2.0
# faiss's k-means iterations (its default is 25 for IVF training; the PQ's 25 cost most of a
# training and gain little recall past 10 on our data: bench/ivf_bench.py).
COARSE_NITER = 20
# A build that failed (logged) is tried again by an add after this long.
RETRY_AFTER_FAILURE_S = 60.0
# Most bytes of the stored keys one re-ranking gathers at a time.
RERANK_BLOCK_BYTES = 1 << 28
PQ_NITER = 10

_faiss = None


def faiss_module():
    global _faiss
    if _faiss is None:
        from monim.datastore import flat_index

        _faiss = flat_index._faiss_module()  # configured once (the BLAS threshold), shared with flat search
    return _faiss


def code_bytes(config) -> int:
    """Bytes an index entry takes in the inverted lists: its code and its int64 id."""
    return (config.pq_m if config.index == "ivf_pq" else 4 * config.dim) + 8


def fixed_bytes(config) -> int:
    """Bytes of a trained index's centroids (and PQ codebooks: 256 centroids per sub-quantizer)."""
    return 4 * config.dim * (config.nlist + (256 if config.index == "ivf_pq" else 0))


def _gpu_clustering_index(config, device: torch.device):
    """On a CUDA store, where faiss has GPUs (faiss-gpu): a GPU flat index for the coarse k-means's
    assignments (faiss's IndexIVF.clustering_index: the same training, its distance computations on
    the GPU), else None. The index itself stays a CPU one: faiss's GPU IVF takes no IDSelector in
    search and cannot remove_ids, which tombstones and compaction need."""
    faiss = faiss_module()
    if device.type != "cuda" or not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return None
    try:
        resources = faiss.StandardGpuResources()
        flat = faiss.IndexFlatL2(config.dim) if config.metric == "l2" else faiss.IndexFlatIP(config.dim)
        clustering = faiss.index_cpu_to_gpu(resources, device.index or 0, flat)
        clustering.referenced_resources = resources  # kept alive with the index
        return clustering
    except Exception:  # noqa: BLE001 - the CPU trains instead
        log.warning("faiss-gpu could not make a GPU clustering index; training on the CPU", exc_info=True)
        return None


def _quantization_errors(keys: np.ndarray, centroids: np.ndarray, lists: np.ndarray) -> np.ndarray:
    """float64 [N]: squared L2 distance of each key float32 [N, dim] to its list's centroid (lists
    int64 [N, 1] from the coarse quantizer; for ip too, where the quantizer's own score is a
    similarity: the drift monitor compares distances whatever the metric)."""
    return ((keys - centroids[lists[:, 0]]) ** 2).sum(axis=1, dtype=np.float64)


class _Worker:
    """One daemon thread that runs an index's builds and compactions in order, started on first use.
    A daemon, unlike a ThreadPoolExecutor's threads, which the interpreter joins at exit: a process
    that ends (a shard stopped, a server drained) does not wait for a build that may take minutes;
    the index is trained again when the rows are recovered."""

    def __init__(self, name: str):
        self._name = name
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()

    def submit(self, task, *args) -> concurrent.futures.Future:
        future = concurrent.futures.Future()
        with self._start:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        self._tasks.put((future, task, args))
        return future

    def _run(self) -> None:
        while True:
            item = self._tasks.get()
            if item is None:
                return
            future, task, args = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(task(*args))
                except BaseException as error:  # noqa: BLE001 - handed to whoever waits on the future
                    future.set_exception(error)

    def shutdown(self) -> None:
        """The thread ends after the task it runs (tasks queued after this never run)."""
        self._tasks.put(None)


class _Journal:
    """Rows added and deleted while a build runs (under the store's lock)."""

    def __init__(self):
        self.added: list[np.ndarray] = []
        self.deleted: list[np.ndarray] = []

    def take_added(self) -> np.ndarray:
        ids = np.concatenate(self.added) if self.added else np.empty(0, np.int64)
        self.added = []
        return ids


class IvfIndex:
    """config: the namespace's (index ivf_flat or ivf_pq, nlist, pq_m, train_min_rows, metric, dim).
    rows: the store's RowStore; lock: the store's lock (held by every caller of the public
    methods but ``wait_idle`` and ``close``)."""

    def __init__(self, config, rows, lock: threading.RLock):
        self.config = config
        self.rows = rows
        self._lock = lock
        self.index = None            # the live trained faiss index, or None (exact)
        self.trainings = 0           # builds swapped in
        self.train_seconds = 0.0     # the latest build's, from its start to the swap
        self.compaction_seconds = 0.0  # the latest compaction's remove_ids (searches wait that long)
        self._journal: _Journal | None = None  # while a build runs
        self._tombstones: set[int] = set()
        self._search_params = None   # faiss SearchParametersIVF excluding the tombstones
        self._selector = None        # kept alive with the parameters that point to it
        self._centroids = None        # float32 [nlist, dim] of the live index
        self._train_error = 0.0
        self._recent = collections.deque()  # (rows, sum of errors) of recent adds
        self._recent_rows, self._recent_sum = 0, 0.0
        self._compacting = False
        self._closed = False
        self._worker = _Worker(f"monim-ivf-{config.name}")
        self._pending: concurrent.futures.Future | None = None
        self._retry_after = 0.0      # a failed build is not tried again before this (time.monotonic)

    # ----- state ---------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """"exact", "training" (a build is running; answers are exact before the first one swaps
        in, from the previous index after) or "trained"."""
        if self._journal is not None:
            return "training"
        return "exact" if self.index is None else "trained"

    def stats(self) -> dict:
        return {"index_state": self.state, "index_trainings": self.trainings,
                "index_tombstones": len(self._tombstones), "index_drift": round(self.drift_ratio(), 4),
                "index_train_seconds": round(self.train_seconds, 3),
                "index_compaction_seconds": round(self.compaction_seconds, 3)}

    def drift_ratio(self) -> float:
        """Mean quantization error of the recent adds over the training sample's (0 before any)."""
        if not self._recent_rows or self._train_error <= 0:
            return 0.0
        return self._recent_sum / self._recent_rows / self._train_error

    def reserved_bytes(self, rows: int) -> int:
        """Bytes the index takes for ``rows`` rows, counted from the first row (an exact store will
        train), so that training never takes a shard past its budget: codes, ids, centroids."""
        return rows * code_bytes(self.config) + fixed_bytes(self.config)

    # ----- writes (under the store's lock) -----------------------------------------------------------
    def after_add(self, ids: np.ndarray, keys: np.ndarray) -> None:
        """ids int64 [N] were stored with keys float32 [N, dim] (C-contiguous)."""
        if self._journal is not None:
            self._journal.added.append(ids.copy())
        if self.index is not None:
            self._add_to_live(ids, keys)
        if self._pending is None and not self._closed and time.monotonic() >= self._retry_after and (
                (self.index is None and self.rows.size >= self.config.train_min_rows)
                or (self.index is not None and self._drifted())):
            self._start_build()

    def _add_to_live(self, ids: np.ndarray, keys: np.ndarray) -> None:
        """Assigns the keys to their lists (once: the assignment also feeds the drift monitor) and adds them."""
        faiss = faiss_module()
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        lists = self.index.quantizer.search(keys, 1)[1]
        self.index.add_core(keys.shape[0], faiss.swig_ptr(keys), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
        self._recent.append((keys.shape[0], float(_quantization_errors(keys, self._centroids, lists).sum())))
        self._recent_rows += keys.shape[0]
        self._recent_sum += self._recent[-1][1]
        while self._recent_rows - self._recent[0][0] >= DRIFT_WINDOW_ROWS:
            rows, total = self._recent.popleft()
            self._recent_rows -= rows
            self._recent_sum -= total

    def _drifted(self) -> bool:
        return self._recent_rows >= DRIFT_WINDOW_ROWS and self.drift_ratio() > DRIFT_RETRAIN_RATIO

    def after_delete(self, ids: np.ndarray) -> None:
        """ids int64 [N] are no longer stored."""
        if self._journal is not None:
            self._journal.deleted.append(ids.copy())
        if self.index is not None and ids.size:
            self._tombstones.update(ids.tolist())
            self._refresh_search_params()
            if (len(self._tombstones) >= max(COMPACT_MIN_TOMBSTONES, COMPACT_FRACTION * self.index.ntotal)
                    and not self._compacting and not self._closed):
                self._compacting = True
                self._worker.submit(self._logged, self._compact)

    def _refresh_search_params(self) -> None:
        faiss = faiss_module()
        if not self._tombstones:
            self._selector = None
            self._search_params = None
            return
        dead = np.fromiter(self._tombstones, np.int64, len(self._tombstones))
        batch = faiss.IDSelectorBatch(dead.size, faiss.swig_ptr(dead))
        self._selector = (batch, faiss.IDSelectorNot(batch))
        self._search_params = self._selector[1]

    # ----- search (under the store's lock) -------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, nprobe: int, rerank: int):
        """Approximate top-k of queries float32 [B, dim] by the live index: (distances float32 [B, k],
        ids int64 [B, k]) padded with (+inf, -1); None while the store is exact. With rerank
        (>= k), that many candidates are ranked again by their exact distances to the stored keys.
        Distances: squared L2 or the negative inner product, as flat search gives them (without
        rerank, ivf_pq's are estimated from the codes)."""
        if self.index is None:
            return None
        faiss = faiss_module()
        wanted = max(k, rerank)
        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe
        if self._search_params is not None:
            params.sel = self._search_params
        distances, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), wanted, params=params)
        if self.config.metric == "ip":
            distances = np.negative(distances)
        distances[ids < 0] = np.inf
        if rerank:
            distances, ids = self._rerank(queries, ids, k)
        return pad_results(distances[:, :k], ids[:, :k], k)

    def _rerank(self, queries: np.ndarray, candidates: np.ndarray, k: int):
        """Exact distances from the stored keys to each query's candidate ids int64 [B, R] (-1: none);
        the k best, (distances float32 [B, k'], ids int64 [B, k']). Queries are taken in groups whose
        gathered keys [b, R, dim] fit RERANK_BLOCK_BYTES."""
        rows = np.where(candidates >= 0, self.rows.rows_of(np.maximum(candidates, 0)), -1)
        device = self.rows.keys.device
        batch, width = candidates.shape
        group = max(1, RERANK_BLOCK_BYTES // (4 * width * self.config.dim))
        best_parts, id_parts = [], []
        for start in range(0, batch, group):
            part = rows[start:start + group]
            found = torch.from_numpy(part >= 0).to(device)
            keys = self.rows.keys[torch.from_numpy(np.maximum(part, 0)).to(device)].float()  # [b, R, dim]
            q = torch.from_numpy(np.ascontiguousarray(queries[start:start + group], dtype=np.float32)).to(device)
            if self.config.metric == "l2":
                distances = keys.sub_(q[:, None, :]).square_().sum(dim=2)
            else:
                distances = keys.mul_(q[:, None, :]).sum(dim=2).neg_()
            del keys
            distances = distances.masked_fill_(~found, torch.inf).cpu()
            best, order = torch.topk(distances, min(k, width), dim=1, largest=False, sorted=True)
            ids = torch.gather(torch.from_numpy(candidates[start:start + group]), 1, order)
            ids[torch.isinf(best)] = -1
            best_parts.append(best.numpy())
            id_parts.append(ids.numpy())
        return np.concatenate(best_parts), np.concatenate(id_parts)

    # ----- the build (on the worker thread) ---------------------------------------------------------
    def _start_build(self) -> None:
        self._journal = _Journal()
        self._pending = self._worker.submit(self._logged, self._build)

    def _logged(self, task) -> None:
        try:
            task()
        except Exception:  # noqa: BLE001 - a failed build leaves the store as it was (exact or the old index)
            log.exception("namespace %r: ivf index work failed", self.config.name)
            with self._lock:
                self._journal = None
                self._pending = None
                self._compacting = False
                self._retry_after = time.monotonic() + RETRY_AFTER_FAILURE_S

    def _new_index(self):
        faiss = faiss_module()
        metric = faiss.METRIC_L2 if self.config.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        quantizer = faiss.IndexFlatL2(self.config.dim) if metric == faiss.METRIC_L2 \
            else faiss.IndexFlatIP(self.config.dim)
        if self.config.index == "ivf_pq":
            index = faiss.IndexIVFPQ(quantizer, self.config.dim, self.config.nlist, self.config.pq_m, 8, metric)
            index.pq.cp.niter = PQ_NITER
        else:
            index = faiss.IndexIVFFlat(quantizer, self.config.dim, self.config.nlist, metric)
        index.cp.niter = COARSE_NITER
        gpu_clustering = _gpu_clustering_index(self.config, self.rows.keys.device)
        if gpu_clustering is not None:
            index.clustering_index = gpu_clustering
            self._gpu_clustering = gpu_clustering  # the index does not own it
        index.own_fields = True
        quantizer.this.disown()  # the index frees its quantizer
        return index

    def _copy_keys(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids still stored, their keys float32 [n, dim]); under the lock."""
        rows = self.rows.rows_of(ids)
        kept = rows >= 0
        picked = torch.from_numpy(rows[kept]).to(self.rows.keys.device)
        return ids[kept], np.ascontiguousarray(self.rows.keys[picked].float().cpu().numpy())

    def _build(self) -> None:
        """Train a new index on a sample, add every row to it, swap it in (see the module's docstring)."""
        started = time.monotonic()
        with self._lock:
            if self._closed:
                return
            size = self.rows.size
            ids = self.rows.ids[:size].cpu().numpy().copy()
            # Rows added since the build was queued are in this snapshot: the journal keeps what comes after.
            self._journal.added = []
            sample_size = min(size, max(TRAIN_SAMPLE_MIN_ROWS, TRAIN_ROWS_PER_LIST * self.config.nlist,
                                        self.config.train_min_rows))
            chosen = np.sort(np.random.default_rng(self.trainings).choice(size, sample_size, replace=False))
            sample = np.ascontiguousarray(self.rows.keys[torch.from_numpy(chosen).to(self.rows.keys.device)]
                                          .float().cpu().numpy())
        index = self._new_index()
        index.train(sample)
        centroids = index.quantizer.reconstruct_n(0, self.config.nlist)
        train_error = float(_quantization_errors(sample, centroids, index.quantizer.search(sample, 1)[1]).mean())
        del sample
        for start in range(0, ids.size, BUILD_CHUNK_ROWS):
            with self._lock:
                if self._closed:
                    return
                chunk_ids, keys = self._copy_keys(ids[start:start + BUILD_CHUNK_ROWS])
            index.add_with_ids(keys, chunk_ids)
        while True:  # rows added during the build, outside the lock while many wait
            with self._lock:
                if self._closed:
                    return
                waiting = sum(a.size for a in self._journal.added)
                if waiting <= CATCH_UP_ROWS:
                    self._swap(index, centroids, train_error, started)
                    return
                chunk_ids, keys = self._copy_keys(self._journal.take_added())
            index.add_with_ids(keys, chunk_ids)

    def _swap(self, index, centroids: np.ndarray, train_error: float, started: float) -> None:
        """Under the lock: the journal's last adds and its deletes, then the new index goes live."""
        chunk_ids, keys = self._copy_keys(self._journal.take_added())
        if chunk_ids.size:
            index.add_with_ids(keys, chunk_ids)
        deleted = self._journal.deleted
        self.index = index
        self._tombstones = set(np.concatenate(deleted).tolist()) if deleted else set()
        self._refresh_search_params()
        self._centroids, self._train_error = centroids, train_error
        self._recent.clear()
        self._recent_rows, self._recent_sum = 0, 0.0
        self.trainings += 1
        self.train_seconds = time.monotonic() - started
        self._journal = None
        self._pending = None
        log.info("namespace %r: %s index trained on %d rows in %.1f s", self.config.name, self.config.index,
                 index.ntotal, self.train_seconds)

    def _compact(self) -> None:
        """Removes the tombstoned ids from the lists (under the lock: searches wait for one pass)."""
        faiss = faiss_module()
        with self._lock:
            self._compacting = False
            if self._closed or self.index is None or not self._tombstones:
                return
            started = time.monotonic()
            dead = np.fromiter(self._tombstones, np.int64, len(self._tombstones))
            self.index.remove_ids(faiss.IDSelectorBatch(dead.size, faiss.swig_ptr(dead)))
            self._tombstones.clear()
            self.compaction_seconds = time.monotonic() - started
            self._refresh_search_params()

    # ----- lifecycle ------------------------------------------------------------------------------------
    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Waits until no build or compaction is queued or running (tests, benchmarks); True if so."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            with self._lock:
                if self._closed:
                    return True
            done = self._worker.submit(lambda: None)
            try:
                done.result(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            except concurrent.futures.TimeoutError:
                return False
            with self._lock:
                if self._pending is None and not self._compacting:
                    return True

    def close(self) -> None:
        """The namespace went: a running build is dropped when it next takes the lock."""
        with self._lock:
            self._closed = True
        self._worker.shutdown()
