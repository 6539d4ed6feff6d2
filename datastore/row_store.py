"""Columnar storage of a shard's entries, growable, on one device.

Columns (row r of each belongs to one entry):
  ids int64 [N], keys [N, dim] (float32, or float16 on CUDA), tokens int32 [N],
  values float32 [N, value_dim], weights float32 [N], created int64 [N]
  (a store-local insertion counter), source codes int32 [N] into ``sources``,
  steps int64 [N] (optimizer steps the row has taken), and the optimizer's per-row
  state columns float32 [N, value_dim] (zero for a new row, or the optimizer's initial value).
Rows are dense: a delete moves the last rows into the holes, and the id -> row
map (IdMap) follows every move, so searches always scan ``[0, N)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monim.datastore.id_map import ABSENT, IdMap
from monim.datastore.transfer import source_tensor

_MIN_CAPACITY = 1024


class RowStore:
    def __init__(self, dim: int, value_dim: int, device: torch.device, key_dtype: torch.dtype,
                 state_columns: dict[str, float] | None = None, id_stride: int = 1, id_offset: int = 0):
        """state_columns: optimizer state column name -> initial value (each [N, value_dim]).
        id_stride, id_offset: the pattern of ids this store holds (see IdMap)."""
        self.dim = dim
        self.value_dim = value_dim
        self.device = device
        self.key_dtype = key_dtype
        self.state_columns = dict(state_columns or {})
        self.size = 0
        self.capacity = 0
        self.id_map = IdMap(id_stride, id_offset)
        self.sources: list[str] = []
        self._source_codes: dict[str, int] = {}
        self._insertions = 0
        # Counts the reallocations of the columns: anything that keeps their addresses (a search's
        # CUDA graph) is stale once it changes.
        self.layout = 0
        # Counts the deletes: a row index read before is still the same entry's while it is unchanged.
        self.removals = 0
        self._allocate(_MIN_CAPACITY)

    # ----- storage -----------------------------------------------------------
    def _empty_columns(self, capacity: int) -> dict[str, torch.Tensor]:
        on = dict(device=self.device)
        return {
            "ids": torch.empty(capacity, dtype=torch.int64, **on),
            "keys": torch.empty(capacity, self.dim, dtype=self.key_dtype, **on),
            "key_norms": torch.empty(capacity, dtype=torch.float32, **on),
            "tokens": torch.empty(capacity, dtype=torch.int32, **on),
            "values": torch.empty(capacity, self.value_dim, dtype=torch.float32, **on),
            "weights": torch.empty(capacity, dtype=torch.float32, **on),
            "created": torch.empty(capacity, dtype=torch.int64, **on),
            "source_codes": torch.empty(capacity, dtype=torch.int32, **on),
            "steps": torch.empty(capacity, dtype=torch.int64, **on),
            **{name: torch.empty(capacity, self.value_dim, dtype=torch.float32, **on) for name in self.state_columns},
        }

    @property
    def column_names(self) -> list[str]:
        return ["ids", "keys", "key_norms", "tokens", "values", "weights", "created", "source_codes", "steps",
                *self.state_columns]

    def _allocate(self, capacity: int) -> None:
        columns = self._empty_columns(capacity)
        for name, column in columns.items():
            if self.size:
                column[: self.size] = getattr(self, name)[: self.size]
            setattr(self, name, column)
        self.capacity = capacity
        self.layout += 1

    def _reserve(self, rows: int) -> None:
        needed = self.size + rows
        if needed > self.capacity:
            self._allocate(self._grown_capacity(needed))

    def _grown_capacity(self, needed: int) -> int:
        return max(needed, 2 * self.capacity)

    @property
    def row_bytes(self) -> int:
        """Bytes one row takes across the columns."""
        return sum(column.element_size() * math.prod(column.shape[1:])
                   for column in (getattr(self, name) for name in self.column_names))

    @property
    def nbytes(self) -> int:
        """Bytes the columns hold (allocated: capacity, not size)."""
        return sum(getattr(self, name).nbytes for name in self.column_names)

    def growth_bytes(self, rows: int) -> int:
        """Bytes that appending ``rows`` rows allocates: 0 when they fit, else the new columns (the
        old ones are freed after the copy, so the peak is nbytes + this)."""
        needed = self.size + rows
        return 0 if needed <= self.capacity else self._grown_capacity(needed) * self.row_bytes

    def source_code(self, source: str) -> int:
        code = self._source_codes.get(source)
        if code is None:
            code = len(self.sources)
            self.sources.append(source)
            self._source_codes[source] = code
        return code

    # ----- operations --------------------------------------------------------
    def append(self, ids: np.ndarray, keys: np.ndarray, tokens: np.ndarray, values: np.ndarray | None,
               weights: np.ndarray, source: str) -> None:
        """Appends N rows. ids int64 [N] (not present yet), keys float32 [N, dim], ..."""
        n = ids.shape[0]
        self._reserve(n)
        rows = slice(self.size, self.size + n)
        key_tensor = source_tensor(keys).to(self.device)
        self.ids[rows] = source_tensor(ids).to(self.device)
        self.keys[rows] = key_tensor.to(self.key_dtype)
        # Norms of the keys as stored (after rounding to key_dtype), so distances stay consistent.
        self.key_norms[rows] = (self.keys[rows].float() ** 2).sum(dim=1)
        self.tokens[rows] = source_tensor(tokens).to(self.device)
        if self.value_dim:
            if values is None:
                self.values[rows] = 0.0
            else:
                self.values[rows] = source_tensor(values).to(self.device)
        self.weights[rows] = source_tensor(weights).to(self.device)
        self.created[rows] = torch.arange(self._insertions, self._insertions + n, device=self.device)
        self.source_codes[rows] = self.source_code(source)
        self.steps[rows] = 0
        for name, initial in self.state_columns.items():
            getattr(self, name)[rows] = initial
        self._insertions += n
        self.id_map.assign(ids, np.arange(self.size, self.size + n, dtype=np.int64))
        self.size += n

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """int64 [...] ids -> int64 [...] rows; -1 where an id is not stored."""
        return self.id_map.lookup(ids)

    def remove_rows(self, rows: np.ndarray) -> np.ndarray:
        """Deletes the given rows (valid; a row named twice goes once), filling holes from the tail.
        Returns the ids they held (int64, in row order)."""
        rows = np.unique(rows)
        if rows.size == 0:
            return np.empty(0, np.int64)
        new_size = self.size - rows.size
        self.removals += 1
        gone = self.ids[torch.from_numpy(rows).to(self.device)].cpu().numpy()
        self.id_map.assign(gone, np.full(gone.shape, ABSENT, np.int64))
        holes = rows[rows < new_size]
        tail = np.arange(new_size, self.size)
        movers = tail[~np.isin(tail, rows)]
        if holes.size:
            dst = torch.from_numpy(holes).to(self.device)
            src = torch.from_numpy(movers).to(self.device)
            for name in self.column_names:
                column = getattr(self, name)
                column[dst] = column[src]
            self.id_map.assign(self.ids[dst].cpu().numpy(), holes)
        self.size = new_size
        return gone

    def rows_with_source(self, source: str) -> np.ndarray:
        code = self._source_codes.get(source)
        if code is None:
            return np.empty(0, np.int64)
        mask = self.source_codes[: self.size] == code
        return torch.nonzero(mask).flatten().cpu().numpy().astype(np.int64)

    # ----- snapshots (datastore/snapshot.py) ---------------------------------------
    @property
    def snapshot_columns(self) -> list[str]:
        """The columns a snapshot keeps: all but key_norms (recomputed from the keys), and values
        only when value_dim > 0."""
        return [name for name in self.column_names
                if name != "key_norms" and (name != "values" or self.value_dim)]

    @property
    def insertions(self) -> int:
        """The insertion counter: the ``created`` of the next appended row."""
        return self._insertions

    def host_columns(self, rows: int) -> dict[str, torch.Tensor]:
        """Empty CPU tensors with room for ``rows`` rows of each snapshot column, every page
        already written once, so that ``copy_to_host`` into them is a plain memcpy (a fresh
        allocation page-faults at well under 1 GB/s on a VM)."""
        out = {}
        for name in self.snapshot_columns:
            like = getattr(self, name)
            out[name] = torch.empty((rows, *like.shape[1:]), dtype=like.dtype).fill_(0)
        return out

    def copy_to_host(self, out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The snapshot columns' first ``size`` rows, copied to CPU tensors [size, ...] that share no
        memory with the store; into ``out`` (from ``host_columns``) when it has room. The caller
        holds the store's lock."""
        copies = {}
        for name in self.snapshot_columns:
            column = getattr(self, name)[: self.size]
            target = None if out is None else out.get(name)
            if target is not None and target.shape[0] >= self.size and target.dtype == column.dtype:
                copies[name] = target[: self.size]
                copies[name].copy_(column)
            else:
                copies[name] = column.detach().to("cpu", copy=True)
        return copies

    def reserve(self, rows: int) -> None:
        """Room for ``rows`` more rows without growing (a restore knows its row count)."""
        self._reserve(rows)

    def load_columns(self, ids: np.ndarray, keys: np.ndarray, tokens: np.ndarray, values: np.ndarray | None,
                     weights: np.ndarray, created: np.ndarray, sources: list[str], source_codes: np.ndarray,
                     steps: np.ndarray, state: dict[str, np.ndarray]) -> None:
        """Appends N rows with every column as given (rows restored from a snapshot), where
        ``append`` starts a new row's created, steps and optimizer state afresh.

        ids int64 [N] (distinct, not stored yet); keys float32 [N, dim] (rounded to key_dtype
        here, as ``append`` does); tokens int32 [N]; values float32 [N, value_dim] (None when
        value_dim is 0); weights float32 [N]; created int64 [N]; source_codes int32 [N], indexes
        into ``sources`` (the caller's list, mapped to this store's codes); steps int64 [N];
        state: each of ``state_columns`` -> float32 [N, value_dim]. The insertion counter moves
        past the largest ``created``.
        """
        n = ids.shape[0]
        if n == 0:
            return
        self._reserve(n)
        rows = slice(self.size, self.size + n)

        def put(name: str, array: np.ndarray) -> None:
            getattr(self, name)[rows].copy_(source_tensor(array))  # copies (and casts keys to key_dtype)

        put("ids", ids)
        put("keys", keys)
        self.key_norms[rows] = (self.keys[rows].float() ** 2).sum(dim=1)
        put("tokens", tokens)
        if self.value_dim:
            put("values", values)
        put("weights", weights)
        put("created", created)
        codes = np.array([self.source_code(source) for source in sources], dtype=np.int32)
        put("source_codes", codes[source_codes])
        put("steps", steps)
        for name in self.state_columns:
            put(name, state[name])
        self._insertions = max(self._insertions, int(created.max()) + 1)
        self.id_map.assign(ids, np.arange(self.size, self.size + n, dtype=np.int64))
        self.size += n

    def advance_insertions(self, insertions: int) -> None:
        """Moves the insertion counter up to ``insertions`` (never down)."""
        self._insertions = max(self._insertions, int(insertions))
