"""Shard: the state one shard actor holds (plain Python; Ray wraps it in workers/runtime.py).

A shard hosts one NeighborStore per namespace on its device (one GPU, or the
CPU). The router owns placement: entry ``id`` lives on shard
``id % num_shards``, and ids are allocated by the namespace registry.
"""

from __future__ import annotations

import numpy as np
import torch
from monim.datastore import NamespaceConfig, NeighborStore, Rows, SearchResult
from monim.datastore.memory_ops import BackwardPartials
from monim.protos.errors import AlreadyExists, NamespaceNotFound


class Shard:
    """shard_index: 0-based position in the deployment, of num_shards; device: "cpu", "cuda" or "auto"."""

    def __init__(self, shard_index: int, num_shards: int = 1, device: str = "auto"):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.shard_index = shard_index
        self.num_shards = num_shards
        self.device = device
        self.stores: dict[str, NeighborStore] = {}

    def _store(self, namespace: str) -> NeighborStore:
        store = self.stores.get(namespace)
        if store is None:
            raise NamespaceNotFound(namespace)
        return store

    def ping(self) -> dict:
        return {"shard": self.shard_index, "device": self.device, "namespaces": len(self.stores)}

    # ----- namespaces ----------------------------------------------------------
    def create_namespace(self, config: dict) -> None:
        parsed = NamespaceConfig.from_dict(config)
        if parsed.name in self.stores:
            raise AlreadyExists(f"namespace {parsed.name!r} already exists")
        self.stores[parsed.name] = NeighborStore(parsed, device=self.device, id_stride=self.num_shards,
                                                 id_offset=self.shard_index)

    def drop_namespace(self, namespace: str) -> int:
        """Returns the number of rows dropped; dropping an absent namespace drops 0."""
        store = self.stores.pop(namespace, None)
        return len(store) if store is not None else 0

    def stats(self, namespace: str) -> dict:
        return dict(self._store(namespace).stats(), shard=self.shard_index)

    # ----- data ------------------------------------------------------------------
    def add(self, namespace: str, ids: np.ndarray, keys: np.ndarray, tokens: np.ndarray,
            values: np.ndarray | None, weights: np.ndarray | None, source: str) -> int:
        """Stores rows with router-chosen ids; returns how many."""
        return len(self._store(namespace).add(keys, tokens, values, weights, source, ids=ids))

    def search(self, namespace: str, queries: np.ndarray, k: int, return_keys: bool, return_values: bool,
               return_weights: bool) -> SearchResult:
        return self._store(namespace).search(queries, k, return_keys, return_values, return_weights)

    def get_present(self, namespace: str, ids: np.ndarray,
                    return_optimizer_state: bool = False) -> tuple[Rows | None, np.ndarray]:
        """(rows of the stored ids, in order, or None; the ids not stored here)."""
        store = self._store(namespace)
        present = store.contains(ids)
        rows = store.get(ids[present], return_optimizer_state) if present.any() else None
        return rows, ids[~present]

    def missing_ids(self, namespace: str, ids: np.ndarray) -> np.ndarray:
        store = self._store(namespace)
        return ids[~store.contains(ids)]

    def increment_weights(self, namespace: str, ids: np.ndarray, counts: np.ndarray) -> None:
        self._store(namespace).increment_weights(ids, counts)

    # ----- learnable memory ----------------------------------------------------------
    def value_sum(self, namespace: str, ids: np.ndarray, alpha: np.ndarray) -> np.ndarray:
        """float32 [B, value_dim]: this shard's part of sum_i alpha_i v_i."""
        return self._store(namespace).value_sum(ids, alpha)

    def backward_partials(self, namespace: str, queries, ids, alpha, distances, grad_memory) -> BackwardPartials:
        """This shard's part of a Retrieve backward; its value rows take the optimizer step."""
        return self._store(namespace).backward_partials(queries, ids, alpha, distances, grad_memory)

    def apply_gradients(self, namespace: str, ids: np.ndarray, grads: np.ndarray) -> int:
        """One optimizer step (also with no ids here, so every shard counts every step)."""
        return self._store(namespace).apply_gradients(ids, grads, allow_empty=True)

    def delete(self, namespace: str, ids: np.ndarray | None, source: str | None) -> int:
        return self._store(namespace).delete(ids=ids, source=source)
