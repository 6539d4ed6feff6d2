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
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
import time
import warnings

import numpy as np
import torch
from monim.datastore import NamespaceConfig, NeighborStore, Rows, SearchResult
from monim.datastore.memory_ops import BackwardPartials
from monim.protos.errors import AlreadyExists, InvalidArgument, NamespaceChanged, NamespaceNotFound

# Ray hands actors their array arguments read-only (zero-copy from the object store); the shard
# reads them into tensors and never writes to them, so torch's warning about that is noise.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

# Request ids (and committed step ids) remembered per shard, to apply each write at most once.
REMEMBERED_REQUESTS = 100_000
# Staged steps that are neither committed nor aborted are dropped after this long, or when
# more than MAX_STAGED_STEPS wait (a client that died between the parts and the commit).
STAGED_STEP_TTL_S = 600.0
MAX_STAGED_STEPS = 256


@dataclasses.dataclass
class _StagedStep:
    namespace: str
    generation: int
    started: float
    parts: dict = dataclasses.field(default_factory=dict)  # part -> (ids int64 [U], grads [U, value_dim])


def _serialized(method):
    """One call at a time per shard, as a Ray actor with max_concurrency=1 runs them."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


class _Remembered(collections.OrderedDict):
    """A bounded map of the most recent keys."""

    def remember(self, key, value):
        self[key] = value
        while len(self) > REMEMBERED_REQUESTS:
            self.popitem(last=False)
        return value


class Shard:
    """shard_index: 0-based position in the deployment, of num_shards; device: "cpu", "cuda" or "auto"."""

    def __init__(self, shard_index: int, num_shards: int = 1, device: str = "auto"):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.shard_index = shard_index
        self.num_shards = num_shards
        self.device = device
        self.stores: dict[str, NeighborStore] = {}
        self._applied = _Remembered()     # (request id, operation) -> result
        self._committed = _Remembered()   # step id -> rows updated
        self._staged: dict[str, _StagedStep] = {}
        self._lock = threading.RLock()

    def _store(self, namespace: str, generation: int = 0) -> NeighborStore:
        store = self.stores.get(namespace)
        if store is None:
            raise NamespaceNotFound(namespace)
        if generation and store.config.generation != generation:
            raise NamespaceChanged(namespace, generation, store.config.generation)
        return store

    def _once(self, request_id: str, operation: str, apply):
        """apply() once per request id; a repeated request answers the first result."""
        if not request_id:
            return apply()
        key = (request_id, operation)
        if key in self._applied:
            return self._applied[key]
        return self._applied.remember(key, apply())

    @_serialized
    def ping(self) -> dict:
        return {"shard": self.shard_index, "device": self.device, "namespaces": len(self.stores)}

    # ----- namespaces ----------------------------------------------------------
    @_serialized
    def create_namespace(self, config: dict) -> None:
        """Idempotent for the same generation; ALREADY_EXISTS if another incarnation is stored."""
        parsed = NamespaceConfig.from_dict(config)
        existing = self.stores.get(parsed.name)
        if existing is not None:
            if existing.config.generation == parsed.generation:
                return
            raise AlreadyExists(f"namespace {parsed.name!r} already exists on shard {self.shard_index}")
        self.stores[parsed.name] = NeighborStore(parsed, device=self.device, id_stride=self.num_shards,
                                                 id_offset=self.shard_index)

    @_serialized
    def drop_namespace(self, namespace: str, generation: int = 0) -> int:
        """Drops the namespace if it is of this generation (0: any); returns the rows dropped
        (0 when absent or of another generation, which is left alone)."""
        store = self.stores.get(namespace)
        if store is None or (generation and store.config.generation != generation):
            return 0
        del self.stores[namespace]
        for step_id in [s for s, staged in self._staged.items() if staged.namespace == namespace]:
            del self._staged[step_id]
        return len(store)

    @_serialized
    def stats(self, namespace: str, generation: int = 0) -> dict:
        return dict(self._store(namespace, generation).stats(), shard=self.shard_index,
                    staged_steps=len(self._staged))

    # ----- data ------------------------------------------------------------------
    @_serialized
    def add(self, namespace: str, generation: int, request_id: str, ids: np.ndarray, keys: np.ndarray,
            tokens: np.ndarray, values: np.ndarray | None, weights: np.ndarray | None, source: str) -> int:
        """Stores rows with router-chosen ids; returns how many."""
        store = self._store(namespace, generation)
        return self._once(request_id, "add",
                          lambda: len(store.add(keys, tokens, values, weights, source, ids=ids)))

    @_serialized
    def increment_weights(self, namespace: str, generation: int, request_id: str, ids: np.ndarray,
                          counts: np.ndarray) -> None:
        store = self._store(namespace, generation)
        self._once(request_id, "increment_weights", lambda: store.increment_weights(ids, counts))

    @_serialized
    def delete(self, namespace: str, generation: int, request_id: str, ids: np.ndarray | None,
               source: str | None) -> int:
        store = self._store(namespace, generation)
        return self._once(request_id, "delete", lambda: store.delete(ids=ids, source=source))

    @_serialized
    def search(self, namespace: str, generation: int, queries: np.ndarray, k: int, return_keys: bool,
               return_values: bool, return_weights: bool) -> SearchResult:
        return self._store(namespace, generation).search(queries, k, return_keys, return_values, return_weights)

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
    def value_sum(self, namespace: str, generation: int, ids: np.ndarray, alpha: np.ndarray) -> np.ndarray:
        """float32 [B, value_dim]: this shard's part of sum_i alpha_i v_i; NOT_FOUND if one of
        its ids went since the search."""
        return self._store(namespace, generation).value_sum(ids, alpha)

    @_serialized
    def backward_part(self, namespace: str, generation: int, step_id: str, part: int, queries, ids, alpha,
                      distances, grad_memory) -> BackwardPartials:
        """This shard's partial sums of one part of a Retrieve backward; its value gradients wait,
        staged under step_id, for commit_step. NOT_FOUND (nothing staged) if one of its ids is gone.
        A part of a step this shard already committed (a retry) gets its partials, and stages nothing."""
        store = self._store(namespace, generation)
        partials, step_ids, grads = store.backward_partials(queries, ids, alpha, distances, grad_memory)
        if step_id not in self._committed:
            self._staged_step(namespace, generation, step_id).parts[part] = (step_ids, grads)
        return partials

    @_serialized
    def stage_gradients(self, namespace: str, generation: int, step_id: str, part: int, ids: np.ndarray,
                        grads: np.ndarray) -> int:
        """Stages value gradients for ids (all of which belong here) after checking they are stored."""
        store = self._store(namespace, generation)
        store.check_stored(ids)
        if step_id not in self._committed:
            self._staged_step(namespace, generation, step_id).parts[part] = (ids, torch.from_numpy(grads))
        return int(ids.size)

    def _staged_step(self, namespace: str, generation: int, step_id: str) -> _StagedStep:
        now = time.monotonic()
        for old in [s for s, staged in self._staged.items() if now - staged.started > STAGED_STEP_TTL_S]:
            del self._staged[old]
        staged = self._staged.get(step_id)
        if staged is None:
            while len(self._staged) >= MAX_STAGED_STEPS:
                del self._staged[next(iter(self._staged))]
            staged = self._staged[step_id] = _StagedStep(namespace, generation, now)
        elif staged.namespace != namespace:
            raise InvalidArgument(f"step id {step_id!r} is already used by namespace {staged.namespace!r}")
        return staged

    @_serialized
    def commit_step(self, namespace: str, generation: int, step_id: str) -> int:
        """Applies the staged parts of step_id as one optimizer step; returns the rows updated.
        Committing again answers the first result; a step with nothing staged here updates 0 rows."""
        if step_id in self._committed:
            return self._committed[step_id]
        store = self._store(namespace, generation)
        staged = self._staged.pop(step_id, None)
        updated = 0
        if staged is not None and staged.parts:
            parts = list(staged.parts.values())
            ids = np.concatenate([ids for ids, _ in parts])
            grads = torch.cat([torch.as_tensor(g).to(store.device) for _, g in parts])
            updated = store.step(ids, grads)
        return self._committed.remember(step_id, updated)

    @_serialized
    def abort_step(self, namespace: str, generation: int, step_id: str) -> None:
        self._staged.pop(step_id, None)
