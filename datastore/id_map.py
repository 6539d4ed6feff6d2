"""IdMap: vectorized id -> row lookup for one store, in memory O(live ids).

A shard holds the ids ``offset + stride * s`` for slots ``s = 0, 1, 2, ...``
(the router places id on shard ``id % num_shards``). Ids come from a counter
that only goes up and old rows are evicted, so the live slots are mostly one
dense band that moves upwards, plus a few old survivors below it. Every id
lives in exactly one of three parts:

  window     int64 table over slots [base, base + span): one numpy gather
             answers millions of lookups per call (a training step looks up
             B x k ids);
  survivors  sorted id and row arrays for the store's ids outside the window
             (old survivors, far-away ids), looked up with np.searchsorted;
  irregular  the same for ids off the pattern (a caller's own numbering,
             negative ids).

The window grows by doubling while it stays at least a third full. When it
would have to grow further, or deletes leave it less than a quarter full, or
the survivors outnumber it, it is rebuilt ("re-windowed") over the largest run
of live slots that is at least half full, and what lies outside goes to the
survivors. So memory follows the live ids, not the ids ever issued. A
re-window costs O(live ids) and waits until a quarter as many ids were
assigned since the last one, so ``assign`` stays amortized O(ids assigned).

Not thread-safe, lookups included (they merge the sorted parts' pending
changes): callers serialize calls, as NeighborStore does with its lock.
"""

from __future__ import annotations

import numpy as np
import torch

ABSENT = -1

_INT64_MAX = int(np.iinfo(np.int64).max)


class IdMap:
    def __init__(self, stride: int = 1, offset: int = 0, *, min_table_slots: int = 1024):
        """stride, offset: the ids this store mostly holds, ``offset + stride * slot``.
        min_table_slots: the window never shrinks below this many slots (tests set it low)."""
        if stride < 1:
            raise ValueError(f"IdMap stride must be >= 1, got {stride}")
        if offset < 0:
            raise ValueError(f"IdMap offset must be >= 0, got {offset}")
        if min_table_slots < 1:
            raise ValueError(f"IdMap min_table_slots must be >= 1, got {min_table_slots}")
        self.stride, self.offset = int(stride), int(offset)
        self._min_slots = int(min_table_slots)
        self._base = 0
        # One slot past the window stays ABSENT: lookups outside the window gather it.
        self._table = np.full(self._min_slots + 1, ABSENT, np.int64)
        self._dense = 0  # live slots in the window (steers re-windowing only; lookups never read it)
        self._survivors = _SortedRows(self._min_slots)
        self._irregular = _SortedRows(self._min_slots)
        self._assigned = 0  # ids assigned since the last re-window
        self._refused_growth = False
        self._version = 0  # bumped by every assign: the window's table copies on devices follow it
        self._device_tables: dict[torch.device, tuple[int, torch.Tensor]] = {}

    # ----- the interface -----------------------------------------------------
    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """int64 [...] ids -> int64 [...] rows, ABSENT (-1) where an id is not mapped."""
        ids = np.asarray(ids)
        flat = ids.reshape(-1).astype(np.int64, copy=False)
        span, stride = self._span, self.stride
        origin = self.offset + stride * self._base  # the id of the window's first slot
        delta = flat - origin
        # Ids below the window read as huge unsigned numbers, so one comparison bounds both ends...
        inside = delta.view(np.uint64) < span * stride
        if origin + span * stride > _INT64_MAX + 1:
            # ...except where the window reaches the top of int64: ids far below wrap around into it.
            inside &= flat >= origin
        if stride == 1:
            local = delta
        else:
            local = delta // stride
            inside &= local * stride == delta
        rows = self._table.take(np.where(inside, local, span))
        if self._survivors.upper_len() or self._irregular.upper_len():
            rest = np.flatnonzero(~inside)
            if rest.size:
                rows[rest] = self._lookup_outside(flat[rest])
        return rows.reshape(ids.shape)

    def lookup_tensor(self, ids: torch.Tensor) -> torch.Tensor:
        """``lookup`` for ids that are a tensor on a device (a training step's B x k ids on the GPU):
        the window's gather runs there, on a copy of its table made once per change of the map;
        ids outside the window (survivors, irregular ids: rare) are looked up on the host. Same
        answers as ``lookup`` (tests/unit/test_id_map.py checks them against each other)."""
        flat = ids.reshape(-1).to(torch.int64)
        span, stride = self._span, self.stride
        origin = self.offset + stride * self._base
        # Only ids >= origin can be inside; for them flat - origin cannot overflow (origin >= 0).
        above = flat >= origin
        delta = torch.where(above, flat - origin, 0)
        local = delta if stride == 1 else torch.div(delta, stride, rounding_mode="floor")
        inside = above & (local < span)
        if stride != 1:
            inside &= local * stride == delta
        rows = self._device_table(flat.device)[torch.where(inside, local, span)]
        if self._survivors.upper_len() or self._irregular.upper_len():
            # Negative ids are never on the pattern (offset >= 0): only irregular ids can be negative.
            outside = ~inside if self._irregular.upper_len() else ~inside & (flat >= 0)
            rest = outside.nonzero().reshape(-1)
            if rest.numel():
                rows[rest] = torch.from_numpy(self._lookup_outside(flat[rest].cpu().numpy())).to(rows.device)
        return rows.reshape(ids.shape)

    def _device_table(self, device: torch.device) -> torch.Tensor:
        held = self._device_tables.get(device)
        if held is None or held[0] != self._version:
            held = self._device_tables[device] = (self._version, torch.from_numpy(self._table).to(device, copy=True))
        return held[1]

    def assign(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Maps each id to its row: ids int64 [...] (distinct), rows int64 of the same size;
        a row ABSENT removes its id."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        rows = np.asarray(rows, np.int64).reshape(-1)
        if ids.shape != rows.shape:
            raise ValueError(f"IdMap.assign got {ids.size} ids but {rows.size} rows")
        if ids.size == 0:
            return
        self._version += 1
        self._assigned += ids.size
        slots, regular = self._slots(ids)
        if not regular.all():
            self._irregular.assign(ids[~regular], rows[~regular])
            ids, slots, rows = ids[regular], slots[regular], rows[regular]
        local = slots - self._base
        if local.size and int(local.max()) >= self._span:
            above = (local >= self._span) & (rows != ABSENT)
            if above.any():
                self._grow(int(local[above].max()) + 1, int(np.count_nonzero(above)))
        inside = local.view(np.uint64) < self._span  # slots below the window read as huge
        if not inside.all():
            self._survivors.assign(ids[~inside], rows[~inside])
            local, rows = local[inside], rows[inside]
        self._dense += int(np.count_nonzero(rows != ABSENT)) - int(np.count_nonzero(self._table[local] != ABSENT))
        self._table[local] = rows
        self._maybe_rewindow()

    def __len__(self) -> int:
        """Live ids."""
        self._dense = int(np.count_nonzero(self._table[: self._span] != ABSENT))
        return self._dense + len(self._survivors) + len(self._irregular)

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays held."""
        return self._table.nbytes + self._survivors.nbytes + self._irregular.nbytes

    # ----- slots ---------------------------------------------------------------
    @property
    def _span(self) -> int:
        return self._table.size - 1

    def _slots(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """int64 [n] ids -> (int64 [n] slots, valid where the bool [n] mask of ids on the pattern is set)."""
        # `ids >= offset` rather than `shifted >= 0`: ids - offset wraps around below INT64_MIN + offset.
        shifted = ids - self.offset if self.offset else ids
        if self.stride == 1:
            return shifted, ids >= self.offset
        slots = shifted // self.stride
        return slots, (slots * self.stride == shifted) & (ids >= self.offset)

    def _lookup_outside(self, ids: np.ndarray) -> np.ndarray:
        """int64 [n] ids outside the window -> int64 [n] rows."""
        regular = self._slots(ids)[1]
        rows = np.full(ids.shape, ABSENT, np.int64)
        if regular.any():
            rows[regular] = self._survivors.lookup(ids[regular])
        if not regular.all():
            rows[~regular] = self._irregular.lookup(ids[~regular])
        return rows

    # ----- the window ----------------------------------------------------------
    def _grow(self, needed: int, adding: int) -> None:
        """Extends the window to at least ``needed`` slots, doubling, if it stays a third full;
        otherwise leaves the new ids to the survivors and asks for a re-window."""
        span = max(needed, 2 * self._span)
        if span > max(self._min_slots, 3 * (self._dense + adding)):
            self._refused_growth = True
            return
        old_span = self._span
        table = np.full(span + 1, ABSENT, np.int64)
        table[:old_span] = self._table[:old_span]
        self._table = table
        # Survivors above the old window that it now covers move into it.
        start, stop = self._survivors.range_of(self._id_of(self._base + old_span), self._id_of(self._base + span))
        if start < stop:
            ids, rows = self._survivors.pop_range(start, stop)
            self._table[self._slots(ids)[0] - self._base] = rows
            self._dense += ids.size

    def _maybe_rewindow(self) -> None:
        survivors = self._survivors.upper_len()
        wanted = (
            self._refused_growth
            or (self._span > self._min_slots and 4 * self._dense < self._span)
            or survivors > max(self._min_slots, self._dense)
        )
        if wanted and 4 * self._assigned >= self._dense + survivors:
            self._rewindow()

    def _rewindow(self) -> None:
        """Rebuilds the window over the largest run of live slots that is at least half full."""
        survivor_ids, survivor_rows = self._survivors.items()
        survivor_slots = self._slots(survivor_ids)[0]
        live = np.flatnonzero(self._table[: self._span] != ABSENT)
        # Survivors lie below or above the window, so this concatenation is sorted by slot.
        below = int(np.searchsorted(survivor_slots, self._base))
        slots = np.concatenate([survivor_slots[:below], live + self._base, survivor_slots[below:]])
        rows = np.concatenate([survivor_rows[:below], self._table[live], survivor_rows[below:]])
        if slots.size:
            first, last = _densest_run(slots)
            self._base = int(slots[first])
            run = int(slots[last]) - self._base + 1
            span = max(self._min_slots, run + run // 2)  # room above for the next appends
        else:
            span = self._min_slots
        local = slots - self._base
        inside = (local >= 0) & (local < span)
        self._table = np.full(span + 1, ABSENT, np.int64)
        self._table[local[inside]] = rows[inside]
        self._dense = int(np.count_nonzero(inside))
        outside = ~inside
        self._survivors.replace(self.offset + self.stride * slots[outside], rows[outside])
        self._assigned = 0
        self._refused_growth = False

    def _id_of(self, slot: int) -> int:
        """The id of a slot, capped at INT64_MAX + 1 (past every id)."""
        return min(self.offset + self.stride * slot, _INT64_MAX + 1)


def _densest_run(slots: np.ndarray) -> tuple[int, int]:
    """slots: int64 [n], sorted, distinct, n >= 1 -> (i, j), i <= j: the run slots[i..j] with
    the most slots among those covering at least half of [slots[i], slots[j]]; the highest on ties.

    The run i..j is half full when 2 * (j - i + 1) >= slots[j] - slots[i] + 1, that is when
    t[j] - 1 <= t[i] for t[k] = slots[k] - 2k. The largest such j is the last position where the
    suffix minimum of t (non-decreasing) minus 1 is <= t[i]: one searchsorted for every i at once.
    (t - 1 rather than t + 1: a slot may be INT64_MAX, t cannot go below -2n.)"""
    positions = np.arange(slots.size, dtype=np.int64)
    t = slots - 2 * positions
    suffix_min = np.minimum.accumulate(t[::-1])[::-1]
    ends = np.searchsorted(suffix_min - 1, t, side="right") - 1
    counts = ends - positions
    first = slots.size - 1 - int(np.argmax(counts[::-1]))
    return first, int(ends[first])


class _SortedRows:
    """id -> row for the ids outside the window: sorted distinct ids int64 [n], rows int64 [n].

    Changes are logged and merged into the arrays on the next read, or once the log
    outgrows them, so a run of small assigns does not copy the arrays each time."""

    def __init__(self, min_log: int):
        self.ids = np.empty(0, np.int64)
        self.rows = np.empty(0, np.int64)
        self._log_ids: list[np.ndarray] = []
        self._log_rows: list[np.ndarray] = []
        self._logged = 0
        self._min_log = min_log

    def __len__(self) -> int:
        self._merge()
        return self.ids.size

    def upper_len(self) -> int:
        """At least len(self), without merging the log."""
        return self.ids.size + self._logged

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + self.rows.nbytes + 2 * 8 * self._logged

    def assign(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """ids, rows: int64 [n], taken over (not copied); a row ABSENT removes its id."""
        if ids.size == 0:
            return
        self._log_ids.append(ids)
        self._log_rows.append(rows)
        self._logged += ids.size
        if self._logged > max(self._min_log, self.ids.size):
            self._merge()

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """int64 [n] ids -> int64 [n] rows, ABSENT where not held."""
        self._merge()
        if self.ids.size == 0:
            return np.full(ids.shape, ABSENT, np.int64)
        at = np.searchsorted(self.ids, ids)
        np.minimum(at, self.ids.size - 1, out=at)
        return np.where(self.ids[at] == ids, self.rows[at], ABSENT)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, rows), sorted by id; read-only views of the held arrays."""
        self._merge()
        return self.ids, self.rows

    def replace(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Holds exactly these (ids sorted and distinct, no row ABSENT; the arrays are taken over)."""
        self.ids, self.rows = ids, rows
        self._log_ids, self._log_rows, self._logged = [], [], 0

    def range_of(self, low_id: int, high_id: int) -> tuple[int, int]:
        """Positions [start, stop) of the ids in [low_id, high_id); the bounds may pass INT64_MAX."""
        self._merge()
        return self._position(low_id), self._position(high_id)

    def pop_range(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Removes and returns (ids, rows) at positions [start, stop)."""
        taken = self.ids[start:stop].copy(), self.rows[start:stop].copy()
        self.ids = np.concatenate([self.ids[:start], self.ids[stop:]])
        self.rows = np.concatenate([self.rows[:start], self.rows[stop:]])
        return taken

    def _position(self, bound: int) -> int:
        if bound > _INT64_MAX:
            return self.ids.size
        return int(np.searchsorted(self.ids, bound))

    def _merge(self) -> None:
        """Applies the log: the last change of each id wins, ABSENT rows drop their ids."""
        if not self._logged:
            return
        ids, rows = np.concatenate(self._log_ids), np.concatenate(self._log_rows)
        self._log_ids, self._log_rows, self._logged = [], [], 0
        order = np.argsort(ids, kind="stable")
        ids, rows = ids[order], rows[order]
        last = np.ones(ids.size, bool)
        np.not_equal(ids[1:], ids[:-1], out=last[:-1])
        ids, rows = ids[last], rows[last]
        at = np.searchsorted(self.ids, ids)
        held = at < self.ids.size
        held[held] = self.ids[at[held]] == ids[held]
        self.rows[at[held]] = rows[held]
        new = ~held & (rows != ABSENT)
        if new.any():
            self.ids = np.insert(self.ids, at[new], ids[new])
            self.rows = np.insert(self.rows, at[new], rows[new])
        kept = self.rows != ABSENT
        if not kept.all():
            self.ids, self.rows = self.ids[kept], self.rows[kept]
