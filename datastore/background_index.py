"""What every approximate index of a namespace's store shares: built in the background, swapped in
atomically, deletes as tombstones (datastore/ivf_index.py, datastore/hnsw_index.py).

Lifecycle of one store's index (its ``state``, which DescribeNamespace shows per shard):
- ``exact``: fewer than ``train_min_rows`` rows; the store answers by exact search over its rows.
- ``training``: the threshold was reached (or the index asked for a rebuild: ivf's drift monitor,
  hnsw's tombstones). On the index's worker thread, without the store's lock: a new faiss index
  is made (an ivf one trained on a random sample of the keys, copied under the lock); every row
  present when the build began is added to it in chunks (each chunk's keys copied under the
  lock); the rows added and deleted meanwhile are kept in a journal, and while many added rows
  wait, the build adds them outside the lock too. Searches meanwhile are answered exactly (first
  build) or by the previous index (a rebuild): never by the index being built.
- the swap, under the store's lock: the journal's last adds go to the new index (``_add_at_swap``),
  its deletes become tombstones, and the new index replaces the old in one assignment
  (``trained``). A search holds the same lock, so it sees the old answer path or the new one,
  never a half-built index.
- ``trained``: adds go to the live index as they come (``_add_to_live``). Deletes are
  tombstones: a search excludes them (a faiss IDSelector in its search parameters, so they take
  no top-k slot); past COMPACT_FRACTION of the indexed rows ``_compact_later`` clears them.

Labels: faiss holds each entry under a label made of the row's id and its incarnation in this
index (``label = id | epoch << ID_BITS``): an id deleted and added again (a reshard moves a row away
and back; a restore) gets a new label while its old entry may still be in the index (a tombstone,
or in a build's snapshot), so the old entry never hides the new one nor answers beside it, and a
compaction removes only the old one. Epochs are kept only for ids added again (almost always none:
labels are then the ids). A search's labels go back to ids (``ids_of``), mapped to rows through the
store's id map; rows move on deletes, ids do not. Keys never change after an add (values do), so an
index entry never goes stale.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time

import numpy as np
import torch

log = logging.getLogger(__name__)

# Rows copied under the lock per step when a build adds the existing rows to its new index.
BUILD_CHUNK_ROWS = 1 << 16
# A build catches up with the rows added meanwhile outside the lock while more than this many wait.
CATCH_UP_ROWS = 4096
# Tombstones past this fraction of the indexed rows are cleared (ivf: remove_ids; hnsw: a rebuild).
COMPACT_FRACTION = 0.1
COMPACT_MIN_TOMBSTONES = 1024
# A build that failed (logged) is tried again by an add after this long.
RETRY_AFTER_FAILURE_S = 60.0
# A label: the id in its low ID_BITS bits, the id's incarnation in the index above them.
ID_BITS = 47
ID_MASK = (1 << ID_BITS) - 1
MAX_EPOCH = (1 << (63 - ID_BITS)) - 1

_faiss = None


def faiss_module():
    global _faiss
    if _faiss is None:
        from monim.datastore import flat_index

        _faiss = flat_index._faiss_module()  # configured once (the BLAS threshold), shared with flat search
    return _faiss


class Worker:
    """One daemon thread that runs an index's builds and compactions in order, started on first use.
    A daemon, unlike a ThreadPoolExecutor's threads, which the interpreter joins at exit: a process
    that ends (a shard stopped, a server drained) does not wait for a build that may take minutes;
    the index is built again when the rows are recovered."""

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


def ids_of(labels: np.ndarray) -> np.ndarray:
    """The ids of an index's labels (-1 stays -1)."""
    return np.where(labels >= 0, labels & ID_MASK, -1)


class Journal:
    """Rows added and deleted while a build runs (under the store's lock): the ids added (in order,
    an id twice if it went and came back), and the labels deleted with the ids they were of."""

    def __init__(self):
        self.added: list[np.ndarray] = []
        self.deleted_labels: set[int] = set()
        self.deleted_ids: set[int] = set()

    def take_added(self) -> np.ndarray:
        """The ids added since the last take, each once."""
        ids = np.unique(np.concatenate(self.added)) if self.added else np.empty(0, np.int64)
        self.added = []
        return ids


class BackgroundIndex:
    """config: the namespace's (index, train_min_rows, metric, dim and the index's own options).
    rows: the store's RowStore; lock: the store's lock (held by every caller of the public
    methods but ``wait_idle`` and ``close``). A subclass makes and fills its faiss index
    (``_new_index``, ``_add_to_live``, ``search``, ``reserved_bytes``) and may train it
    (``_sample``, ``_train``), rebuild it (``_wants_rebuild``) and clear its tombstones
    (``_compact_later``)."""

    def __init__(self, config, rows, lock: threading.RLock):
        self.config = config
        self.rows = rows
        self._lock = lock
        self.index = None            # the live faiss index, or None (exact)
        self.trainings = 0           # builds swapped in
        self.train_seconds = 0.0     # the latest build's, from its start to the swap
        self.compaction_seconds = 0.0  # the latest compaction's (searches wait that long)
        self._journal: Journal | None = None  # while a build runs
        self._tombstones: set[int] = set()  # labels of deleted rows' entries still in the index
        self._epochs: dict[int, int] = {}  # id -> its incarnation, for ids added again (module docstring)
        self._selector = None        # faiss IDSelectorNot of the tombstones (and what it points to), or None
        self._dead = None            # the tombstones as an int64 array (None: none)
        self._compacting = False
        self._closed = False
        self._worker = Worker(f"monim-{config.index}-{config.name}")
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

    def metrics(self) -> dict:
        """The index's figures for the shard's metrics (workers/shard.py ``Shard.metrics``, exported by
        workers/metrics.py), read WITHOUT the store's lock: health asks every few seconds, and a store
        busy with a long search or add under its lock must not stall it. Plain attribute reads, each
        of one moment but not all of the same one (a swap between two reads may show, for that
        scrape, the new build's count beside the state before it).

        state: as ``state``; builds: builds swapped in since the store was made (it restarts with
        the shard); tombstones: deleted rows still in the index, excluded from searches; drift: the
        drift monitor's ratio (ivf), None for an index without one; train_seconds and
        compaction_seconds: the latest build's and compaction's (0.0 before one); unindexed: rows
        waiting to enter the index (hnsw's tail; 0 here)."""
        return {"state": self.state, "builds": self.trainings, "tombstones": len(self._tombstones),
                "drift": self.drift_ratio(), "train_seconds": self.train_seconds,
                "compaction_seconds": self.compaction_seconds, "unindexed": 0}

    def drift_ratio(self) -> float | None:
        """The drift monitor's ratio (ivf: datastore/ivf_index.py); None: this index has none."""
        return None

    def stats(self) -> dict:
        """DescribeNamespace's figures (under the store's lock, so all of one moment): metrics()'s."""
        figures = self.metrics()
        return {"index_state": figures["state"], "index_trainings": figures["builds"],
                "index_tombstones": figures["tombstones"], "index_drift": round(figures["drift"] or 0.0, 4),
                "index_train_seconds": round(figures["train_seconds"], 3),
                "index_compaction_seconds": round(figures["compaction_seconds"], 3),
                "index_unindexed": figures["unindexed"]}

    def reserved_bytes(self, rows: int) -> int:
        """Bytes the index takes for ``rows`` rows, counted from the first row (an exact store will
        build), so that a build never takes a shard past its budget."""
        raise NotImplementedError

    # ----- labels (under the store's lock) -------------------------------------------------------------
    def labels_of(self, ids: np.ndarray) -> np.ndarray:
        """The labels the rows of these ids have (or will have) in the index: their current incarnation."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not self._epochs:
            return ids
        labels = ids.copy()
        again = np.flatnonzero(np.isin(ids, np.fromiter(self._epochs, np.int64, len(self._epochs))))
        labels[again] |= np.array([self._epochs[i] for i in ids[again].tolist()], np.int64) << ID_BITS
        return labels

    def _new_incarnations(self, ids: np.ndarray) -> None:
        """ids are added (again): each whose current label may still be in an index (a tombstone of
        the live one, or deleted during a build whose snapshot may hold it) gets the next incarnation."""
        deleted = self._journal.deleted_labels if self._journal is not None else ()
        if not self._tombstones and not deleted:
            return
        labels = self.labels_of(ids)
        hit = np.isin(labels, self._dead) if self._dead is not None else np.zeros(ids.size, bool)
        if deleted:
            hit |= np.isin(labels, np.fromiter(deleted, np.int64, len(deleted)))
        for id_ in ids[hit].tolist():
            epoch = self._epochs.get(id_, 0) + 1
            if epoch > MAX_EPOCH:
                raise RuntimeError(f"id {id_} was added again {MAX_EPOCH} times to one index without a compaction")
            self._epochs[id_] = epoch

    # ----- writes (under the store's lock) -----------------------------------------------------------
    def after_add(self, ids: np.ndarray, keys: np.ndarray) -> None:
        """ids int64 [N] (each < 2^ID_BITS) were stored with keys float32 [N, dim] (C-contiguous)."""
        self._new_incarnations(ids)
        if self._journal is not None:
            self._journal.added.append(ids.copy())
        if self.index is not None:
            self._add_to_live(ids, keys)
        if self._pending is None and not self._closed and time.monotonic() >= self._retry_after and (
                (self.index is None and self.rows.size >= self.config.train_min_rows)
                or (self.index is not None and self._wants_rebuild())):
            self._start_build()

    def after_delete(self, ids: np.ndarray) -> None:
        """ids int64 [N] are no longer stored."""
        self._journal_deleted(ids)
        if self.index is not None and ids.size:
            self._tombstone(ids)

    def _journal_deleted(self, ids: np.ndarray) -> None:
        if self._journal is not None and ids.size:
            self._journal.deleted_labels.update(self.labels_of(ids).tolist())
            self._journal.deleted_ids.update(ids.tolist())

    def _tombstone(self, ids: np.ndarray) -> None:
        """ids' entries are excluded from searches from now on; past COMPACT_FRACTION, cleared later."""
        self._tombstones.update(self.labels_of(ids).tolist())
        self._refresh_selector()
        if (len(self._tombstones) >= max(COMPACT_MIN_TOMBSTONES, COMPACT_FRACTION * self.index.ntotal)
                and not self._compacting and not self._closed):
            self._compact_later()

    def _refresh_selector(self) -> None:
        faiss = faiss_module()
        if not self._tombstones:
            self._selector = self._dead = None
            return
        self._dead = np.fromiter(self._tombstones, np.int64, len(self._tombstones))
        batch = faiss.IDSelectorBatch(self._dead.size, faiss.swig_ptr(self._dead))
        self._selector = (batch, faiss.IDSelectorNot(batch))  # the batch is kept alive with its negation

    @property
    def search_selector(self):
        """The faiss IDSelector a search passes to leave the tombstones out, or None (none)."""
        return None if self._selector is None else self._selector[1]

    def _add_to_live(self, ids: np.ndarray, keys: np.ndarray) -> None:
        raise NotImplementedError

    def _wants_rebuild(self) -> bool:
        return False

    def _compact_later(self) -> None:
        """Clears the tombstones on the worker (called under the lock when they pass the threshold)."""
        raise NotImplementedError

    # ----- the build (on the worker thread) ---------------------------------------------------------
    def _start_build(self) -> None:
        self._journal = Journal()
        self._pending = self._worker.submit(self._logged, self._build)

    def _logged(self, task) -> None:
        try:
            task()
        except Exception:  # noqa: BLE001 - a failed build leaves the store as it was (exact or the old index)
            log.exception("namespace %r: %s index work failed", self.config.name, self.config.index)
            with self._lock:
                self._journal = None
                self._pending = None
                self._compacting = False
                self._retry_after = time.monotonic() + RETRY_AFTER_FAILURE_S

    def _new_index(self):
        raise NotImplementedError

    def _sample(self, size: int):
        """Under the lock, at the build's start: what ``_train`` needs (ivf: a sample of the keys), or None."""
        return None

    def _train(self, index, sample):
        """Without the lock: trains the new index; returns what ``_went_live`` keeps (ivf: its drift reference)."""
        return None

    def _went_live(self, reference) -> None:
        """Under the lock, at the swap, after the new index went live."""

    def _add_to_building(self, index, labels: np.ndarray, keys: np.ndarray) -> None:
        index.add_with_ids(keys, labels)

    def _add_at_swap(self, index, ids: np.ndarray, keys: np.ndarray) -> None:
        """Under the lock, at the swap: the journal's last added rows (at most CATCH_UP_ROWS)."""
        if ids.size:
            index.add_with_ids(keys, self.labels_of(ids))

    def _copy_keys(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids still stored, their keys float32 [n, dim]); under the lock."""
        rows = self.rows.rows_of(ids)
        kept = rows >= 0
        picked = torch.from_numpy(rows[kept]).to(self.rows.keys.device)
        return ids[kept], np.ascontiguousarray(self.rows.keys[picked].float().cpu().numpy())

    def _copy_for_build(self, ids: np.ndarray, snapshot: bool) -> tuple[np.ndarray, np.ndarray]:
        """Under the lock: (labels, keys) of the rows a build adds now. Rows of the build's snapshot
        deleted since it began are left to the journal (added again, they are among its adds)."""
        if snapshot and self._journal.deleted_ids:
            ids = ids[~np.isin(ids, np.fromiter(self._journal.deleted_ids, np.int64))]
        ids, keys = self._copy_keys(ids)
        return self.labels_of(ids), keys

    def _build(self) -> None:
        """Make a new index, add every row to it, swap it in (see the module's docstring)."""
        started = time.monotonic()
        with self._lock:
            if self._closed:
                return
            size = self.rows.size
            ids = self.rows.ids[:size].cpu().numpy().copy()
            # The snapshot holds every row stored now, under its current label: the journal keeps what comes after.
            self._journal = Journal()
            sample = self._sample(size)
        index = self._new_index()
        reference = self._train(index, sample)
        del sample
        for start in range(0, ids.size, BUILD_CHUNK_ROWS):
            with self._lock:
                if self._closed:
                    return
                labels, keys = self._copy_for_build(ids[start:start + BUILD_CHUNK_ROWS], snapshot=True)
            self._add_to_building(index, labels, keys)
        while True:  # rows added during the build, outside the lock while many wait
            with self._lock:
                if self._closed:
                    return
                waiting = sum(a.size for a in self._journal.added)
                if waiting <= CATCH_UP_ROWS:
                    self._swap(index, reference, started)
                    return
                labels, keys = self._copy_for_build(self._journal.take_added(), snapshot=False)
            self._add_to_building(index, labels, keys)

    def _swap(self, index, reference, started: float) -> None:
        """Under the lock: the journal's last adds and its deletes, then the new index goes live."""
        self.index = index
        self._add_at_swap(index, *self._copy_keys(self._journal.take_added()))
        self._tombstones = set(self._journal.deleted_labels)  # those the new index holds, and a few it never did
        self._refresh_selector()
        self._went_live(reference)
        self.trainings += 1
        self.train_seconds = time.monotonic() - started
        self._journal = None
        self._pending = None
        log.info("namespace %r: %s index built on %d rows in %.1f s", self.config.name, self.config.index,
                 index.ntotal, self.train_seconds)

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
                if self._pending is None and not self._compacting and self._idle():
                    return True

    def _idle(self) -> bool:
        """No work of the subclass's own is left (hnsw: rows waiting to enter the graph)."""
        return True

    def close(self) -> None:
        """The namespace went: a running build is dropped when it next takes the lock."""
        with self._lock:
            self._closed = True
        self._worker.shutdown()
