"""IdMap: vectorized id -> row lookup for one store.

A shard holds the ids ``offset, offset + stride, offset + 2*stride, ...`` (the
router places id on shard ``id % num_shards``), so a dense table indexed by
``(id - offset) // stride`` answers millions of lookups per call with one
numpy gather (a training step looks up B x k ids). Ids that do not follow the
pattern (a caller's own numbering) go to an overflow dict.
"""

from __future__ import annotations

import numpy as np

ABSENT = -1


class IdMap:
    def __init__(self, stride: int = 1, offset: int = 0):
        self.stride = stride
        self.offset = offset
        self.table = np.full(1024, ABSENT, np.int64)
        self.overflow: dict[int, int] = {}

    def _slots(self, ids: np.ndarray):
        """(slot of each id in the table, mask of ids that follow the pattern)."""
        shifted = ids - self.offset
        regular = (shifted >= 0) & (shifted % self.stride == 0)
        return np.where(regular, shifted // self.stride, 0), regular

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """int64 [...] ids -> int64 [...] rows, -1 where absent."""
        flat = ids.reshape(-1)
        slots, regular = self._slots(flat)
        inside = regular & (slots < self.table.shape[0])
        rows = np.where(inside, self.table[np.where(inside, slots, 0)], ABSENT)
        if self.overflow:
            for position in np.flatnonzero(~regular).tolist():
                rows[position] = self.overflow.get(int(flat[position]), ABSENT)
        return rows.reshape(ids.shape)

    def assign(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Maps each id to its row (ids distinct); rows ABSENT removes them."""
        slots, regular = self._slots(ids)
        if regular.any():
            needed = int(slots[regular].max()) + 1
            if needed > self.table.shape[0]:
                grown = np.full(max(needed, 2 * self.table.shape[0]), ABSENT, np.int64)
                grown[: self.table.shape[0]] = self.table
                self.table = grown
            self.table[slots[regular]] = rows[regular]
        for entry_id, row in zip(ids[~regular].tolist(), rows[~regular].tolist()):
            if row == ABSENT:
                self.overflow.pop(entry_id, None)
            else:
                self.overflow[entry_id] = row
