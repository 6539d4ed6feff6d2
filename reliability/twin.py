"""A client's exact model of one of its namespaces: the in-process store (``MemoryClient(":memory:")``,
the router over one in-process shard: the service's own code) fed every call the service acknowledged,
and the map between the two sides' ids.

The ids differ: the model numbers its rows 0, 1, 2, ... while a served namespace skips ahead to its
reserved mark each time its registry restarts (workers/registry.py). So each model id has its served
id, and every served id that reaches the client is mapped back before comparing. An id the model never
gave out maps to UNKNOWN, which no model id equals, so it shows as a wrong neighbour or row.
"""

from __future__ import annotations

import dataclasses

import numpy as np

UNKNOWN = -2  # a served id the model does not know


@dataclasses.dataclass
class NamespaceSpec:
    name: str
    dim: int
    metric: str = "l2"
    value_dim: int = 0
    optimizer: str = "sgd"
    lr: float = 0.01
    max_k: int = 64
    index: str = "flat"        # or "ivf_flat", searched with every list probed: exact, as the model's
    nlist: int = 0
    train_min_rows: int = 0

    def create_options(self) -> dict:
        index = {} if self.index == "flat" else dict(index=self.index, nlist=self.nlist,
                                                      train_min_rows=self.train_min_rows)
        return dict(dim=self.dim, metric=self.metric, value_dim=self.value_dim, optimizer=self.optimizer, lr=self.lr,
                    max_k=self.max_k, **index)

    def search_options(self) -> dict:
        """What a search of it passes: an ivf_flat namespace probes every list (its answers exact)."""
        return {} if self.index == "flat" else {"nprobe": self.nlist}


class _Growing:
    """A numpy array indexed by model id that grows as rows are added."""

    def __init__(self, dtype, width: int = 0, fill=0):
        self.shape = (width,) if width else ()
        self.array = np.full((1024, *self.shape), fill, dtype)
        self.fill = fill

    def set(self, index: np.ndarray, values) -> None:
        needed = int(index.max()) + 1 if index.size else 0
        if needed > len(self.array):
            bigger = np.full((max(needed, 2 * len(self.array)), *self.shape), self.fill, self.array.dtype)
            bigger[:len(self.array)] = self.array
            self.array = bigger
        self.array[index] = values


class NamespaceTwin:
    """spec: the namespace; model: the client's in-process MemoryClient (its namespace already created)."""

    def __init__(self, spec: NamespaceSpec, model):
        self.spec = spec
        self.model = model
        self.served_of = _Growing(np.int64, fill=UNKNOWN)   # model id -> served id
        self.model_of: dict[int, int] = {}                   # served id -> model id
        self.keys = _Growing(np.float32, spec.dim)
        self.tokens = _Growing(np.int64)
        self.sources: dict[int, str] = {}
        self.alive = _Growing(bool, fill=False)
        self.next_model_id = 0

    # ----- ids ----------------------------------------------------------------------------------
    def to_model(self, served_ids: np.ndarray) -> np.ndarray:
        """Served ids (any shape; -1 stays -1) as model ids; UNKNOWN where the model has none."""
        flat = np.asarray(served_ids).reshape(-1)
        out = np.array([i if i < 0 else self.model_of.get(int(i), UNKNOWN) for i in flat.tolist()], np.int64)
        return out.reshape(np.shape(served_ids))

    def to_served(self, model_ids: np.ndarray) -> np.ndarray:
        model_ids = np.asarray(model_ids, np.int64)
        return np.where(model_ids >= 0, self.served_of.array[np.maximum(model_ids, 0)], model_ids)

    @property
    def live(self) -> np.ndarray:
        """Model ids of the rows stored now."""
        return np.flatnonzero(self.alive.array[:self.next_model_id])

    @property
    def gone(self) -> np.ndarray:
        """Model ids of rows deleted (or merged away: none are) since."""
        return np.flatnonzero(~self.alive.array[:self.next_model_id])

    def rows(self) -> int:
        return int(self.alive.array[:self.next_model_id].sum())

    # ----- acknowledged writes ------------------------------------------------------------------------
    def added(self, served, modelled, keys: np.ndarray, tokens: np.ndarray, source: str) -> list[str]:
        """Records an Add both sides acknowledged (their AddResults); returns the problems: admission and
        merges must agree, a merged row must name the same entry on both sides, new rows new served ids."""
        problems = []
        if not np.array_equal(served.admitted, modelled.admitted):
            problems.append(f"add: admitted rows differ: served {np.flatnonzero(served.admitted).tolist()}, "
                            f"model {np.flatnonzero(modelled.admitted).tolist()}")
        if not np.array_equal(served.merged, modelled.merged):
            problems.append(f"add: merged rows differ: served {np.flatnonzero(served.merged).tolist()}, "
                            f"model {np.flatnonzero(modelled.merged).tolist()}")
        new = modelled.admitted & ~modelled.merged
        merged = modelled.merged & served.merged
        if merged.any():
            named = self.to_model(served.ids[merged])
            if not np.array_equal(named, modelled.ids[merged]):
                problems.append(f"add: rows merged into other entries: served ids {served.ids[merged].tolist()} "
                                f"(as model ids {named.tolist()}), model {modelled.ids[merged].tolist()}")
        model_ids, served_ids = modelled.ids[new], served.ids[new]
        reused = [int(i) for i in served_ids.tolist() if i < 0 or i in self.model_of]
        if reused:
            problems.append(f"add: served ids {reused[:10]} for new rows are not new")
        self.served_of.set(model_ids, served_ids)
        for model_id, served_id in zip(model_ids.tolist(), served_ids.tolist()):
            self.model_of[served_id] = model_id
            self.sources[model_id] = source
        self.keys.set(model_ids, keys[new])
        self.tokens.set(model_ids, tokens[new])
        self.alive.set(model_ids, True)
        self.next_model_id = max(self.next_model_id, int(model_ids.max()) + 1 if model_ids.size else 0)
        return problems

    def deleted(self, model_ids: np.ndarray) -> None:
        model_ids = model_ids[(model_ids >= 0) & (model_ids < self.next_model_id)]
        self.alive.set(model_ids, False)

    def deleted_source(self, source: str) -> None:
        self.deleted(np.array([i for i, tag in self.sources.items() if tag == source], np.int64))

    # ----- the end -----------------------------------------------------------------------------------
    def expected(self, chunk: int = 8192) -> dict:
        """What the service must hold for this namespace: every live row, from the model, by served id:
        {"served_ids", "keys", "tokens", "values", "weights", "sources", "step"} (arrays in one order)."""
        live = self.live
        parts = [self.model.get(self.spec.name, live[start:start + chunk], return_optimizer_state=True)
                 for start in range(0, live.size, chunk)]
        if not parts:
            return {"served_ids": np.empty(0, np.int64), "rows": 0}

        def joined(name):
            columns = [getattr(p, name) for p in parts]
            return None if columns[0] is None else np.concatenate(columns)

        return {"served_ids": self.to_served(live), "rows": int(live.size), "keys": joined("keys"),
                "tokens": joined("tokens"), "values": joined("values"), "weights": joined("weights"),
                "sources": [s for p in parts for s in p.sources],
                "optimizer_state": {name: np.concatenate([p.optimizer_state[name] for p in parts])
                                    for name in parts[0].optimizer_state}}
