"""NamespaceRegistry: namespace configs, generations and id allocation for a deployment.

Runs as one named Ray actor so that several front ends share it. Ids are a
per-namespace counter: an Add of N new rows takes the block [next_id, next_id+N),
so ids are unique across shards and front ends and stay an entry's for life.

Each incarnation of a name gets a random 62-bit generation when it is created,
so a namespace dropped and created again (even by a registry that restarted
and forgot the old one) never shares a generation with its predecessor; shards
refuse requests for a generation they do not hold.

Create and the id block of an Add are remembered by request id, so a front
end that retries a request gets the same generation and the same ids.

Every call comes through ``call``: writes one at a time, each answered after its fsync; reads
(READS: a config, the placement, the next id) from the state as of the last finished write, so that
they never wait for a write's fsync (a search whose router must read a config or the placement
waited as long as the slowest write in flight). The Ray actor takes several calls at once for that.

With a data dir, the registry's state is ``registry.json`` there, replaced
atomically (write, fsync, rename) at every create and drop, and whenever ids pass
the reserved mark: ids are reserved in blocks of ID_RESERVATION, so a registry that
restarts continues after the mark (skipping at most a block; ids are never reused).
The plans of recent Adds are appended (and fsynced) to ``plans.log`` beside it before they are
answered, so that an Add retried after a restart gets its first plan and ids (the shards that
applied it answer it from their logs); the file is rewritten with the remembered plans only
when it grows past twice their number. A data dir that is not on a local filesystem (an
object store) keeps no plans.log: there a retry after a registry restart gets a new plan.
"""

from __future__ import annotations

import collections
import fcntl
import json
import logging
import os
import secrets
import threading

import numpy as np
from monim.datastore import NamespaceConfig
from monim.datastore.location import Location
from monim.protos.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NamespaceChanged,
    NamespaceNotFound,
)
from monim.workers.placement import Move, Placement, check_shard_count, refuse_other_target

log = logging.getLogger(__name__)

ID_RESERVATION = 1 << 20
STATE_FORMAT_VERSION = 1
REMEMBERED_REQUESTS = 100_000
REMEMBERED_TARGETS = 10_000_000  # merge targets of remembered Add plans, at most
# A reshard whose driver has not reported for this long may be taken over (resumed) by another call.
RESHARD_LEASE_S = 30.0


# The calls that only read: answered by a Published view, without waiting for a write in progress.
READS = frozenset({"config", "list", "get_placement", "ping", "shard_count", "next_id"})


def _config_in(configs: dict, name: str, generation: int) -> dict:
    config = configs.get(name)
    if config is None:
        raise NamespaceNotFound(name)
    if generation and config["generation"] != generation:
        raise NamespaceChanged(name, generation, config["generation"])
    return config


class Published:
    """The registry's state as of its last finished write, for READS (never changed: a write makes a
    new one). Config dicts are shared with the registry, which replaces them and never edits one."""

    def __init__(self, registry: "NamespaceRegistry"):
        self.configs = dict(registry.configs)
        self.next_ids = dict(registry.next_ids)
        self.placement = registry.placement.to_dict()
        self.actors = registry.placement.actors

    def config(self, name: str, generation: int = 0) -> dict:
        return _config_in(self.configs, name, generation)

    def list(self) -> list[dict]:
        return [self.configs[name] for name in sorted(self.configs)]

    def get_placement(self) -> dict:
        return dict(self.placement)

    def ping(self) -> dict:
        return {"pid": os.getpid(), "namespaces": len(self.configs)}

    def shard_count(self) -> int:
        """Shard actors the deployment has: during a reshard, max(source, target)."""
        return self.actors

    def next_id(self, name: str) -> int:
        self.config(name)
        return self.next_ids[name]


def new_generation() -> int:
    """A random non-zero generation (0 means "not created" / "whichever is current")."""
    return secrets.randbits(62) | 1


class NamespaceRegistry:
    """num_shards: of a new deployment (one whose data dir holds a registry keeps its own count)."""

    def __init__(self, num_shards: int, data_dir: str | None = None):
        if num_shards < 1:
            raise InvalidArgument(f"a deployment needs at least one shard, got {num_shards}")
        self.num_shards = num_shards
        self.placement = Placement(0, num_shards)  # workers/placement.py; num_shards is its rest count
        self.configs: dict[str, dict] = {}
        self.next_ids: dict[str, int] = {}
        self.reserved_ids: dict[str, int] = {}
        self.created_by: dict[str, str] = {}
        self._plans: collections.OrderedDict = collections.OrderedDict()  # request id -> (targets or N, first id)
        self._kept_targets = 0
        self.path = None if data_dir is None else Location.of(data_dir) / "registry.json"
        self._lock_file = None
        self._plans_file = None  # plans.log, appended (local data dirs)
        self._plans_written = 0
        if self.path is not None:
            self._lock_data_dir()
            if self.path.exists():
                self._load()
            self._load_plans()
        self._writes = threading.Lock()
        self._published = Published(self)

    def ping(self) -> dict:
        """The actor's liveness call, as a shard actor's (its pid: what a test kills)."""
        return self.call("ping")

    def call(self, method: str, *args):
        """A runtime's call of a registry method: a read from the last finished write's state (no wait
        for a write in progress); a write after the writes before it, published once it returns."""
        if method in READS:
            return getattr(self._published, method)(*args)
        with self._writes:
            try:
                return getattr(self, method)(*args)
            finally:
                self._published = Published(self)

    def _lock_data_dir(self) -> None:
        """One deployment per data dir: the registry holds an exclusive lock on DATA_DIR/LOCK for
        its life (released when its process ends, so a restarted registry takes it again). A data
        dir that is not on a local filesystem (an object store) has no such lock: the operator
        keeps one deployment per prefix (docs/OPERATIONS.md)."""
        folder = self.path.local and os.path.dirname(self.path.local)
        if not folder:
            return
        os.makedirs(folder, exist_ok=True)
        self._lock_file = open(os.path.join(folder, "LOCK"), "a+")  # noqa: SIM115 - held for the registry's life
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise FailedPrecondition(f"data dir {folder} is in use by another running deployment; "
                                     "join that one (same --deployment, --ray-address) or use another --data-dir") \
                from None

    def _load(self) -> None:
        state = json.loads(self.path.read_bytes())
        if state.get("format_version", 0) > STATE_FORMAT_VERSION:
            raise InvalidArgument(f"{self.path} has format version {state['format_version']}; this monim reads "
                                  f"up to {STATE_FORMAT_VERSION}")
        if state["num_shards"] != self.num_shards:
            log.warning("the data dir holds a deployment of %d shards; keeping that (asked: %d)",
                        state["num_shards"], self.num_shards)
        self.num_shards = state["num_shards"]
        self.placement = Placement.from_dict(state.get("placement") or {"version": 0, "num_shards": self.num_shards})
        self.configs = state["configs"]
        self.next_ids = dict(state["reserved_ids"])  # continue after the reserved marks
        self.reserved_ids = dict(state["reserved_ids"])
        self.created_by = state["created_by"]

    def _plans_path(self) -> str | None:
        return self.path.local and os.path.join(os.path.dirname(self.path.local), "plans.log")

    def _load_plans(self) -> None:
        """The remembered Add plans, from plans.log (a torn last line, from a crash, is cut)."""
        path = self._plans_path()
        if path is None:
            return
        good = 0
        if os.path.exists(path):
            with open(path, "rb") as file:
                for line in file:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        break
                    good += len(line)
                    self._plans_written += 1
                    kept = entry["n"] if "n" in entry else np.asarray(entry["targets"], np.int64)
                    self._remember_plan(entry["id"], kept, entry["start"])
            os.truncate(path, good)
        self._plans_file = open(path, "ab")  # noqa: SIM115 - kept open for the registry's life

    def _remember_plan(self, request_id: str, kept, start: int) -> None:
        self._plans[request_id] = (kept, start)
        self._plans.move_to_end(request_id)
        self._kept_targets += 0 if isinstance(kept, int) else kept.size
        while len(self._plans) > REMEMBERED_REQUESTS or self._kept_targets > REMEMBERED_TARGETS:
            dropped, _ = self._plans.popitem(last=False)[1]
            self._kept_targets -= 0 if isinstance(dropped, int) else dropped.size

    def _log_plan(self, request_id: str, kept, start: int) -> None:
        """Appends a plan to plans.log and fsyncs it, before the Add that asked for it is answered."""
        if self._plans_file is None:
            return
        entry = {"id": request_id, "start": int(start)}
        entry.update({"n": kept} if isinstance(kept, int) else {"targets": kept.tolist()})
        self._plans_file.write(json.dumps(entry).encode() + b"\n")
        self._plans_file.flush()
        os.fsync(self._plans_file.fileno())
        self._plans_written += 1
        if self._plans_written > 2 * max(len(self._plans), 1000):  # rewrite with the remembered ones only
            lines = b"".join(json.dumps({"id": rid, "start": int(first), **({"n": plan} if isinstance(plan, int)
                                         else {"targets": plan.tolist()})}).encode() + b"\n"
                             for rid, (plan, first) in self._plans.items())
            self._plans_file.close()
            Location.of(self._plans_path()).write_bytes(lines)
            self._plans_file = open(self._plans_path(), "ab")  # noqa: SIM115 - kept open
            self._plans_written = len(self._plans)

    def _save(self) -> None:
        if self.path is None:
            return
        state = {"format_version": STATE_FORMAT_VERSION, "num_shards": self.num_shards,
                 "placement": self.placement.to_dict(), "configs": self.configs,
                 "reserved_ids": self.reserved_ids, "created_by": self.created_by}
        self.path.write_bytes(json.dumps(state).encode())

    def close(self) -> None:
        """Releases the data dir (a registry in a process that ends releases it anyway)."""
        if self._plans_file is not None:
            self._plans_file.close()
            self._plans_file = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # ----- placement and reshard (workers/placement.py, workers/reshard.py) ----------------------
    def _changed(self) -> dict:
        self.placement.version += 1
        self._save()
        return self.placement.to_dict()

    def begin_reshard(self, shards: int, driver: str, now: float, batch_rows: int = 0) -> dict:
        """Starts a reshard to ``shards``, or hands the one in progress to this driver when it is to the
        same count and its driver has not reported for RESHARD_LEASE_S (resume). ABORTED while another
        driver runs it; FAILED_PRECONDITION if the one in progress is to another count. Returns the
        placement (with no move when the deployment already has that many shards)."""
        shards = check_shard_count(shards)
        move = self.placement.move
        if move is not None:
            refuse_other_target(move, shards)
            if move.driver != driver and now - move.heartbeat < RESHARD_LEASE_S:
                raise Aborted(f"a reshard to {shards} shards is already running (it last reported "
                              f"{now - move.heartbeat:.0f} s ago); wait for it, or run this again to resume it "
                              f"once it has stopped for {RESHARD_LEASE_S:g} s")
            move.driver, move.heartbeat = driver, now
            self._save()
            return self.placement.to_dict()
        if shards == self.placement.num_shards:
            return self.placement.to_dict()
        names = sorted(self.configs)
        self.placement.move = Move(source=self.placement.num_shards, target=shards, namespaces=names,
                                   mark=self.next_ids[names[0]] if names else 0, driver=driver, heartbeat=now,
                                   **({"batch_rows": int(batch_rows)} if batch_rows else {}))
        self._skip_gone()
        return self._changed()

    def _driving(self, driver: str, now: float) -> Move:
        move = self.placement.move
        if move is None or move.driver != driver:
            raise Aborted("this reshard was taken over by another call (or finished): stopping")
        move.heartbeat = now
        return move

    def _skip_gone(self) -> None:
        """Past namespaces of the move that were dropped since it began (nothing left to move)."""
        move = self.placement.move
        while move.current is not None and move.current not in self.configs:
            move.index += 1
            move.cursor = move.frozen_end = 0
            move.mark = self.next_ids[move.current] if move.current is not None else 0

    def freeze_batch(self, driver: str, now: float, end: int) -> dict:
        """Ids [cursor, end) of the namespace being moved are to be copied: writes to them wait."""
        move = self._driving(driver, now)
        move.frozen_end = max(move.cursor, min(int(end), move.mark))
        return self._changed()

    def flip_batch(self, driver: str, now: float) -> dict:
        """The frozen batch is copied: its new owners hold it from now on. Past the namespace's mark,
        the next namespace begins (its mark: its next id now)."""
        move = self._driving(driver, now)
        move.flipped = [move.current, move.cursor, move.frozen_end]
        move.cursor = max(move.cursor, move.frozen_end)
        if move.cursor >= move.mark:
            move.index += 1
            move.cursor = move.frozen_end = 0
            move.mark = self.next_ids[move.current] if move.current in self.configs else 0
            self._skip_gone()
        return self._changed()

    def finish_reshard(self, driver: str, now: float) -> dict:
        """Every namespace is moved: the deployment has the target count of shards."""
        move = self._driving(driver, now)
        if move.current is not None:
            raise FailedPrecondition(f"namespace {move.current!r} is not moved yet")
        self.num_shards = move.target
        self.placement = Placement(self.placement.version, move.target)
        return self._changed()

    def thaw_batch(self, now: float) -> dict:
        """The frozen batch of a reshard whose driver stopped reporting RESHARD_LEASE_S ago goes back to
        its old owners: writes to it go on; the copies on the new owners are dropped (``flipped`` names
        the batch: a shard drops the rows there it does not own). The same reshard, run again, copies it
        anew. Answers the placement unchanged while the driver reports, or when nothing is frozen."""
        move = self.placement.move
        if move is None or move.frozen_end <= move.cursor or now - move.heartbeat < RESHARD_LEASE_S:
            return self.placement.to_dict()
        move.flipped = [move.current, move.cursor, move.frozen_end]
        move.frozen_end = move.cursor
        stopped = "stopped" if not move.heartbeat else f"stopped reporting {now - move.heartbeat:.0f} s ago"
        log.warning("reshard: thawed ids [%d, %d) of %r: its driver %s (run the reshard again to resume it)",
                    move.flipped[1], move.flipped[2], move.current, stopped)
        return self._changed()

    def release_reshard(self, driver: str) -> None:
        """The driver stopped (interrupted, or failed): the move may be resumed by any call at once."""
        move = self.placement.move
        if move is not None and move.driver == driver:
            move.driver, move.heartbeat = "", 0.0
            self._save()

    def heartbeat(self, driver: str, now: float) -> None:
        self._driving(driver, now)

    def create(self, config: dict, request_id: str = "") -> dict:
        """Registers the namespace with a new generation; returns its config. A retry of the
        request that created it answers the same config; anything else: ALREADY_EXISTS."""
        name = NamespaceConfig.from_dict(config).name
        if name in self.configs:
            if request_id and self.created_by.get(name) == request_id:
                return self.configs[name]
            raise AlreadyExists(f"namespace {name!r} already exists")
        self.configs[name] = dict(config, generation=new_generation())
        self.next_ids[name] = 0
        self.reserved_ids[name] = 0
        self.created_by[name] = request_id
        self._save()
        return self.configs[name]

    def drop(self, name: str, generation: int = 0) -> dict:
        """Unregisters the namespace (of this generation, if given); returns its config."""
        config = self.config(name, generation)
        del self.configs[name]
        self.next_ids.pop(name, None)
        self.reserved_ids.pop(name, None)
        self.created_by.pop(name, None)
        self._save()
        return config

    def config(self, name: str, generation: int = 0) -> dict:
        return _config_in(self.configs, name, generation)

    def plan_add(self, name: str, generation: int, request_id: str,
                 targets: np.ndarray) -> tuple[np.ndarray, int, int]:
        """Records an Add's merge plan (targets int64 [N]: the entry a row merges into, or -1 for a
        new row) and reserves ids for its new rows; returns (targets, first id, placement version).
        A retry of the request answers the first plan, so the retry adds and merges exactly the same
        rows. The caller routes the rows with this placement version or a later one: during a
        reshard, ids past the move's mark are placed by the target count, and a router still at the
        placement before the move would send them to a shard the move never empties."""
        self.config(name, generation)
        if request_id and request_id in self._plans:
            kept, start = self._plans[request_id]
            return (np.full(kept, -1, np.int64) if isinstance(kept, int) else kept), start, self.placement.version
        start = self.next_ids[name]
        self.next_ids[name] = start + int((targets < 0).sum())
        if self.next_ids[name] > self.reserved_ids[name]:
            self.reserved_ids[name] = self.next_ids[name] + ID_RESERVATION
            self._save()
        if request_id:
            kept = int(targets.size) if (targets < 0).all() else targets  # no merges: its length only
            self._log_plan(request_id, kept, start)
            self._remember_plan(request_id, kept, start)
        return targets, start, self.placement.version

    def reserve_ids(self, name: str, next_id: int) -> None:
        """New ids of the namespace start at next_id or later (a restored namespace keeps its ids)."""
        self.config(name)
        self.next_ids[name] = max(self.next_ids[name], int(next_id))
        if self.next_ids[name] > self.reserved_ids[name]:
            self.reserved_ids[name] = self.next_ids[name] + ID_RESERVATION
            self._save()
