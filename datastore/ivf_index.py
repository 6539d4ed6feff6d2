"""The approximate index of an ``ivf_flat`` / ``ivf_pq`` namespace's store: faiss IVF, trained in
the background on a sample of the keys, swapped in atomically (the lifecycle every approximate
index shares: datastore/background_index.py).

- the build trains the new index on a random sample of the keys (copied under the lock): k-means
  for the coarse lists, and the PQ's codebooks for ivf_pq; then adds every row.
- ``trained``: adds are encoded into the live lists as they come (under the lock, like any
  write). Deletes are tombstones, and once they pass COMPACT_FRACTION of the indexed rows the
  worker removes them with ``remove_ids`` (under the lock: a pause of one pass over the lists).

Drift: each add's keys are assigned to their nearest coarse centroid, which ``add`` does anyway.
The mean squared distance to it over the last DRIFT_WINDOW_ROWS added rows, against the same
mean over the training sample, is the drift ratio; past DRIFT_RETRAIN_RATIO a retrain starts
(a new sample of all rows, the same build and swap).
"""

from __future__ import annotations

import collections
import logging
import time

import numpy as np
import torch
from monim.datastore.background_index import BackgroundIndex, faiss_module, ids_of
from monim.datastore.flat_index import pad_results

log = logging.getLogger(__name__)

# Rows the k-means of a training sees: enough for faiss's own caps (256 per centroid for the
# coarse quantizer, 65,536 for each PQ sub-quantizer), at least 64 per list.
TRAIN_SAMPLE_MIN_ROWS = 1 << 14
TRAIN_ROWS_PER_LIST = 64
# The drift monitor: a window of recent adds, and the ratio of their mean quantization error to
# the training sample's past which the index is trained again.
DRIFT_WINDOW_ROWS = 10_000
DRIFT_RETRAIN_RATIO = 2.0
# faiss's k-means iterations (its default is 25 for IVF training; the PQ's 25 cost most of a
# training and gain little recall past 10 on our data: bench/ivf_bench.py).
COARSE_NITER = 20
# Most bytes of the stored keys one re-ranking gathers at a time.
RERANK_BLOCK_BYTES = 1 << 28
PQ_NITER = 10


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


class IvfIndex(BackgroundIndex):
    """config: the namespace's (index ivf_flat or ivf_pq, nlist, pq_m, train_min_rows, metric, dim).
    rows: the store's RowStore; lock: the store's lock (BackgroundIndex)."""

    def __init__(self, config, rows, lock):
        super().__init__(config, rows, lock)
        self._centroids = None        # float32 [nlist, dim] of the live index
        self._train_error = 0.0
        self._recent = collections.deque()  # (rows, sum of errors) of recent adds
        self._recent_rows, self._recent_sum = 0, 0.0

    def drift_ratio(self) -> float:
        """Mean quantization error of the recent adds over the training sample's (0 before any). Each
        attribute is read once (metrics() calls this without the store's lock, while a swap may empty
        the window)."""
        rows, total, reference = self._recent_rows, self._recent_sum, self._train_error
        if not rows or reference <= 0:
            return 0.0
        return total / rows / reference

    def reserved_bytes(self, rows: int) -> int:
        """Codes, ids and centroids (BackgroundIndex.reserved_bytes)."""
        return rows * code_bytes(self.config) + fixed_bytes(self.config)

    # ----- writes (under the store's lock) -----------------------------------------------------------
    def _add_to_live(self, ids: np.ndarray, keys: np.ndarray) -> None:
        """Assigns the keys to their lists (once: the assignment also feeds the drift monitor) and adds them."""
        faiss = faiss_module()
        labels = self.labels_of(ids)
        lists = self.index.quantizer.search(keys, 1)[1]
        self.index.add_core(keys.shape[0], faiss.swig_ptr(keys), faiss.swig_ptr(labels), faiss.swig_ptr(lists))
        self._recent.append((keys.shape[0], float(_quantization_errors(keys, self._centroids, lists).sum())))
        self._recent_rows += keys.shape[0]
        self._recent_sum += self._recent[-1][1]
        while self._recent_rows - self._recent[0][0] >= DRIFT_WINDOW_ROWS:
            rows, total = self._recent.popleft()
            self._recent_rows -= rows
            self._recent_sum -= total

    def _wants_rebuild(self) -> bool:
        return self._recent_rows >= DRIFT_WINDOW_ROWS and self.drift_ratio() > DRIFT_RETRAIN_RATIO

    def _compact_later(self) -> None:
        self._compacting = True
        self._worker.submit(self._logged, self._compact)

    # ----- search (under the store's lock) -------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, nprobe: int, rerank: int, ef: int = 0):
        """Approximate top-k of queries float32 [B, dim] by the live index: (distances float32 [B, k],
        ids int64 [B, k]) padded with (+inf, -1); None while the store is exact. With rerank
        (>= k), that many candidates are ranked again by their exact distances to the stored keys.
        Distances: squared L2 or the negative inner product, as flat search gives them (without
        rerank, ivf_pq's are estimated from the codes). ef: hnsw's (always 0 here)."""
        if self.index is None:
            return None
        faiss = faiss_module()
        wanted = max(k, rerank)
        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe
        if self.search_selector is not None:
            params.sel = self.search_selector
        distances, labels = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), wanted, params=params)
        ids = ids_of(labels)
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
    def _sample(self, size: int) -> np.ndarray:
        """A random sample of the keys, float32 [n, dim] (under the lock)."""
        sample_size = min(size, max(TRAIN_SAMPLE_MIN_ROWS, TRAIN_ROWS_PER_LIST * self.config.nlist,
                                    self.config.train_min_rows))
        chosen = np.sort(np.random.default_rng(self.trainings).choice(size, sample_size, replace=False))
        return np.ascontiguousarray(self.rows.keys[torch.from_numpy(chosen).to(self.rows.keys.device)]
                                    .float().cpu().numpy())

    def _train(self, index, sample: np.ndarray):
        """Trains the lists (and the PQ); returns (centroids, the sample's mean quantization error)."""
        index.train(sample)
        centroids = index.quantizer.reconstruct_n(0, self.config.nlist)
        return centroids, float(_quantization_errors(sample, centroids, index.quantizer.search(sample, 1)[1]).mean())

    def _went_live(self, reference) -> None:
        self._centroids, self._train_error = reference
        self._recent.clear()
        self._recent_rows, self._recent_sum = 0, 0.0

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
            self._refresh_selector()
