"""Shard: the state one shard actor holds (plain Python; Ray wraps it in workers/runtime.py).

A shard hosts one NeighborStore per namespace on its device (one GPU, or the
CPU). The router owns placement: entry ``id`` lives on shard
``id % num_shards``, and ids are allocated by the namespace registry.

Every data call names the namespace and its generation (0: whichever is
stored), so a request meant for a dropped incarnation never touches the new
one. Writes carry a request id and are applied at most once per shard, so a
router may retry a whole multi-shard write after a partial failure. Optimizer
steps are two-phase: parts of a step leave their value gradients staged under
the step's id (after checking, under the lock, that every row still exists),
and ``commit_step`` applies them all as one step (``abort_step`` drops them).

With a data dir, every change (create, drop, add, weight increments, delete, a
committed step) is first appended to the shard's write-ahead log (datastore/wal.py)
and only then applied and acknowledged; snapshots (datastore/snapshot.py) cover the
log up to a point, and a shard that starts on the folder recovers from them. The
request ids applied recently travel in the snapshot, so a retry after a restart
still lands once. Staged (uncommitted) step parts are not kept: a commit that finds
its parts gone answers ABORTED, and nothing is stepped.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import threading
import time
import warnings

import numpy as np
import torch
from monim.datastore import NamespaceConfig, NeighborStore, Rows, SearchResult, memory_ops
from monim.datastore.location import Location
from monim.datastore.memory_ops import BackwardPartials
from monim.datastore.transfer import host_bytes, source_tensor, to_device, to_host
from monim.datastore.wal import WriteAheadLog
from monim.protos import shared_memory
from monim.protos.errors import (
    Aborted,
    AlreadyExists,
    InvalidArgument,
    MemoryStoreError,
    NamespaceChanged,
    NamespaceNotFound,
    ResourceExhausted,
    StepAnswerLost,
)
from monim.workers.placement import Placement, PlacementChanged
from monim.workers.serve_config import format_size
from monim.workers.staged_steps import StagedSteps, default_budget, nbytes

log = logging.getLogger(__name__)

# Ray hands actors their array arguments read-only (zero-copy from the object store); the shard
# reads them into tensors and never writes to them, so torch's warning about that is noise.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

# Request ids (and committed step ids) remembered per shard, to apply each write at most once.
REMEMBERED_REQUESTS = 100_000
# Runs of ids (3 int64 each) the shard keeps, over all remembered requests, of which ids each applied.
REMEMBERED_ID_RUNS = 2_000_000
# Bytes of the partial sums a shard keeps of the parts of its latest committed steps, so that a retry
# of such a part (its call failed elsewhere after the commit) gets the sums of the values before the step.
REMEMBERED_PARTIALS_BYTES = 64 << 20
DEFAULT_SNAPSHOT_EVERY = 10_000
KEPT_EXPORTS = 64  # finished snapshot exports whose status a shard still answers
# Calls Shard.placed runs under its version check's hold of the lock (the others write, and wait for
# the disk without the lock).
_PLACED_READS = frozenset({"search", "forward", "get_present", "value_sum", "backward_part", "stage_gradients", "stats",
                           "abort_step", "prepare_step"})


def _serialized(method):
    """One call at a time per shard (a writer waiting for the disk lets the others in)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


@dataclasses.dataclass
class _Answer:
    """What a write's check returns to answer at once, without writing anything."""

    value: object


def default_memory_budget(device: str, num_shards: int) -> int:
    """Bytes a shard's rows may take when the deployment sets none: 90% of its GPU's memory (one GPU
    per shard), or on the CPU 80% of the host's memory shared by the deployment's shards (set
    --shard-memory-budget when shards of several nodes, or other processes, change that picture)."""
    if str(device).startswith("cuda"):
        return int(0.9 * torch.cuda.get_device_properties(torch.device(device)).total_memory)
    return int(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(1, num_shards))


class _Remembered(collections.OrderedDict):
    """A bounded map of the most recent keys (a key remembered again is the newest)."""

    def remember(self, key, value):
        self[key] = value
        self.move_to_end(key)
        while len(self) > REMEMBERED_REQUESTS:
            self.popitem(last=False)
        return value


class _RememberedIds(_Remembered):
    """(request id, op) -> [runs [R, 3], ...] (see _id_runs), bounded also by the runs it holds in all:
    the oldest requests' ids go first (such a request then counts as applied whole, as before shares
    were told apart). A share of a request comes within its router's call; the bound is for the
    writes of random ids (deletes, weight increments), whose runs are many."""

    def __init__(self, max_runs: int = 0):
        super().__init__()
        self.max_runs = max_runs or REMEMBERED_ID_RUNS
        self.runs = 0

    def remember(self, key, value):
        self.runs += sum(runs.shape[0] for runs in value) - sum(runs.shape[0] for runs in self.get(key, []))
        super().remember(key, value)
        while self.runs > self.max_runs and len(self) > 1:
            self.popitem(last=False)
        return value

    def popitem(self, last=True):
        key, value = super().popitem(last=last)
        self.runs -= sum(runs.shape[0] for runs in value)
        return key, value


class _RememberedPartials(collections.OrderedDict):
    """(step id, part, placement version) -> the partial sums a shard answered for a part of a step it
    committed (packed, on its device: slot_partials),
    bounded by the bytes they hold (the oldest steps' go first: a retry of one of those is answered
    StepAnswerLost, as after a restart)."""

    def __init__(self, max_bytes: int = 0):
        super().__init__()
        self.max_bytes = max_bytes or REMEMBERED_PARTIALS_BYTES
        self.bytes = 0

    def remember(self, key, partials) -> None:
        if key in self:
            self.bytes -= nbytes(self.pop(key))
        self[key] = partials
        self.bytes += nbytes(partials)
        while self.bytes > self.max_bytes and len(self) > 1:
            self.bytes -= nbytes(self.popitem(last=False)[1])

    def forget(self, step_prefix: str) -> None:
        """Drops the sums of the steps whose ids start with step_prefix (a dropped namespace's: on a GPU
        shard they hold its memory)."""
        for key in [key for key in self if key[0].startswith(step_prefix)]:
            self.bytes -= nbytes(self.pop(key))


def _runs_of(listed) -> np.ndarray:
    """Runs [R, 3] from their JSON form (a list of [first, last, step])."""
    return np.array(listed, np.int64).reshape(-1, 3)


def _range_runs(ranges) -> np.ndarray:
    """[first, end) ranges as runs [R, 3] (see _id_runs): each range one run of step 1."""
    return np.array([[first, end - 1, 1] for first, end in sorted(ranges) if end > first], np.int64).reshape(-1, 3)


def _in_any(shares: list, ids: np.ndarray) -> np.ndarray:
    """bool [N]: the ids in one of the sets (each runs [R, 3], see _id_runs)."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    inside = np.zeros(ids.shape[0], bool)
    for runs in shares:
        inside |= _in_runs(runs, ids)
    return inside


def _runs_meet(runs: np.ndarray, first: int, end: int) -> bool:
    """Whether the set's span meets [first, end) (runs sorted by first, last run's last the largest)."""
    return bool(runs.shape[0]) and int(runs[0, 0]) < end and int(runs[-1, 1]) >= first


def _applied_again(op: str, args: dict) -> bool:
    """Whether a write is applied again when its request id comes back: a delete by source. It names no
    rows, so no shard can say which of its rows it covered. Its round may be refused by one shard and
    taken by another (a reshard's placement reaches the shards one by one), then sent again, whole,
    after a batch moved: the shard that took it must delete the rows of the source the move brought
    it, and a shard that learnt of it from a move (its marks) its own rows of the source. Deleting the
    rows of the source a shard holds is the same change however often it is done; the count adds up.
    (The reliability run of seed 53 left 659 deleted rows stored before this: docs/RELIABILITY.md.)"""
    return op == "delete" and args.get("source") is not None


def _outside(shares: list, columns: dict) -> dict | None:
    """A write's columns without the rows whose ids are in shares (sets of ids a reshard moved here with
    the write applied, _id_runs each); None if no row is left. A write without ids is all inside (a delete
    by source is not asked: _applied_again)."""
    ids = columns.get("ids")
    if ids is None:
        return None
    return _rows_besides(columns, _in_any(shares, ids))


def _rows_besides(columns: dict, inside: np.ndarray) -> dict | None:
    """The write's columns without its rows where inside is True (one per id); None if none is left."""
    if not inside.any():
        return columns
    if inside.all():
        return None
    kept = ~inside
    rows = inside.shape[0]
    return {name: array[kept] if isinstance(array, np.ndarray) and array.ndim and array.shape[0] == rows
            else array for name, array in columns.items()}


def _id_runs(ids) -> np.ndarray:
    """A set of ids, compactly: runs [R, 3] of (first, last, step) covering the sorted unique ids, each
    run the ids first, first + step, ..., last (an Add's share on a shard, a block of ids taken by
    id % shards, is one run). Runs are sorted by first and meet at most at an end."""
    ids = np.unique(np.asarray(ids, np.int64).reshape(-1))
    if ids.size < 2:
        return np.array([[ids[0], ids[0], 1]] if ids.size else [], np.int64).reshape(-1, 3)
    gaps = np.diff(ids)
    starts = np.concatenate(([0], np.flatnonzero(gaps[1:] != gaps[:-1]) + 1))  # a run of equal gaps each
    ends = np.concatenate((starts[1:], [gaps.size]))
    return np.stack([ids[starts], ids[ends], gaps[starts]], axis=1)


def _ids_of(runs: np.ndarray, first: int = 0, end: int | None = None) -> np.ndarray:
    """The ids of a set (runs [R, 3], see _id_runs) in [first, end), sorted and distinct."""
    runs = np.asarray(runs, np.int64).reshape(-1, 3)
    runs = runs[(runs[:, 1] >= first) & ((runs[:, 0] < end) if end is not None else True)]  # those that meet it
    parts = []
    for start, last, step in runs.tolist():
        if end is not None:
            last = min(last, end - 1)
        if first > start:  # the run's first id at or past first
            start += -(-(first - start) // step) * step
        if start <= last:
            parts.append(np.arange(start, last + 1, step, dtype=np.int64))
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)  # (runs may share an end)


def _ids_of_shares(shares, first: int = 0, end: int | None = None) -> np.ndarray:
    """The ids of several sets (each runs [R, 3]; they may overlap) in [first, end), sorted and distinct."""
    return np.unique(np.concatenate([_ids_of(runs, first, end) for runs in shares]))


def _in_runs(runs: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Whether each of ids is in the set _id_runs made."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    if not runs.shape[0] or not ids.size:
        return np.zeros(ids.shape[0], bool)
    run = np.searchsorted(runs[:, 0], ids, side="right") - 1  # the last run starting at or before each id
    found = run >= 0
    first, last, step = (runs[np.maximum(run, 0), column] for column in range(3))
    return found & (ids <= last) & ((ids - first) % step == 0)


class Shard:
    """shard_index: 0-based position in the deployment, of num_shards; device: "cpu", "cuda" or "auto"."""

    def __init__(self, shard_index: int, num_shards: int = 1, device: str = "auto", data_dir: str | None = None,
                 fsync: str = "always", snapshot_every: int = DEFAULT_SNAPSHOT_EVERY, memory_budget: int | None = None,
                 placement: dict | None = None):
        """data_dir: the deployment's data folder (None: nothing is kept on disk). The shard keeps
        ``shard-<i>/wal`` and ``shard-<i>/snapshot-<seq>`` there, and recovers from them here:
        the latest whole snapshot, then every log record after it. snapshot_every: log records
        between automatic snapshots (0: only on demand). memory_budget: bytes the shard's rows may
        take on its device (None: default_memory_budget); an Add or restore that would pass it is
        refused (RESOURCE_EXHAUSTED) before anything is allocated or logged."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.memory_budget = default_memory_budget(device, num_shards) if memory_budget is None else int(memory_budget)
        self.shard_index = shard_index
        self.num_shards = num_shards
        # workers/placement.py: which ids this shard holds (a reshard's new shard: the placement before
        # the move, which does not name it, so it takes no write until the move's placement reaches it)
        self.placement = Placement(0, num_shards) if placement is None else Placement.from_dict(placement)
        self.device = device
        if torch.device(device).type == "cuda":  # requests out of clients' regions into pinned memory
            shared_memory.copy_requests_into(host_bytes)
        self.stores: dict[str, NeighborStore] = {}
        self._applied = _Remembered()     # (request id, operation) -> result
        self._committed = _Remembered()   # step id -> rows updated
        # Writes (request id, operation) and steps (step id, "step") that other shards applied to rows a
        # reshard moved here: -> the ids of those moves it covered, as a list of _id_runs sets
        # (_learn_moved_writes). A retry skips those ids (applied already, where they were) and applies
        # the rest (never sent there).
        self._moved = _Remembered()
        # A write by ids (add, increment_weights, delete) may reach this shard in several shares under
        # one request id: after a reshard refused some, the router sends their rows again to their
        # owners at the new placement. (request id, op) -> the ids applied here, as _id_runs of each
        # share: a later share applies the rest, a retry of a share nothing.
        self._applied_ids = _RememberedIds()
        # (request id, "delete") -> the ids that delete removed (_id_runs of each share), here or, learnt
        # from a reshard's move, at the old owner of ids this shard holds now: a Delete by ids retried
        # answers, share by share, the rows of its ids the request deleted, wherever its shares went
        # (the count of a shard that a shrink removed is not lost with it). A request it no longer
        # remembers (the bound) answers the shard's own count, as before.
        self._deleted_ids = _RememberedIds()
        # (request id, op) -> the router's digest of the whole request (a delete's ids): a request id
        # used again by another request answers the first one's result and applies nothing, however its
        # ids fall on the shards (its rows are no share of the first request).
        self._digests = _Remembered()
        # Parts of steps waiting for their commit, bounded by age, count and bytes (workers/staged_steps.py)
        self._staged = StagedSteps(default_budget(self.memory_budget), shard_index)
        self._answered = _RememberedPartials()  # what the parts of committed steps answered
        self._lock = threading.RLock()
        # Writers wait on this (it releases the lock) for their record's fdatasync and their turn to
        # apply; snapshots wait on it for every logged record to be applied.
        self._changes = threading.Condition(self._lock)
        self._applied_through = 0  # log sequence number of the last record applied
        self._draining = False     # a snapshot is waiting for the logged records: new writes wait
        self._snapshotting = False  # a snapshot is being taken (its files may still be written after)
        self._appending = 0        # writers between their check and the end of their log append
        self._logged: dict[int, tuple] = {}    # log sequence number -> (op, args, columns) not applied yet
        self._outcomes: dict[int, tuple] = {}  # log sequence number -> (applied?, result or error) for its writer
        self._committing: set[str] = set()  # steps between their staged parts' removal and their record
        self.snapshot_every = snapshot_every
        self._records_since_snapshot = 0
        # Snapshot files are written on this thread, after the rows were copied under the lock.
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="monim-snapshot")
        self.closed = False  # close() ran: a shrink retired it (an in-process runtime then drops it)
        self._snapshot_written: concurrent.futures.Future | None = None  # the latest snapshot's files being written
        self._exports: dict[str, concurrent.futures.Future] = {}
        self.recovery: dict = {}
        self.folder = None if data_dir is None else Location.of(data_dir) / f"shard-{shard_index}"
        self.wal = None if self.folder is None else WriteAheadLog(self.folder / "wal", fsync, self._log_advanced)
        if self.folder is not None:
            self._recover()

    def _store(self, namespace: str, generation: int = 0) -> NeighborStore:
        store = self.stores.get(namespace)
        if store is None:
            raise NamespaceNotFound(namespace)
        if generation and store.config.generation != generation:
            raise NamespaceChanged(namespace, generation, store.config.generation)
        return store

    # ----- the log: every change is written, then applied; recovery applies it again --------------
    def _write(self, op: str, args: dict, columns: dict | None = None, check=None):
        """Logs the change, waits until the log has it on disk, then applies it (in log order) and
        answers. Called without the shard's lock: it takes it to check (``check()``, which raises
        to refuse, or returns an _Answer to answer without writing), releases it while the record
        is encoded, checksummed and written and while it waits for the disk, so reads go on and
        other writers log theirs meanwhile (one fdatasync covers them all: group commit). Durable
        records are applied in log order under the lock, a group at a time by whichever of their
        writers gets there first; each writer answers its own record's outcome. A request id the
        shard has applied already answers its first result, and nothing is written; but for a delete by
        source, which is applied again (_applied_again)."""
        key = (args.get("request_id"), op)
        columns = {name: array for name, array in (columns or {}).items() if array is not None}
        again = _applied_again(op, args)
        with self._changes:
            # The wait comes first: the check and the count of writers in flight must be one hold of
            # the lock, or a placement taken during the wait (a reshard's freeze) would not see this write.
            self._changes.wait_for(lambda: not self._draining)
            if key[0] and key in self._applied and not again:
                columns = None if self._another_request(key, args) else self._not_applied(key, columns)
                if columns is None:
                    return self._applied[key]
            answer = check() if check is not None else None
            if isinstance(answer, _Answer):
                return answer.value
            if key[0] and key in self._moved and not again:
                columns = _outside(self._moved[key], columns)
                if columns is None:
                    return 0
            if self.wal is None:
                return self._apply(op, args, columns)
            self._appending += 1
        try:
            number = self.wal.append(op, args, columns)
        finally:
            with self._changes:
                self._appending -= 1
                self._changes.notify_all()
        with self._changes:
            self._records_since_snapshot += 1
            self._logged[number] = (op, args, columns)
            while number not in self._outcomes:
                self._apply_durable()
                if number not in self._outcomes:
                    self.wal.check(number)  # raises if the log failed before this record was durable
                    self._changes.wait()
            applied, value = self._outcomes.pop(number)
            snapshot_due = self.snapshot_every and self._records_since_snapshot >= self.snapshot_every
        if snapshot_due:
            self.snapshot(wait=False)
        if not applied:
            raise value
        return value

    def _apply_durable(self) -> None:
        """Applies, in log order, every logged record that is durable and whose predecessors are
        applied, whichever writer logged it (one writer applies a whole group: fewer hand-offs),
        and leaves each outcome for its writer. Under the lock."""
        applied = False
        while self._applied_through + 1 in self._logged and self.wal.synced > self._applied_through:
            number = self._applied_through + 1
            op, args, columns = self._logged.pop(number)
            try:
                self._outcomes[number] = (True, self._apply(op, args, columns))
            except Exception as error:  # noqa: BLE001 - raised in the thread of the writer it belongs to
                self._outcomes[number] = (False, error)
            self._applied_through = number
            applied = True
        if applied:
            self._changes.notify_all()

    def _deleted_here(self, namespace: str, key, counted: int) -> int:
        """A delete by source's answer here, applied (again): the ids it deleted, here or at an old owner
        of rows now placed here (a move's marks), that this shard owns at the placement it is applied at,
        so that the shards' answers to a retry after a reshard add up to the first answer (the count of
        a shard a shrink retired came with its marks). counted (the deletes here over all tries) where
        the ids are not known (evicted from _deleted_ids)."""
        shares = self._deleted_ids.get(key)
        if shares is None:
            return counted
        deleted = _ids_of_shares(shares)
        return int((self.placement.owners(namespace, deleted) == self.shard_index).sum())

    def _another_request(self, key, args: dict) -> bool:
        """Whether this write reuses the request id of another request (their digests differ)."""
        known, digest = self._digests.get(key), args.get("digest")
        return bool(known) and bool(digest) and known != digest

    def _not_applied(self, key, columns: dict) -> dict | None:
        """The rows of a write whose request (key) was applied here before that it did not cover (another
        share of it: see _applied_ids); None when it covered them all, or when the write has no ids or
        the shard does not know which ids the request covered (a write without ids; a request applied
        before a restart from a snapshot that did not keep them): the whole write counts as applied."""
        ids, shares = columns.get("ids"), self._applied_ids.get(key)
        if ids is None or shares is None:
            return None
        return _rows_besides(columns, _in_any(shares, ids))

    def _exists(self, namespace: str, generation: int):
        """A write's check: the namespace (of that generation) is stored here, else NOT_FOUND / FAILED_PRECONDITION."""
        return lambda: self._store(namespace, generation) and None

    def _log_advanced(self) -> None:
        """The log synced more records (or failed): writers waiting for theirs look again."""
        with self._changes:
            self._changes.notify_all()

    def _apply(self, op: str, args: dict, columns: dict):
        """The one place a change happens, live or replayed from the log."""
        namespace, generation = args.get("namespace"), args.get("generation", 0)
        key, again = (args.get("request_id"), op), _applied_again(op, args)
        earlier = None  # this request's result here so far, when another share of it was applied
        if key[0] and key in self._applied:  # the same request logged twice (two racing retries), or another share
            if not again and self._another_request(key, args):
                return self._applied[key]
            rest = columns if again else self._not_applied(key, columns)
            if rest is None:
                return self._applied[key]
            columns, earlier = rest, self._applied[key]
        if op == "step" and args["step_id"] in self._committed:
            return self._committed[args["step_id"]]
        if op == "create":
            config = NamespaceConfig.from_dict(args["config"])
            existing = self.stores.get(config.name)
            if existing is not None:  # two creates were logged before either was applied
                if existing.config.generation == config.generation:
                    return None
                raise AlreadyExists(f"namespace {config.name!r} already exists on shard {self.shard_index}")
            self.stores[config.name] = NeighborStore(config, device=self.device, id_stride=self.num_shards,
                                                     id_offset=self.shard_index)
            return None
        if op == "drop":
            store = self.stores.get(namespace)
            if store is None or (generation and store.config.generation != generation):
                return 0  # dropped (or re-created) by a change logged before this one
            del self.stores[namespace]
            store.close()
            self._staged.drop_namespace(namespace)
            self._answered.forget(f"{namespace}:")  # step ids are "<namespace>:<generation>:<id>"
            return len(store)
        if op == "placement":
            return self._apply_placement(args)
        store = self._store(namespace, generation)
        if op == "receive":
            return self._apply_receive(store, args, columns)
        if op == "add":
            result = len(store.add(columns["keys"], columns["tokens"], columns.get("values"), columns.get("weights"),
                                   args["source"], ids=columns["ids"]))
        elif op == "increment_weights":
            result = store.increment_weights(columns["ids"], columns["counts"])
        elif op == "delete":
            removed = store.remove(ids=columns.get("ids"), source=args.get("source"))
            result = int(removed.size)
            if key[0] and removed.size:
                self._deleted_ids.remember(key, self._deleted_ids.get(key, []) + [_id_runs(removed)])
        elif op == "step":
            result = store.step(columns["ids"], columns["grads"], held=args.get("held")) if columns["ids"].size else 0
            return self._committed.remember(args["step_id"], result)
        else:
            raise InvalidArgument(f"unknown log record {op!r}")
        if key[0]:  # remembered: what the request did here, all its shares (this share answers its own)
            both = earlier + result if isinstance(earlier, int) and isinstance(result, int) else result
            if again:  # a delete by source: the rows it deleted that this shard owns now
                both = self._deleted_here(namespace, key, both)
            self._applied.remember(key, both)
            if args.get("digest"):
                self._digests.remember(key, args["digest"])
            if columns.get("ids") is not None:
                self._applied_ids.remember(key, self._applied_ids.get(key, []) + [_id_runs(columns["ids"])])
            if again:  # the whole request here, as a retry of any other write answers
                return both
        return result

    def _recover(self) -> None:
        """The latest whole snapshot, then the log after it (a record that failed when it was
        first applied fails again, changing nothing, as it did then)."""
        started = time.monotonic()
        covered, replayed, skipped = 0, 0, 0
        latest = self._snapshots()[-1:]
        if latest:
            from monim.datastore import snapshot

            manifest, self.stores = snapshot.load_shard_snapshot(latest[0].filesystem, latest[0].path, device=self.device)
            extra = manifest.get("extra", {})
            covered = extra.get("wal_covered", 0)
            if "placement" in extra:
                self.placement = Placement.from_dict(extra["placement"])
            for request_id, op, result in extra.get("applied", []):
                self._applied.remember((request_id, op), result)
            for step_id, result in extra.get("committed", []):
                self._committed.remember(step_id, result)
            for request_id, op, ranges in extra.get("moved", []):  # written before moves kept exact ids
                self._moved.remember((request_id, op), [_range_runs(ranges)])
            for request_id, op, shares in extra.get("moved_runs", []):
                self._moved.remember((request_id, op), [_runs_of(runs) for runs in shares])
            for request_id, op, shares in extra.get("applied_ids", []):
                self._applied_ids.remember((request_id, op), [_runs_of(runs) for runs in shares])
            for request_id, op, digest in extra.get("digests", []):
                self._digests.remember((request_id, op), digest)
            for request_id, shares in extra.get("deleted_ids", []):
                self._deleted_ids.remember((request_id, "delete"), [_runs_of(runs) for runs in shares])
        for op, args, columns in self.wal.replay(after=covered):
            try:
                self._apply(op, args, columns)
                replayed += 1
            except MemoryStoreError:
                skipped += 1
        self.recovery = {"snapshot": str(latest[0]) if latest else None, "records_replayed": replayed,
                         "records_refused_again": skipped, "seconds": round(time.monotonic() - started, 3),
                         "rows": sum(len(store) for store in self.stores.values())}
        log.info("shard %d recovered: %s", self.shard_index, self.recovery)

    def _snapshots(self) -> list[Location]:
        """Whole snapshots (their manifest is written last), oldest first."""
        return [self.folder / name for name in self.folder.names() if name.startswith("snapshot-")
                and (self.folder / name / "manifest.json").exists()]

    def snapshot(self, wait: bool = True) -> dict | None:
        """Writes every namespace of this shard to a new snapshot, then deletes the log segments and
        the older snapshot it covers. The rows are copied to host memory under the shard's lock (a
        memcpy, once every logged record is applied); the files are written and synced after that,
        by the shard's snapshot thread, with the lock free: reads and writes go on while the disk
        works. wait=True (CreateSnapshot) answers the manifest once the files are durable;
        wait=False (automatic snapshots) answers at once. None without a data dir, or (wait=False)
        while another snapshot is being taken."""
        if self.folder is None:
            return None
        while True:
            with self._changes:
                pending = self._snapshot_written
                if pending is None or pending.done():
                    written = self._snapshot_captured(wait)
                    break
            if not wait:
                return None
            # One snapshot's files at a time: two of the same log position would write one folder.
            concurrent.futures.wait([pending])
        if not isinstance(written, concurrent.futures.Future):
            return written
        return written.result() if wait else None

    def _snapshot_captured(self, wait: bool):
        """Under the lock: the log rotated and the rows captured, once every logged record is applied
        (the wait for them lets other calls in); the files' writing submitted to the snapshot thread.
        Returns its future, or the manifest of the snapshot there is when nothing was logged since,
        or None (wait=False, another snapshot is being captured)."""
        if self._snapshotting and not wait:
            return None
        self._changes.wait_for(lambda: not self._snapshotting)
        self._snapshotting = self._draining = True
        try:
            self._changes.wait_for(lambda: (self._appending == 0 and self._applied_through == self.wal.written)
                                   or self.wal.failed is not None)
            return self._snapshot_drained(wait)
        finally:
            self._snapshotting = self._draining = False
            self._changes.notify_all()

    def _snapshot_drained(self, wait: bool):
        """_snapshot_captured, once every logged record is applied."""
        from monim.datastore import snapshot

        if self._applied_through != self.wal.written:
            raise self.wal.failure()
        covered = self.wal.rotate()
        extra = {"wal_covered": covered,
                 "applied": [[key[0], key[1], value] for key, value in self._applied.items()
                             if isinstance(value, (int, type(None)))],
                 "committed": [[key, value] for key, value in self._committed.items()],
                 "moved_runs": [[key[0], key[1], [runs.tolist() for runs in shares]]
                                for key, shares in self._moved.items()],
                 "applied_ids": [[key[0], key[1], [runs.tolist() for runs in shares]]
                                 for key, shares in self._applied_ids.items()],
                 "digests": [[key[0], key[1], digest] for key, digest in self._digests.items()],
                 "deleted_ids": [[key[0], [runs.tolist() for runs in shares]]
                                 for key, shares in self._deleted_ids.items()],
                 "placement": self.placement.to_dict()}
        target = self.folder / f"snapshot-{covered:012d}"
        self._records_since_snapshot = 0
        if (target / "manifest.json").exists():  # nothing was logged since that snapshot: it is this one
            return snapshot.read_manifest(target.filesystem, target.path) if wait else None
        captured = snapshot.capture(self.stores)

        def write() -> dict:
            manifest = snapshot.write_captured(captured, target.filesystem, target.path, shard=self.shard_index,
                                               num_shards=self.num_shards, extra=extra)
            self.wal.drop_through(covered)
            for old in self._snapshots():
                if old.path != target.path:
                    old.delete()
            return manifest

        def background() -> None:
            try:
                write()
            except Exception:  # noqa: BLE001 - the log still covers everything; the next snapshot retries
                log.exception("shard %d: background snapshot %s failed", self.shard_index, target)

        self._snapshot_written = self._writer.submit(write if wait else background)
        return self._snapshot_written

    def close(self) -> None:
        """Stops its read endpoint, finishes a background snapshot and closes the log (a shard whose
        process ends needs none of this)."""
        from monim.workers.read_endpoint import stop_endpoint

        self.closed = True
        stop_endpoint(self)
        self._writer.shutdown(wait=True)
        if self.wal is not None:
            self.wal.close()

    def wait_for_snapshot(self) -> None:
        """Returns once a background snapshot being written is done."""
        if self._snapshot_written is not None:
            concurrent.futures.wait([self._snapshot_written])

    @_serialized
    def export_snapshot(self, location: str, namespaces: list[str], job: str) -> str:
        """Starts writing the given namespaces held here to a snapshot at location (a path or URI):
        the rows are copied to host memory now, the files are written in the background while the
        shard goes on serving. job: the caller's id for this export, one per CreateSnapshot, so that
        the same export sent again (a round retried for another shard's sake) starts nothing, while a
        new one at a taken location fails as it must. Returns job for export_status. (A deployment
        snapshot: workers/snapshots.py.)"""
        from monim.datastore import snapshot

        if job in self._exports:
            return job
        captured = snapshot.capture({name: self.stores[name] for name in namespaces if name in self.stores})
        self._exports[job] = self._writer.submit(snapshot.write_captured, captured, *snapshot.resolve(location),
                                                 shard=self.shard_index, num_shards=self.num_shards)
        return job

    @_serialized
    def export_status(self, job: str) -> dict | None:
        """None while the export is being written; then its manifest (or its error, raised)."""
        future = self._exports.get(job)
        if future is None:
            raise InvalidArgument(f"no snapshot export {job!r} on shard {self.shard_index}")
        if not future.done():
            return None
        # Kept, not dropped, once read: a round of status calls is sent again when another shard
        # restarts, and this shard must answer it the same. The oldest finished ones go.
        finished = [other for other, done in self._exports.items() if done.done() and other != job]
        for other in finished[:max(0, len(finished) - KEPT_EXPORTS)]:
            del self._exports[other]
        return future.result()

    @_serialized
    def restore_rows(self, namespace: str, generation: int, table) -> int:
        """Appends rows of a snapshot (a pyarrow Table in the snapshot's schema, every column: values,
        sources, optimizer state, steps) to the namespace; returns how many. Made durable by the
        snapshot the restore takes at its end."""
        from monim.datastore import snapshot

        store = self._store(namespace, generation)
        self._check_room(namespace, table.num_rows)
        return snapshot.append_rows(store, table)

    @_serialized
    def ping(self) -> dict:
        return {"shard": self.shard_index, "device": self.device, "namespaces": len(self.stores),
                "pid": os.getpid(), "recovery": self.recovery}

    # ----- namespaces ----------------------------------------------------------
    def create_namespace(self, config: dict) -> None:
        """Idempotent for the same generation; ALREADY_EXISTS if another incarnation is stored."""
        parsed = NamespaceConfig.from_dict(config)

        def check():
            existing = self.stores.get(parsed.name)
            if existing is not None:
                if existing.config.generation == parsed.generation:
                    return _Answer(None)
                raise AlreadyExists(f"namespace {parsed.name!r} already exists on shard {self.shard_index}")

        self._write("create", {"config": parsed.to_dict()}, check=check)

    def drop_namespace(self, namespace: str, generation: int = 0) -> int:
        """Drops the namespace if it is of this generation (0: any); returns the rows dropped
        (0 when absent or of another generation, which is left alone)."""

        def check():
            store = self.stores.get(namespace)
            if store is None or (generation and store.config.generation != generation):
                return _Answer(0)

        return self._write("drop", {"namespace": namespace, "generation": generation}, check=check)

    @_serialized
    def stats(self, namespace: str, generation: int = 0) -> dict:
        """The store's stats; its rows leave out the copies of a batch a reshard is moving here."""
        hidden = self._incoming(namespace)
        stats = self._store(namespace, generation).stats()
        stats["rows"] -= 0 if hidden is None else int(hidden.size)
        return dict(stats, shard=self.shard_index, staged_steps=len(self._staged), staged_bytes=self._staged.bytes,
                    memory_used=self._memory_used(), memory_budget=self.memory_budget)

    @_serialized
    def check_room(self, namespace: str, generation: int, request_id: str, rows: int) -> None:
        """RESOURCE_EXHAUSTED if an Add of rows rows would pass the memory budget (the router asks
        before a multi-shard Add, so that no shard takes its part when another has no room). An
        Add this shard has applied already needs no room."""
        self._store(namespace, generation)
        if not (request_id and (request_id, "add") in self._applied):
            self._check_room(namespace, rows)

    def _memory_used(self) -> int:
        """Bytes of the shard's rows (their columns, allocated) and of the rows kept for recent steps."""
        return sum(store.nbytes + store.kept_rows.bytes for store in self.stores.values())

    def _check_room(self, namespace: str, rows: int, generation: int = 0) -> None:
        """RESOURCE_EXHAUSTED, naming the numbers, if appending rows to the namespace would take the
        shard past its memory budget (checked before anything is allocated or logged); NOT_FOUND /
        FAILED_PRECONDITION if the namespace (of that generation) is not stored here."""
        store = self._store(namespace, generation)
        grown = store.growth_bytes(int(rows))
        used = self._memory_used()
        kept = sum(held.kept_rows.bytes for held in self.stores.values())
        if grown and used + grown > self.memory_budget >= used - kept + grown:
            for held in self.stores.values():  # rows first: the kept rows of steps are a cache
                held.drop_kept_rows()
            used = self._memory_used()
        if grown and used + grown > self.memory_budget:
            raise ResourceExhausted(
                f"shard {self.shard_index} has no room for {int(rows)} more rows of namespace {namespace!r}: it "
                f"would allocate {format_size(grown)} for them, and holds {format_size(used)} of its "
                f"{format_size(self.memory_budget)} budget of {self.device} memory (monim serve --shard-memory-budget; "
                "more shards; or delete rows)")

    # ----- data ------------------------------------------------------------------
    def add(self, namespace: str, generation: int, request_id: str, ids: np.ndarray, keys: np.ndarray,
            tokens: np.ndarray, values: np.ndarray | None, weights: np.ndarray | None, source: str) -> int:
        """Stores rows with router-chosen ids; returns how many."""
        return self._write("add", {"namespace": namespace, "generation": generation, "request_id": request_id,
                                   "source": source},
                           {"ids": ids, "keys": keys, "tokens": tokens, "values": values, "weights": weights},
                           check=lambda: (self._check_owned(namespace, generation, ids),
                                          self._check_room(namespace, len(ids), generation)) and None)

    def increment_weights(self, namespace: str, generation: int, request_id: str, ids: np.ndarray,
                          counts: np.ndarray) -> None:
        self._write("increment_weights", {"namespace": namespace, "generation": generation, "request_id": request_id},
                    {"ids": ids, "counts": counts}, check=lambda: self._check_owned(namespace, generation, ids))

    def delete(self, namespace: str, generation: int, request_id: str, ids: np.ndarray | None,
               source: str | None, digest: str = "") -> int:
        """digest: the router's digest of the whole request's ids (see _digests)."""
        def check():
            if ids is not None:
                return self._check_owned(namespace, generation, ids)
            self._store(namespace, generation)
            if self.placement.any_frozen(namespace):
                raise PlacementChanged(f"shard {self.shard_index}: rows of namespace {namespace!r} are being moved "
                                       "by a reshard; a delete by source waits for the batch", self.placement.version)

        result = self._write("delete", {"namespace": namespace, "generation": generation, "request_id": request_id,
                                        "source": source, "digest": digest}, {"ids": ids}, check=check)
        if ids is None or not request_id:
            return result
        with self._changes:  # the share's rows the request deleted (_deleted_ids), if it reused no other's id
            shares = self._deleted_ids.get((request_id, "delete"))
            if shares is None or self._another_request((request_id, "delete"), {"digest": digest}):
                return result
            return int(_in_any(shares, np.unique(ids)).sum())

    @_serialized
    def search(self, namespace: str, generation: int, queries: np.ndarray, k: int, return_keys: bool,
               return_values: bool, return_weights: bool, nprobe: int = 0, rerank: int = 0, ef: int = 0,
               keep_rows: str = "") -> SearchResult:
        return self._store(namespace, generation).search(queries, k, return_keys, return_values, return_weights,
                                                         nprobe, rerank, ef=ef, hidden=self._incoming(namespace),
                                                         keep_rows=self._kept_name(keep_rows))

    @_serialized
    def get_present(self, namespace: str, generation: int, ids: np.ndarray,
                    return_optimizer_state: bool = False) -> tuple[Rows | None, np.ndarray]:
        """(rows of the stored ids, in order, or None; the ids not stored here)."""
        store = self._store(namespace, generation)
        present = store.contains(ids)
        rows = store.get(ids[present], return_optimizer_state) if present.any() else None
        return rows, ids[~present]

    # ----- learnable memory ----------------------------------------------------------
    @_serialized
    def forward(self, namespace: str, generation: int, queries: np.ndarray, k: int, temperature: float,
                keep_rows: str = "", nprobe: int = 0, rerank: int = 0, ef: int = 0):
        """A Retrieve's forward on a deployment of one shard, whole: NeighborStore.forward."""
        return self._store(namespace, generation).forward(queries, k, temperature, self._kept_name(keep_rows),
                                                          nprobe, rerank, ef=ef)

    def _kept_name(self, name: str) -> str:
        """The name a store keeps a search's rows under (NeighborStore.kept_rows): only while this shard
        holds every row (its answer is the whole answer), and with the placement's version in it, so rows
        kept at another placement are never taken for this one's (a router whose placement was stale when
        it chose to keep them may have searched the two shards of a grow, each keeping its own half)."""
        placement = self.placement
        if not name or not placement.alone or self.shard_index != 0:
            return ""
        return f"{placement.version}:{name}"

    def _kept(self, kept: tuple[str, int] | None) -> tuple[str, int] | None:
        """(name, first) as the store knows it (NeighborStore._kept_part), or None where rows are not kept."""
        name = self._kept_name(kept[0]) if kept else ""
        return (name, kept[1]) if name else None

    @_serialized
    def value_sum(self, namespace: str, generation: int, ids: np.ndarray, alpha: np.ndarray,
                  kept: tuple[str, int] | None = None) -> np.ndarray:
        """float32 [B, value_dim]: this shard's part of sum_i alpha_i v_i; NOT_FOUND if one of
        its ids went since the search. kept: (the forward's kept_rows, first row), taken by _kept."""
        return self._store(namespace, generation).value_sum(ids, alpha, self._kept(kept))

    @_serialized
    def backward_part(self, namespace: str, generation: int, step_id: str, part: int, queries, ids, alpha,
                      distances, grad_memory, kept: tuple[str, int] | None = None,
                      finish: tuple[str, float] | None = None):
        """This shard's partial sums of one part of a Retrieve backward (BackwardPartials of numpy
        arrays); its value gradients wait, staged under step_id, for commit_step. NOT_FOUND (nothing
        staged) if one of its ids is gone. A part of a step this shard already committed (a retry) gets
        the partials it answered before the step (while it keeps them: _RememberedPartials), and
        stages nothing; once they are gone (a restart, a reshard, aged out) StepAnswerLost, unless this
        shard holds none of the part's ids (its sums are zeros, whatever the values).
        finish: (metric, temperature), from a router whose placement is alone (this shard holds every
        row, and the version check says its placement is the router's): the finished answer
        (grad_queries float32 [B, dim], grad_temperature), combined on this shard's device, instead of
        the partials (the sums are 4x grad_queries' bytes, and a GPU shard adds them in a millisecond)."""
        store = self._check_owned(namespace, generation, ids)
        stages = self._stages(step_id)
        # Sums remembered at another placement may cover rows another shard holds now (and sums again).
        packed = self._answered.get((step_id, part, self.placement.version)) if not stages else None
        if packed is None and not stages and (ids >= 0).any():
            # Sums over the values after the step would be wrong answers (found by the reliability run of seed 89).
            raise StepAnswerLost(step_id.split(":", 2)[-1], self.shard_index)  # the caller's id, not its _step_key
        if packed is None:
            packed, step_ids, grads, held = store.backward_partials(queries, ids, alpha, distances, grad_memory,
                                                                    self._kept(kept))
            if stages:
                self._staged.stage(namespace, generation, step_id, part, step_ids, grads, (self.placement.version, packed),
                                   actors=self.placement.actors, held=held)
        if finish is None:
            return BackwardPartials.unpack(to_host(packed))
        grad_queries, grad_temperature = memory_ops.combine_backward(BackwardPartials.unpack(packed), queries, *finish)
        if torch.is_tensor(queries):
            # A device path's forward (its queries a tensor, in this process) gets its answer where it is, not
            # waited for: the router queues the step's commit behind these sums before it reads grad_temperature.
            return grad_queries, grad_temperature
        return to_host(grad_queries), float(grad_temperature)

    @_serialized
    def stage_gradients(self, namespace: str, generation: int, step_id: str, part: int, ids: np.ndarray,
                        grads: np.ndarray, check_step: bool = True) -> int:
        """Stages value gradients for ids (all of which belong here) after checking they are stored
        and, with check_step, that this part, stepped alone, would keep the rows finite (INVALID_ARGUMENT
        otherwise; the commit checks the whole step again, all or nothing on this shard: a step staged
        on one shard alone needs no check before it)."""
        store = self._check_owned(namespace, generation, ids)
        store.check_stored(ids)
        staged = source_tensor(grads)  # read-only when it came through Ray or a request
        if self.wal is None:  # nothing is logged: the gradients go to the rows' device once, here
            staged = to_device(grads, store.device)
        if staged.device.type == "cpu" and grads.flags.writeable:
            staged = staged.clone()  # the caller's own array (an in-process router passes views): kept until the commit
        if ids.flags.writeable:
            ids = ids.copy()
        if ids.size and check_step:
            store.step(ids, staged, dry_run=True)
        if self._stages(step_id):
            self._staged.stage(namespace, generation, step_id, part, ids, staged, actors=self.placement.actors)
        return int(ids.size)

    def _stages(self, step_id: str) -> bool:
        """Whether a part of step_id is staged: not once the step is committed, nor while its commit is
        being written (a late part of a first attempt, its retry committing: staged then, it would stay,
        never committed, and hold up a reshard of its rows)."""
        return step_id not in self._committed and step_id not in self._committing

    def commit_step(self, namespace: str, generation: int, step_id: str, expect_parts: bool = False) -> int:
        """Applies the staged parts of step_id as one optimizer step; returns the rows updated.
        Committing again answers the first result. expect_parts: every part of the step came here
        (ABORTED if none is staged, e.g. after a restart); else a step with nothing here updates 0 rows.
        ABORTED, nothing stepped, if parts of the step were dropped here (for room or age) and not staged
        again (StagedSteps.missing: a later part staged it afresh)."""
        with self._changes:
            self._changes.wait_for(lambda: step_id not in self._committing)  # a retry waits for the first try
            if step_id in self._committed:
                return self._committed[step_id]
            store = self._store(namespace, generation)
            staged = self._staged.get(step_id)
            if staged is not None and (staged.namespace, staged.generation) != (namespace, store.config.generation):
                raise InvalidArgument(f"step {step_id!r} was staged for namespace {staged.namespace!r}, not "
                                      f"{namespace!r}: nothing was stepped")
            self._check_not_dropped(step_id)
            self._staged.pop(step_id)
            for part, (version, packed) in (staged.partials.items() if staged is not None else ()):
                self._answered.remember((step_id, part, version), packed)
            if staged is None and expect_parts:
                raise Aborted(f"step {step_id!r} has no staged parts on shard {self.shard_index} (lost in a "
                              "restart, or dropped: unused for 30 s while the shard needed room, or for 10 "
                              "minutes): nothing was stepped; run the backward again")
            parts = staged.in_order() if staged is not None else []
            ids = np.concatenate([ids for ids, _ in parts]) if parts else np.empty(0, np.int64)
            grads = self._joined_gradients([g for _, g in parts], store)
            args = {"namespace": namespace, "generation": generation, "step_id": step_id}
            if (step_id, "step") in self._moved:  # committed where some of its rows were before a reshard
                kept = ~_in_any(self._moved[(step_id, "step")], ids)
                ids, grads = ids[kept], grads[torch.from_numpy(kept).to(grads.device) if torch.is_tensor(grads) else kept]
            elif self.wal is None and len(parts) == 1 and staged.held:
                # One backward's rows, as its store held them: the step needs no id lookup or sort (a
                # logged record has no place for them: a replay looks its ids up).
                args["held"] = next(iter(staged.held.values()))
            self._committing.add(step_id)
        try:
            return self._write("step", args, {"ids": ids, "grads": grads})
        finally:
            with self._changes:
                self._committing.discard(step_id)
                self._changes.notify_all()

    def _joined_gradients(self, grads: list[torch.Tensor], store: NeighborStore):
        """One step's staged gradients as one array: on the host for the log (numpy), or, with no
        log, a tensor on the rows' device (a GPU step's [U, value_dim] never makes a round trip
        through host memory: at B=4096, k=1024 that is ~3 GB each way)."""
        if not grads:
            return np.empty((0, store.config.value_dim), np.float32)
        if self.wal is None:  # (one part, the usual step, is taken as it is: no copy of its [U, value_dim])
            return grads[0].to(store.device) if len(grads) == 1 else torch.cat([g.to(store.device) for g in grads])
        return torch.cat([g.cpu() for g in grads]).numpy()

    @_serialized
    def prepare_step(self, namespace: str, generation: int, step_id: str) -> int:
        """The first round of a commit on several shards: ABORTED if parts of the step were dropped here
        and not staged again (then no shard steps: the router aborts it everywhere); else its staged
        parts are kept from eviction (not from expiry) until the commit or an abort. Returns the shard count of
        the placements its parts here were routed with (0: none held): shards past it (a grow's, that
        joined after the parts were sent) are not told to expect parts."""
        if step_id in self._committed:
            return 0
        self._store(namespace, generation)
        self._check_not_dropped(step_id)
        self._staged.pin(step_id)
        staged = self._staged.get(step_id)
        return 0 if staged is None else staged.actors

    def _check_not_dropped(self, step_id: str) -> None:
        missing = self._staged.missing(step_id)
        if missing:
            self._staged.pop(step_id)
            raise Aborted(f"step {step_id!r} lost part(s) {sorted(missing)[:8]} on shard {self.shard_index}: "
                          "dropped before the commit (unused for 30 s while the shard needed room, or for 10 "
                          "minutes), and not sent again: nothing was stepped; run the step again")

    @_serialized
    def step_committed(self, step_id: str) -> bool:
        return step_id in self._committed

    @_serialized
    def abort_step(self, namespace: str, generation: int, step_id: str) -> None:
        self._staged.pop(step_id)

    # ----- placement and reshard (workers/placement.py, workers/reshard.py) -------------------------
    def placed(self, version: int, method: str, *args):
        """Runs ``method(*args)`` if this shard is at placement ``version`` (the one the router routed
        the call with), else PlacementChanged: an answer never mixes shards of two placements. A read
        runs under the same hold of the lock as the check; a write (which waits for the disk without
        the lock) checks its ids against the placement under the lock again (_check_owned)."""
        with self._lock:
            self._check_version(version)
            if method in _PLACED_READS:
                return getattr(self, method)(*args)
        return getattr(self, method)(*args)

    def _check_version(self, version: int) -> None:
        """PlacementChanged unless this shard is at placement ``version`` (under the lock)."""
        if version != self.placement.version:
            raise PlacementChanged(f"shard {self.shard_index} is at placement version {self.placement.version}; "
                                   f"the call was routed with version {version}", self.placement.version)

    def _check_owned(self, namespace: str, generation: int, ids: np.ndarray) -> NeighborStore:
        """The store, if every id >= 0 of ids is this shard's and none is being moved; else
        PlacementChanged (the router routes them again). NOT_FOUND / FAILED_PRECONDITION as _store."""
        store = self._store(namespace, generation)
        placement = self.placement
        if placement.alone and self.shard_index < placement.actors:
            return store  # one shard holds every id (a training step's B x k of them: no pass over them)
        ids = np.asarray(ids, np.int64).reshape(-1)
        ids = ids[ids >= 0]
        if not ids.size:
            return store
        if self.shard_index >= placement.actors:  # a grow's new shard, before the move's placement reaches it
            raise PlacementChanged(f"shard {self.shard_index} is not in placement version {placement.version} "
                                   f"of {placement.actors} shards yet", placement.version)
        # Also at version 0 (never resharded): a router already at a grow's placement may send ids here
        # that the placement this shard answers reads with puts on another shard.
        elsewhere = placement.owners(namespace, ids) != self.shard_index
        if elsewhere.any() or placement.frozen(namespace, ids).any():
            what = "belong to another shard" if elsewhere.any() else "are being moved by a reshard"
            raise PlacementChanged(f"shard {self.shard_index}: ids {ids[elsewhere][:5].tolist()} of namespace "
                                   f"{namespace!r} {what}", placement.version)
        return store

    def _incoming(self, namespace: str) -> np.ndarray | None:
        """Ids a reshard has copied here that their old shard still answers for (the frozen batch)."""
        move = self.placement.move
        store = self.stores.get(namespace)
        if store is None or not self.placement.any_frozen(namespace) or not len(store):
            return None
        ids = np.arange(move.cursor, move.frozen_end, dtype=np.int64)
        held = ids[store.contains(ids)]
        if not held.size:
            return None
        return held[self.placement.owners(namespace, held) != self.shard_index]

    def set_placement(self, placement: dict) -> int:
        """Takes the placement (logged first, as every change), after every write checked under the old
        one is applied, and deletes the rows of its flipped batch that it holds but no longer owns, in
        the same record. Returns the rows deleted. Sending the same placement again deletes what is left."""
        args = {"placement": placement}
        with self._changes:
            if Placement.from_dict(placement).version < self.placement.version:
                return 0  # an older push (a retried round): this shard is past it
            if self.wal is None:
                return self._apply("placement", args, {})
            # Like a snapshot, wait for writers that checked their ids under the old placement.
            self._changes.wait_for(lambda: not self._snapshotting)
            self._snapshotting = self._draining = True
            try:
                self._changes.wait_for(lambda: (self._appending == 0 and self._applied_through == self.wal.written)
                                       or self.wal.failed is not None)
                if self._applied_through != self.wal.written:
                    raise self.wal.failure()
                number = self.wal.append("placement", args, {})
                self._logged[number] = ("placement", args, {})
                while number not in self._outcomes:
                    self._apply_durable()
                    if number not in self._outcomes:
                        self.wal.check(number)
                        self._changes.wait()
                applied, value = self._outcomes.pop(number)
            finally:
                self._snapshotting = self._draining = False
                self._changes.notify_all()
        if not applied:
            raise value
        return value

    def _apply_placement(self, args: dict) -> int:
        placement = Placement.from_dict(args["placement"])
        if placement.version < self.placement.version:
            return 0
        self.placement = placement
        self.num_shards = placement.move.target if placement.move else placement.num_shards
        dropped = 0
        for namespace, first, end in [placement.move.flipped] if placement.move and placement.move.flipped else []:
            store = self.stores.get(namespace)
            if store is None or end <= first or not len(store):
                continue
            ids = np.arange(first, end, dtype=np.int64)
            ids = ids[store.contains(ids)]
            ids = ids[placement.owners(namespace, ids) != self.shard_index]
            dropped += store.delete(ids=ids) if ids.size else 0
        return dropped

    @_serialized
    def get_placement(self) -> dict:
        return self.placement.to_dict()

    @_serialized
    def first_ids(self, namespace: str, first: int, end: int, count: int) -> np.ndarray:
        """The ``count`` smallest ids in [first, end) this shard holds of the namespace (sorted)."""
        store = self.stores.get(namespace)
        if store is None or not len(store):
            return np.empty(0, np.int64)
        ids = store.rows.ids[: len(store)].cpu().numpy()
        ids = ids[(ids >= first) & (ids < end)]
        if ids.size > count:
            ids = np.partition(ids, count - 1)[:count]
        return np.sort(ids)

    @_serialized
    def export_batch(self, namespace: str, generation: int, first: int, end: int) -> list:
        """The rows of ids [first, end) this shard holds and owns but that go to another shard under the
        move's target count: [(target shard, Arrow IPC stream of the rows, the writes applied here)].
        The writes are the request ids this shard remembers applying and the steps of the namespace it
        committed (JSON): the new owner must not apply them again to the rows, when a caller retries one
        whose answer it lost. Changes nothing."""
        from monim.datastore import snapshot

        move = self.placement.move
        store = self._store(namespace, generation)
        ids = np.arange(first, end, dtype=np.int64)
        ids = ids[store.contains(ids)] if ids.size and len(store) else ids[:0]
        ids = ids[self.placement.owners(namespace, ids) == self.shard_index]
        deleted = self._deleted_marks(namespace, first, end, move.target)
        targets = np.concatenate([ids % move.target] + [removed % move.target for _, removed in deleted])
        targets = [int(target) for target in np.unique(targets) if target != self.shard_index]
        if not targets:
            return []
        exported = ids[np.isin(ids % move.target, targets)]
        applied = json.dumps({"range": [first, end], "marks": self._covered_marks(namespace, exported, first, end),
                              "deleted": [[request_id, _id_runs(removed).tolist()] for request_id, removed in deleted]})
        return [(target, snapshot.table_to_bytes(snapshot.rows_table(store, ids[ids % move.target == target])),
                 applied) for target in targets]

    def _deleted_marks(self, namespace: str, first: int, end: int, target: int) -> list:
        """[(request id, ids)]: for each Delete (by ids or by source) of the namespace this shard remembers
        (_deleted_ids), the ids of [first, end) it deleted whose owner at the move's target count is another
        shard: the new owner answers them when the Delete is retried (their rows are gone, so no row
        carries them)."""
        prefix, marks = f"{namespace}:", []
        for (request_id, _), shares in self._deleted_ids.items():
            if not request_id.startswith(prefix):
                continue
            ids = _ids_of_shares(shares, first, end)
            ids = ids[ids % target != self.shard_index]
            if ids.size:
                marks.append((request_id, ids))
        return marks

    def _covered_marks(self, namespace: str, exported: np.ndarray, first: int, end: int) -> list:
        """[[request or step id, op, runs]]: for each write of the namespace this shard applied (or learnt
        of from an earlier move) the exported ids it covered, exactly where the shard knows its ids
        (_applied_ids, _moved), else the batch's whole range (a write without ids, a committed step:
        every row of the batch it touched was here). A write's share that was refused here and sent
        to another shard is not covered: a retry of it at the batch's new owner lands."""
        prefix, whole = f"{namespace}:", _range_runs([[first, end]]).tolist()
        marks = []
        for key in self._applied:
            if key[1] == "receive" or not key[0].startswith(prefix):
                continue
            shares = self._applied_ids.get(key)
            if shares is None:
                marks.append([key[0], key[1], whole])
                continue
            shares = [runs for runs in shares if _runs_meet(runs, first, end)] + self._moved.get(key, [])
            covered = exported[_in_any(shares, exported)] if shares else exported[:0]
            if covered.size:
                marks.append([key[0], key[1], _id_runs(covered).tolist()])
        for key, shares in self._moved.items():
            if key not in self._applied and key[0].startswith(prefix):
                covered = exported[_in_any(shares, exported)]
                if covered.size:
                    marks.append([key[0], key[1], _id_runs(covered).tolist()])
        marks += [[step, "step", whole] for step in self._committed if step.startswith(prefix)]
        return marks

    def receive_rows(self, namespace: str, generation: int, request_id: str, payload: bytes,
                     applied: str = '{"applied": [], "committed": []}', version: int | None = None) -> int:
        """Appends rows a reshard moves here (an Arrow IPC stream in the snapshot schema, every column
        kept), logged first; ids already held (a batch copied again after an interrupted move: equal,
        as writes to them waited) are skipped. ``applied``: the writes their old owner had applied
        (export_batch), remembered here as applied (changing no row here: answered 0 when retried).
        ``version``: the placement the rows were exported at (their batch frozen); at any other
        (a copy that arrives after the batch was thawed, or flipped) PlacementChanged, and nothing is
        stored: the rows may have changed at their owner since. Returns the rows appended."""
        from monim.datastore import snapshot

        rows = snapshot.table_from_bytes(payload).num_rows

        def check() -> None:
            if version is not None:
                self._check_version(version)
            self._check_room(namespace, rows, generation)

        return self._write("receive", {"namespace": namespace, "generation": generation, "request_id": request_id},
                           {"table": np.array([payload], dtype=object),
                            "applied": np.array([applied.encode()], dtype=object)}, check=check)

    def _apply_receive(self, store: NeighborStore, args: dict, columns: dict) -> int:
        import pyarrow as pa
        from monim.datastore import snapshot

        table = snapshot.table_from_bytes(columns["table"][0])
        ids = table.column("id").to_numpy()
        fresh = ~store.contains(ids) if ids.size else np.zeros(0, bool)
        result = snapshot.append_rows(store, table.filter(pa.array(fresh))) if fresh.any() else 0
        if "applied" in columns:  # (a log written before the old owners sent them has none)
            self._learn_moved_writes(json.loads(bytes(columns["applied"][0])))
        self._applied.remember((args["request_id"], "receive"), result)
        return result

    def _learn_moved_writes(self, applied: dict) -> None:
        """What the old owner of rows moved here had applied to them (export_batch): each write and step
        is remembered with the moved ids it covered, so that a retry skips those rows only. (Logs
        written before moves sent exact ids carry the batch's range for every write, and earlier ones
        no range: the whole write, as then.)"""
        batch = applied.get("range")
        if batch is None:
            for request_id, op in applied["applied"]:
                if (request_id, op) not in self._applied:
                    self._applied.remember((request_id, op), 0)
            for step_id in applied["committed"]:
                if step_id not in self._committed:
                    self._committed.remember(step_id, 0)
            return
        if "marks" in applied:
            marks = [((request_id, op), _runs_of(runs)) for request_id, op, runs in applied["marks"]]
        else:
            marks = [((request_id, op), _range_runs([batch])) for request_id, op in applied["applied"]]
            marks += [((step_id, "step"), _range_runs([batch])) for step_id in applied["committed"]]
            marks += [((request_id, op), _range_runs(ranges)) for request_id, op, ranges in applied.get("moved", [])]
        for request_id, runs in applied.get("deleted", []):
            key = (request_id, "delete")
            self._deleted_ids.remember(key, self._deleted_ids.get(key, []) + [_runs_of(runs)])
        for key, runs in marks:
            # A request applied here as a whole needs no ids; one applied here in shares (whose ids are
            # known) does: the moved rows are covered too.
            if (key not in self._applied or key in self._applied_ids) and \
                    (key[1] != "step" or key[0] not in self._committed):
                self._moved.remember(key, self._moved.get(key, []) + [runs])

    @_serialized
    def staged_in_range(self, namespace: str, first: int, end: int) -> list[str]:
        """Steps staged here that hold value gradients of ids [first, end) of the namespace, and steps
        of it being committed (their parts are no longer staged, their record not yet applied)."""
        found = [step_id for step_id in self._committing if step_id.startswith(f"{namespace}:")]
        for step_id, staged in self._staged.items():
            if staged.namespace == namespace and any(
                    ((ids >= first) & (ids < end)).any() for ids, _ in
                    ((np.asarray(ids), grads) for ids, grads in staged.parts.values())):
                found.append(step_id)
        return found

    def metrics(self) -> dict:
        """What the front end's metrics and health report (workers/metrics.py): per namespace its rows
        and the bytes its columns hold on the device (allocated); the bytes of the log's segments and
        the seconds since the latest snapshot was written (None without a data dir, or before the first
        snapshot); whether the log failed (the shard then refuses writes until it restarts); its decode
        endpoint's streams and steps (None before one is started); its staged steps (StagedSteps.stats).
        A namespace with an approximate index has its "index" too (BackgroundIndex.metrics: state,
        builds, tombstones, drift, unindexed rows; none for flat).
        Without the shard's lock, nor any store's: health asks this every few seconds, and a shard busy
        with a long write or search under its lock is serving, not down (tests/unit/test_shard_probe.py).
        The figures are each read at one moment (a copy of the namespaces first), not all at the same one."""
        import pyarrow.fs as pafs

        namespaces = {}
        for name, store in dict(self.stores).items():
            held = namespaces[name] = {"rows": len(store), "bytes": store.nbytes}
            approximate = store.approximate
            if approximate is not None:
                held["index"] = approximate.metrics()
        wal_bytes = snapshot_age_s = None
        if self.folder is not None:
            log_folder = self.wal.location
            found = log_folder.filesystem.get_file_info(pafs.FileSelector(log_folder.path, allow_not_found=True))
            wal_bytes = sum(info.size or 0 for info in found if info.base_name.endswith(".wal"))
            latest = self._snapshots()[-1:]
            if latest:
                manifest = latest[0] / "manifest.json"
                written = manifest.filesystem.get_file_info(manifest.path).mtime
                snapshot_age_s = None if written is None else max(0.0, time.time() - written.timestamp())
        endpoint = getattr(self, "read_endpoint", None)  # workers/read_endpoint.py, once one is started
        return {"shard": self.shard_index, "namespaces": namespaces, "wal_bytes": wal_bytes,
                "snapshot_age_s": snapshot_age_s, "wal_failed": self.wal is not None and self.wal.failed is not None,
                "read_endpoint": None if endpoint is None else endpoint.stats(), "staged": self._staged.stats()}
