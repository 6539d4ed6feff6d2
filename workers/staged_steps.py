"""The steps a shard holds staged: value gradients of optimizer steps sent in parts, waiting for their commit.

A step's parts (workers/shard.py: ``backward_part``, ``stage_gradients``) leave their ids and value
gradients here under the step's id until ``commit_step`` takes them or ``abort_step`` drops them.
A client that dies between its parts and its commit leaves them behind, and on a GPU shard without
a log they lie in GPU memory (a B=4096, k=1024 step's gradients take gigabytes), so the table is
bounded three ways:

- age: a step that no part has reached for ``TTL_S`` is dropped ("expired");
- count: at most ``MAX_STEPS`` steps wait;
- bytes: their arrays take at most ``budget`` bytes (``default_budget``: a quarter of the shard's
  memory budget, at least 256 MiB).

A part that would pass the count or the bytes first drops the steps that no part has reached for
``IDLE_S`` (a live client sends its next part or its commit within seconds), least recently
reached first ("evicted"). If that is not enough it is refused, RESOURCE_EXHAUSTED naming the
numbers, and nothing of it is staged: the router then drops the step on every shard, so nothing of
it is stepped, and the steps already waiting finish. The bytes bound what waits beside a step: a
step larger than the budget alone is staged when no other step holds bytes. A dropped step's
commit answers ABORTED (nothing stepped), as after a restart; so does one whose dropped parts a
later part did not bring back (``missing``: a late part stages the step afresh). On several shards
a commit first asks each (Shard.prepare_step) whether it holds its parts, and pins them against
eviction: if one lost some, the step is aborted everywhere and no shard steps.
"""

from __future__ import annotations

import collections
import dataclasses
import time

import numpy as np
import torch
from monim.protos.errors import InvalidArgument, ResourceExhausted
from monim.workers.serve_config import format_size

TTL_S = 600.0
IDLE_S = 30.0
MAX_STEPS = 256
MAX_DROPPED = 4096  # dropped steps whose parts a shard remembers (missing)
MIN_BUDGET = 256 << 20
DROP_REASONS = ("expired", "evicted")


def default_budget(memory_budget: int) -> int:
    """Bytes the staged steps of a shard whose rows may take memory_budget bytes may hold."""
    return max(MIN_BUDGET, int(memory_budget) // 4)


def nbytes(array) -> int:
    """Bytes of a staged array (numpy or torch), or of a tuple's."""
    if array is None:
        return 0
    if torch.is_tensor(array):
        return array.element_size() * array.nelement()
    if isinstance(array, (tuple, list)):
        return sum(nbytes(item) for item in array)
    return int(np.asarray(array).nbytes)


@dataclasses.dataclass
class StagedStep:
    namespace: str
    generation: int
    touched: float  # when a part last reached it (idle, expiry)
    parts: dict = dataclasses.field(default_factory=dict)  # part -> (ids int64 [U], grads [U, value_dim])
    partials: dict = dataclasses.field(default_factory=dict)  # part -> what it answered (the shard's to remember)
    held: dict = dataclasses.field(default_factory=dict)  # part -> the rows its ids were at (NeighborStore.HeldRows)
    bytes: int = 0
    pinned: bool = False  # a commit on several shards is under way: not evicted
    actors: int = 0  # the most shards a placement had when a part was staged here (Shard.prepare_step)

    def in_order(self) -> list:
        """The parts by their index, not by arrival (a client sends several at once): the step's sums
        over repeated ids, and so its result, do not depend on the network's timing."""
        return [self.parts[part] for part in sorted(self.parts)]


class StagedSteps:
    """step id -> StagedStep, bounded (see the module's doc). Not thread-safe: the shard's lock guards it."""

    def __init__(self, budget: int, shard_index: int = 0, clock=time.monotonic):
        self.budget = int(budget)
        self.shard_index = shard_index
        self.clock = clock
        self._steps: collections.OrderedDict[str, StagedStep] = collections.OrderedDict()  # least recently reached first
        self._dropped: collections.OrderedDict[str, set] = collections.OrderedDict()  # step id -> its parts dropped
        self.bytes = 0
        self.dropped = dict.fromkeys(DROP_REASONS, 0)

    def __len__(self) -> int:
        return len(self._steps)

    def __iter__(self):
        return iter(self._steps)

    def __contains__(self, step_id: str) -> bool:
        return step_id in self._steps

    def __getitem__(self, step_id: str) -> StagedStep:
        return self._steps[step_id]

    def get(self, step_id: str) -> StagedStep | None:
        return self._steps.get(step_id)

    def items(self):
        return self._steps.items()

    def pop(self, step_id: str) -> StagedStep | None:
        """Takes the step out (a commit or an abort), and forgets that parts of it were dropped; None if
        it is not staged."""
        self._dropped.pop(step_id, None)
        return self._remove(step_id)

    def _remove(self, step_id: str) -> StagedStep | None:
        staged = self._steps.pop(step_id, None)
        if staged is not None:
            self.bytes -= staged.bytes
        return staged

    def _drop(self, step_id: str, why: str) -> None:
        """Drops a step before its commit (expired, evicted), remembering which of its parts went: a later
        part may stage it afresh, and its commit must not step that part alone (missing)."""
        staged = self._remove(step_id)
        self.dropped[why] += 1
        self._dropped[step_id] = self._dropped.pop(step_id, set()) | set(staged.parts)
        while len(self._dropped) > MAX_DROPPED:
            self._dropped.popitem(last=False)

    def missing(self, step_id: str) -> set:
        """Parts of step_id that were dropped here and have not been staged again."""
        staged = self._steps.get(step_id)
        return self._dropped.get(step_id, set()) - (set(staged.parts) if staged is not None else set())

    def pin(self, step_id: str) -> None:
        """Keeps the step from eviction until its commit (a commit's first round on several shards)."""
        staged = self._steps.get(step_id)
        if staged is not None:
            staged.pinned = True

    def drop_namespace(self, namespace: str) -> None:
        for step_id in [s for s, staged in self._steps.items() if staged.namespace == namespace]:
            self.pop(step_id)

    def stage(self, namespace: str, generation: int, step_id: str, part: int, ids, grads, partials=None,
              actors: int = 1, held=None) -> None:
        """Keeps part ``part`` of step_id (its ids, value gradients and, for a backward, what it answered:
        partials, and the rows its ids were at: held), replacing an earlier copy of the same part (a
        retry). INVALID_ARGUMENT if the step id is another namespace's; RESOURCE_EXHAUSTED (nothing
        staged) if the bounds leave no room. actors: the shards of the placement the part was routed
        with (StagedStep.actors)."""
        now = self.clock()
        self._expire(now)
        staged = self._steps.get(step_id)
        if staged is not None and staged.namespace != namespace:
            raise InvalidArgument(f"step id {step_id!r} is already used by namespace {staged.namespace!r}")
        size = nbytes(ids) + nbytes(grads) + nbytes(partials) + nbytes(held and held.rows)
        if staged is not None and part in staged.parts:
            old_held = staged.held.get(part)
            size -= nbytes(staged.parts[part]) + nbytes(staged.partials.get(part)) + nbytes(old_held and old_held.rows)
        self._make_room(step_id, size, new_step=staged is None, now=now)
        if staged is None:
            staged = self._steps[step_id] = StagedStep(namespace, generation, now)
        staged.parts[part] = (ids, grads)
        if held is not None:
            staged.held[part] = held
        else:
            staged.held.pop(part, None)
        if partials is not None:
            staged.partials[part] = partials
        else:
            staged.partials.pop(part, None)  # a part staged again without them: what it answered before is gone
        staged.touched = now
        staged.actors = max(staged.actors, int(actors))
        staged.bytes += size
        self.bytes += size
        self._steps.move_to_end(step_id)

    def _expire(self, now: float) -> None:
        for step_id in [s for s, staged in self._steps.items() if now - staged.touched > TTL_S]:
            self._drop(step_id, "expired")

    def _make_room(self, step_id: str, size: int, new_step: bool, now: float) -> None:
        """Drops idle steps (least recently reached first) while the part would pass a bound; refuses it
        (RESOURCE_EXHAUSTED, nothing dropped) if it would pass one whatever the idle steps. A step's own
        parts never keep it out: a step larger than the budget is staged when no other step holds bytes
        (the bound is on what waits beside it, not on the size of one step)."""
        own = self._steps[step_id].bytes if step_id in self._steps else 0
        others = [(s, staged) for s, staged in self._steps.items() if s != step_id]
        idle = [(s, staged) for s, staged in others if now - staged.touched > IDLE_S and not staged.pinned]
        live_bytes = sum(staged.bytes for _, staged in others) - sum(staged.bytes for _, staged in idle)
        live_steps = len(others) - len(idle)
        if live_bytes and live_bytes + own + size > self.budget:
            raise ResourceExhausted(
                f"shard {self.shard_index} cannot stage {format_size(size)} more of step parts: the other steps "
                f"waiting for their commit ({live_steps}) hold {format_size(live_bytes)} of its "
                f"{format_size(self.budget)} for staged steps (nothing of this part was staged; commit or abort "
                "the waiting steps, or send the step again once they are done)")
        if new_step and live_steps >= MAX_STEPS:
            raise ResourceExhausted(
                f"shard {self.shard_index} has {live_steps} steps waiting for their commit, the most it keeps "
                "(nothing of this part was staged; commit or abort the waiting steps)")
        for idle_step, _ in idle:
            over_bytes = self.bytes + size > self.budget and self.bytes > own
            over_count = new_step and len(self._steps) >= MAX_STEPS
            if not (over_bytes or over_count):
                break
            self._drop(idle_step, "evicted")

    def stats(self) -> dict:
        return {"steps": len(self._steps), "bytes": self.bytes, "budget": self.budget, "dropped": dict(self.dropped)}

