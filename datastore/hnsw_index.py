"""The approximate index of an ``hnsw`` namespace's store: a faiss HNSW graph (IndexHNSWFlat) built in
the background and swapped in atomically (the lifecycle every approximate index shares:
datastore/background_index.py).

- the build needs no training: it inserts every row into a new graph (``hnsw_m`` neighbours per
  node, 2 x hnsw_m on the bottom layer; ``ef_construction`` candidates per insertion), outside the
  store's lock, in chunks.
- ``trained``: inserting into a graph costs far more than an ivf add (tens to hundreds of
  microseconds a row) and faiss's graph cannot be searched while it grows, so an add does not
  insert under the lock. Its rows wait in the **tail**: a float32 copy of their keys that every
  search scans exactly, its answer merged with the graph's. The worker moves the tail into the
  graph a slice at a time under the lock, each slice sized so that it holds the lock about
  ABSORB_PAUSE_S (a search waits at most that long for it). Past MAX_TAIL_ROWS waiting rows an
  add inserts the excess itself before it answers, so a tail never outgrows what a search can
  scan quickly: sustained ingest runs at the graph's insertion rate.
- deletes: a row still in the tail leaves it; one in the graph becomes a tombstone (excluded from
  searches through the search's IDSelector). faiss cannot remove nodes from a graph, so past
  COMPACT_FRACTION of the graph's rows the tombstones are cleared by a rebuild of the graph from
  the rows stored then (searches meanwhile use the old graph, excluding them).

Distances are exact (the graph keeps float32 copies of the keys): squared L2, or the negative inner
product, as flat search gives them. Recall is set by ``ef`` (the search's beam width, at least k).
"""

from __future__ import annotations

import time

import numpy as np
from monim.datastore.background_index import BackgroundIndex, faiss_module, ids_of
from monim.datastore.flat_index import pad_results

# How long one slice of the tail's insertion may hold the store's lock, and the rows of the first slice.
ABSORB_PAUSE_S = 0.02
ABSORB_FIRST_ROWS = 64
# Rows that may wait in the tail; an add past it inserts the excess itself before it answers.
MAX_TAIL_ROWS = 16_384


def entry_bytes(config) -> int:
    """Bytes a row takes in the graph: its float32 key, its id (the IDMap's), its level and neighbour
    offset, its 2 x M bottom-layer neighbours (int32) and, on average, about M / (M - 1) upper-layer ones."""
    m = config.hnsw_m
    return 4 * config.dim + 8 + 12 + 4 * (2 * m) + 8


class _Tail:
    """Rows added to a live graph and not in it yet, oldest first: ``ids`` int64 [T] and ``keys``
    float32 [T, dim] (views of buffers that grow by doubling, so an add copies only its own rows)."""

    def __init__(self, dim: int):
        self._ids = np.empty(0, np.int64)
        self._keys = np.empty((0, dim), np.float32)
        self._start = self._end = 0

    def __len__(self) -> int:
        return self._end - self._start

    @property
    def ids(self) -> np.ndarray:
        return self._ids[self._start:self._end]

    @property
    def keys(self) -> np.ndarray:
        return self._keys[self._start:self._end]

    def append(self, ids: np.ndarray, keys: np.ndarray) -> None:
        n, held = ids.size, len(self)
        if self._end + n > self._ids.size:
            capacity = max(2 * (held + n), 1024)
            if capacity > self._ids.size:  # a larger buffer
                grown_ids, grown_keys = np.empty(capacity, np.int64), np.empty((capacity, self._keys.shape[1]), np.float32)
            else:  # room enough once the rows taken from the front are dropped
                grown_ids, grown_keys = self._ids, self._keys
            grown_ids[:held], grown_keys[:held] = self.ids.copy(), self.keys.copy()
            self._ids, self._keys, self._start, self._end = grown_ids, grown_keys, 0, held
        self._ids[self._end:self._end + n] = ids
        self._keys[self._end:self._end + n] = keys
        self._end += n

    def take(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """The oldest ``rows`` rows (copies), removed."""
        ids, keys = self.ids[:rows].copy(), self.keys[:rows].copy()
        self._start += ids.size
        if not len(self):
            self._start = self._end = 0
        return ids, keys

    def remove(self, ids: np.ndarray) -> np.ndarray:
        """Drops those of ids it holds; returns the others."""
        held = np.isin(self.ids, ids)
        if not held.any():
            return ids
        gone = self.ids[held]
        kept_ids, kept_keys = self.ids[~held].copy(), self.keys[~held].copy()
        self._ids[:kept_ids.size], self._keys[:kept_ids.size] = kept_ids, kept_keys
        self._start, self._end = 0, kept_ids.size
        return ids[~np.isin(ids, gone)]


def _requeued(tail: _Tail, ids: np.ndarray, keys: np.ndarray, dim: int) -> _Tail:
    """A tail with these rows back in front of the others (an insertion that failed)."""
    again = _Tail(dim)
    again.append(ids, keys)
    again.append(tail.ids, tail.keys)
    return again


class HnswIndex(BackgroundIndex):
    """config: the namespace's (index hnsw, hnsw_m, ef_construction, train_min_rows, metric, dim).
    rows: the store's RowStore; lock: the store's lock (BackgroundIndex)."""

    def __init__(self, config, rows, lock):
        super().__init__(config, rows, lock)
        self._tail = _Tail(config.dim)
        self._absorbing = False       # a task moving the tail into the graph is queued or running
        self._slice_rows = ABSORB_FIRST_ROWS

    def metrics(self) -> dict:
        """BackgroundIndex.metrics (without the store's lock), with the rows waiting in the tail. The
        tail's length is two reads of its bounds: while the worker moves a slice into the graph it may
        be that slice off, for that moment."""
        return {**super().metrics(), "unindexed": len(self._tail)}

    def reserved_bytes(self, rows: int) -> int:
        """The graph's entries for every row, and the tail's copies of keys: as many as there are rows,
        up to MAX_TAIL_ROWS (BackgroundIndex.reserved_bytes)."""
        return rows * entry_bytes(self.config) + min(rows, MAX_TAIL_ROWS) * 4 * self.config.dim

    # ----- writes (under the store's lock) -----------------------------------------------------------
    def _add_to_live(self, ids: np.ndarray, keys: np.ndarray) -> None:
        """Into the tail; the worker moves it into the graph. An add that takes the tail past
        MAX_TAIL_ROWS inserts the excess (the oldest rows) now."""
        self._tail.append(ids, keys)
        excess = len(self._tail) - MAX_TAIL_ROWS
        if excess > 0:
            oldest_ids, oldest_keys = self._tail.take(excess)
            self.index.add_with_ids(oldest_keys, self.labels_of(oldest_ids))
        if len(self._tail) and not self._absorbing and not self._closed:
            self._absorbing = True
            self._worker.submit(self._logged, self._absorb)

    def _tombstone(self, ids: np.ndarray) -> None:
        """Deleted ids leave the tail; those in the graph become tombstones (BackgroundIndex._tombstone)."""
        in_graph = self._tail.remove(ids)
        if in_graph.size:
            super()._tombstone(in_graph)

    def _compact_later(self) -> None:
        """A rebuild of the graph from the rows stored now (faiss removes no node from a graph)."""
        if self._pending is None:
            self._start_build()

    # ----- the tail's way into the graph (on the worker thread) -----------------------------------------
    def _absorb(self) -> None:
        """Moves the tail into the live graph a slice at a time, each under the lock for about
        ABSORB_PAUSE_S, until it is empty (or a build replaced the graph: its swap sets the tail again)."""
        while True:
            with self._lock:
                if self._closed or self.index is None or not len(self._tail) or self._journal is not None:
                    self._absorbing = False
                    return
                ids, keys = self._tail.take(self._slice_rows)
                started = time.perf_counter()
                try:
                    self.index.add_with_ids(keys, self.labels_of(ids))
                except BaseException:
                    self._tail = _requeued(self._tail, ids, keys, self.config.dim)  # searched exactly still
                    self._absorbing = False  # the next add tries again
                    raise
                took = time.perf_counter() - started
            if ids.size == self._slice_rows:  # a full slice: size the next one to the pause
                self._slice_rows = int(np.clip(self._slice_rows * ABSORB_PAUSE_S / max(took, 1e-4),
                                               16, MAX_TAIL_ROWS))

    def _idle(self) -> bool:
        return not len(self._tail)

    # ----- the build (on the worker thread) ---------------------------------------------------------
    def _new_index(self):
        faiss = faiss_module()
        metric = faiss.METRIC_L2 if self.config.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        graph = faiss.IndexHNSWFlat(self.config.dim, self.config.hnsw_m, metric)
        graph.hnsw.efConstruction = self.config.ef_construction
        index = faiss.IndexIDMap(graph)
        index.own_fields = True
        graph.this.disown()  # the IDMap frees its graph
        return index

    def _add_at_swap(self, index, ids: np.ndarray, keys: np.ndarray) -> None:
        """The journal's last rows wait in the new graph's tail (the old graph's tail went with it:
        its rows were in the build's snapshot or the journal)."""
        self._tail = _Tail(self.config.dim)
        self._slice_rows = ABSORB_FIRST_ROWS
        if ids.size:
            self._add_to_live(ids, keys)

    # ----- search (under the store's lock) -------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, nprobe: int = 0, rerank: int = 0, ef: int = 0):
        """Approximate top-k of queries float32 [B, dim]: the graph's (beam width ef >= k) merged with
        an exact scan of the tail: (distances float32 [B, k], ids int64 [B, k]) padded with (+inf, -1);
        None while the store is exact. nprobe, rerank: ivf's (always 0 here)."""
        if self.index is None:
            return None
        faiss = faiss_module()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(ef, k)
        if self.search_selector is not None:
            params.sel = self.search_selector
        distances, labels = self.index.search(queries, k, params=params)
        ids = ids_of(labels)
        if self.config.metric == "ip":
            distances = np.negative(distances)
        distances[ids < 0] = np.inf
        if len(self._tail):
            distances, ids = self._with_tail(queries, k, distances, ids)
        return pad_results(distances, ids, k)

    def _with_tail(self, queries: np.ndarray, k: int, distances: np.ndarray, ids: np.ndarray):
        """The graph's answer merged with an exact search of the tail: the k nearest of both."""
        faiss = faiss_module()
        metric = faiss.METRIC_L2 if self.config.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        tail_distances, positions = faiss.knn(queries, self._tail.keys, min(k, len(self._tail)), metric=metric)
        found = np.maximum(positions, 0)
        if self.config.metric == "ip":
            tail_distances = np.negative(tail_distances)
        else:  # the scan's |q|^2 - 2 q.x + |x|^2 loses low bits at large norms: the k found, by their differences
            tail_distances = ((self._tail.keys[found] - queries[:, None, :]) ** 2).sum(axis=2, dtype=np.float32)
        tail_ids = np.where(positions >= 0, self._tail.ids[found], -1)
        tail_distances[positions < 0] = np.inf
        distances = np.concatenate([distances, tail_distances.astype(np.float32)], axis=1)
        ids = np.concatenate([ids, tail_ids], axis=1)
        order = np.argsort(distances, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(distances, order, axis=1), np.take_along_axis(ids, order, axis=1)
