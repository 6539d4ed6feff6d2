"""Online resharding: moves every namespace's rows to a new shard count while reads and writes go on.

The placement (workers/placement.py) lives in the registry; this driver changes it one step at a
time, pushes each step to every shard before the next, and copies rows between the steps. Every
step is recorded in the registry (registry.json, fsynced) and in each shard's log before it counts,
and every step is safe to run again, so a driver that stops anywhere (a crash, an interrupted
`monim reshard`) is resumed by running the same reshard again. Stages:

1. begin: the registry records the move (source and target counts, the namespaces in order, the
   first namespace's mark); new shard actors start (their folders of the data dir cleared first, on
   a new move: a shrink's leftovers never come back); every shard takes the placement, and the new
   ones create every namespace.
2. per batch of the namespace being moved, ids [cursor, end) holding up to batch_rows rows (up to its
   mark, its next id when its move began: ids past it were placed by the target count when added):
   a. freeze: every shard takes the placement with the batch frozen: writes that touch it wait;
   b. wait for steps staged on the batch's rows to be committed or aborted (staged_wait_s, then they
      are dropped: their commit answers ABORTED, nothing stepped);
   c. copy: every old owner exports the batch's rows that change shard (every column: values,
      optimizer state, sources, steps); each new owner logs and appends them (rows it holds already,
      from an interrupted copy, are skipped: they are equal, as writes to them waited), at the
      placement they were exported at only (a copy that arrives after a router thawed the batch is
      refused: its rows may have changed at their owner since);
   d. flip: the registry moves the cursor past the batch; every shard takes it, and the old owners
      delete the rows they no longer own. Writes that waited go to the new owners.
3. finish: the registry records the target count; every shard takes it; with a shrink, the removed
   shards (empty now) are closed, their actors killed and their folders deleted.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable, Iterator

import numpy as np
from monim.datastore.location import Location
from monim.protos.config import NamespaceConfig
from monim.protos.errors import NamespaceChanged, NamespaceNotFound
from monim.workers.placement import Placement, check_shard_count

log = logging.getLogger(__name__)

# How long a batch waits for steps staged on its rows before dropping them.
STAGED_WAIT_S = 30.0
STAGED_POLL_S = 0.05


@dataclasses.dataclass
class ReshardProgress:
    """Where a reshard is: namespaces done of all, the one being moved and its ids done of all."""

    source: int
    target: int
    namespaces_done: int
    namespaces: int
    namespace: str = ""
    ids_done: int = 0
    ids: int = 0
    rows_moved: int = 0
    done: bool = False


class Resharder:
    """router: the front end's Router (its runtime and registry)."""

    def __init__(self, router, staged_wait_s: float = STAGED_WAIT_S):
        self.router = router
        self.staged_wait_s = staged_wait_s
        self.driver = uuid.uuid4().hex
        self.rows_moved = 0
        self.source = 0

    def _registry(self, method: str, *args):
        return self.router.runtime.call_registry(method, *args)

    def _step(self, method: str, *args) -> Placement:
        return Placement.from_dict(self._registry(method, self.driver, time.time(), *args))

    def _push(self, placement: Placement) -> None:
        """Every shard of the placement takes it (and drops its flipped batch's rows it no longer owns)."""
        self.router.push_placement(self.router.adopt_placement(placement))

    def run(self, shards: int, batch_rows: int = 0) -> Iterator[ReshardProgress]:
        """Reshards to ``shards`` (or resumes the reshard to it that was interrupted), yielding progress
        after each step; closing the iterator stops at the step it reached (run it again to resume)."""
        shards = check_shard_count(shards)
        before = Placement.from_dict(self._registry("get_placement"))
        if before.move is None and shards > before.num_shards:
            # The new shards start, and hold every namespace, before the registry names them: a call
            # routed to one then finds its namespaces (it refuses calls until it takes the placement).
            self._clear_folders(before.num_shards, shards)
            self.router.runtime.ensure_shards(shards, placement=before.to_dict())
            self._create_namespaces(shards)
        placement = Placement.from_dict(self._registry("begin_reshard", shards, self.driver, time.time(), batch_rows))
        self.source = placement.move.source if placement.move else before.num_shards
        if placement.move is None:  # nothing to move; finish what an interrupted one left
            self._push(placement)
            self._retire(placement.num_shards)
            yield ReshardProgress(self.source, placement.num_shards, 0, 0, done=True)
            return
        try:
            self.router.adopt_placement(placement)
            self._create_namespaces(placement.actors)  # again: one created since, on the old shards only
            self._push(placement)
            yield self._progress(placement)
            while placement.move.current is not None:
                placement = self._move_batch(placement)
                yield self._progress(placement)
            placement = self._step("finish_reshard")
        except BaseException:  # stopped (the iterator closed) or failed: any call may resume it now
            try:
                self._registry("release_reshard", self.driver)
            except Exception:  # noqa: BLE001 - the lease then runs out by itself
                log.warning("reshard: could not release the move in the registry", exc_info=True)
            raise
        self._push(placement)
        self._retire(placement.num_shards)
        yield dataclasses.replace(self._progress(placement), done=True)

    def _progress(self, placement: Placement) -> ReshardProgress:
        move = placement.move
        if move is None:
            return ReshardProgress(self.source, placement.num_shards, 0, 0, rows_moved=self.rows_moved)
        return ReshardProgress(move.source, move.target, move.index, len(move.namespaces), move.current or "",
                               move.cursor, move.mark, self.rows_moved)

    def _create_namespaces(self, shards: int) -> None:
        """Every registered namespace on shards 0..shards-1 (the new ones have none); one dropped
        meanwhile is dropped again where it was just created."""
        for config in self.router.list_namespaces():
            self.router._call([(shard, "create_namespace", (config.to_dict(),)) for shard in range(shards)])
            try:
                self.router.config(config.name, config.generation)
            except (NamespaceNotFound, NamespaceChanged):
                self.router._undo("drop_namespace", config.name, config.generation)

    def _move_batch(self, placement: Placement) -> Placement:
        """Freeze, wait for staged steps, copy, flip one batch of the namespace being moved."""
        move = placement.move
        namespace = move.current
        if move.frozen_end <= move.cursor:
            placement = self._step("freeze_batch", self._batch_end(namespace, move))
            self._push(placement)
            move = placement.move
        first, end = move.cursor, move.frozen_end
        if end > first:
            try:
                config = NamespaceConfig.from_dict(self._registry("config", namespace))
                self._wait_for_staged_steps(config, first, end)
                self._copy(config, first, end, placement)
            except (NamespaceNotFound, NamespaceChanged):
                log.info("namespace %r was dropped during its move: nothing more to copy", namespace)
        placement = self._step("flip_batch")
        self._push(placement)
        return placement

    def _batch_end(self, namespace: str, move) -> int:
        """The end of the next batch: past the batch_rows smallest ids at or after the cursor that the
        shards hold (so that stretches of ids with no rows, deleted or never added, and the gap a
        registry restart leaves before its reserved mark, take one step), or the namespace's mark."""
        found = self.router._call([(shard, "first_ids", (namespace, move.cursor, move.mark, move.batch_rows))
                                   for shard in range(self.router.num_shards)])
        ids = np.sort(np.concatenate(found)) if found else np.empty(0, np.int64)
        return int(ids[move.batch_rows - 1]) + 1 if ids.size >= move.batch_rows else move.mark

    def _wait_for_staged_steps(self, config: NamespaceConfig, first: int, end: int) -> None:
        deadline = time.monotonic() + self.staged_wait_s
        calls = [(shard, "staged_in_range", (config.name, first, end)) for shard in range(self.router.num_shards)]
        while True:
            steps = {step for found in self.router._call(calls) for step in found}
            if not steps:
                return
            if time.monotonic() > deadline:
                log.warning("reshard: dropping %d step(s) staged on ids [%d, %d) of %r for over %g s", len(steps),
                            first, end, config.name, self.staged_wait_s)
                for step in steps:
                    self.router._undo("abort_step", config.name, config.generation, step)
                return
            self._registry("heartbeat", self.driver, time.time())
            time.sleep(STAGED_POLL_S)

    def _copy(self, config: NamespaceConfig, first: int, end: int, placement: Placement) -> None:
        exports = self.router._call([(shard, "export_batch", (config.name, config.generation, first, end))
                                     for shard in range(placement.actors)])
        receives = [(target, "receive_rows", (config.name, config.generation,
                                              f"reshard:{placement.version}:{source}", payload, applied,
                                              placement.version))
                    for source, batches in enumerate(exports) for target, payload, applied in batches]
        if receives:
            self.rows_moved += sum(self.router._call(receives))

    def _clear_folders(self, first: int, end: int) -> None:
        """Folders shard-<first>..shard-<end - 1> of the data dir, left by an earlier shrink, go before
        a grow starts shards there."""
        data_dir = getattr(self.router.runtime, "data_dir", None)
        if data_dir is None:
            return
        for index in range(first, end):
            folder = Location.of(data_dir) / f"shard-{index}"
            if folder.exists():
                log.warning("reshard: deleting %s, left by an earlier shrink", folder)
                folder.delete()

    def _retire(self, count: int) -> None:
        """After a shrink: the shards from ``count`` on stop, and their folders go (every row they
        held is on the others, logged there)."""
        runtime = self.router.runtime
        runtime.retire_shards(count)
        data_dir = getattr(runtime, "data_dir", None)
        if data_dir is None:
            return
        root = Location.of(data_dir)
        for name in root.names():
            if name.startswith("shard-") and name[6:].isdigit() and int(name[6:]) >= count:
                (root / name).delete()


def reshard(router, shards: int, batch_rows: int = 0,
            progress: Callable[[ReshardProgress], None] | None = None) -> ReshardProgress:
    """Runs a reshard to its end; returns the last progress."""
    last = None
    for last in Resharder(router).run(shards, batch_rows):
        if progress is not None:
            progress(last)
    return last
