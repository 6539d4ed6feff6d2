"""Shard: the state one shard actor holds (plain Python; Ray wraps it in workers/runtime.py).

A shard hosts one NeighborStore per namespace on its device (one GPU, or the
CPU). The router owns placement: entry ``id`` lives on shard
``id % num_shards``, and ids are allocated by the namespace registry.
"""

from __future__ import annotations

import numpy as np
import torch

from datastore import NamespaceConfig, NeighborStore, Rows, SearchResult
from datastore.errors import AlreadyExists, NamespaceNotFound


class Shard:
    """shard_index: 0-based position in the deployment; device: "cpu", "cuda" or "auto"."""

    def __init__(self, shard_index: int, device: str = "auto"):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.shard_index = shard_index
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
        self.stores[parsed.name] = NeighborStore(parsed, device=self.device)

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

    def get_present(self, namespace: str, ids: np.ndarray) -> tuple[Rows | None, np.ndarray]:
        """(rows of the stored ids, in order, or None; the ids not stored here)."""
        store = self._store(namespace)
        present = store.contains(ids)
        rows = store.get(ids[present]) if present.any() else None
        return rows, ids[~present]

    def delete(self, namespace: str, ids: np.ndarray | None, source: str | None) -> int:
        return self._store(namespace).delete(ids=ids, source=source)
