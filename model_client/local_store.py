"""The in-process store behind ``MemoryClient(":memory:")``: one NeighborStore per namespace.

Same behaviour as the service (same validation, same errors, same id
numbering), for tests and notebooks; no Ray, no network.
"""

from __future__ import annotations

import threading

from monim.datastore import NamespaceConfig, NeighborStore, Rows, SearchResult, validate_namespace_name
from monim.protos.config import DEFAULT_ADMIT_BELOW
from monim.protos.errors import AlreadyExists, NamespaceNotFound
from monim.protos.results import AddResult, RetrieveResult


class LocalMemory:
    def __init__(self, device: str = "cpu"):
        self.device = device
        self.stores: dict[str, NeighborStore] = {}
        self._lock = threading.Lock()

    def _store(self, namespace: str) -> NeighborStore:
        validate_namespace_name(namespace)
        store = self.stores.get(namespace)
        if store is None:
            raise NamespaceNotFound(namespace)
        return store

    def create_namespace(self, config: NamespaceConfig) -> NamespaceConfig:
        with self._lock:
            if config.name in self.stores:
                raise AlreadyExists(f"namespace {config.name!r} already exists")
            self.stores[config.name] = NeighborStore(config, device=self.device)
        return config

    def list_namespaces(self) -> list[NamespaceConfig]:
        return [self.stores[name].config for name in sorted(self.stores)]

    def describe_namespace(self, namespace: str) -> dict:
        store = self._store(namespace)
        stats = dict(store.stats(), shard=0)
        return {"config": store.config, "rows": len(store), "shards": [stats], "next_id": store.next_id}

    def drop_namespace(self, namespace: str) -> int:
        store = self._store(namespace)
        with self._lock:
            self.stores.pop(namespace, None)
        return len(store)

    def add(self, namespace, keys, tokens, values=None, weights=None, source="", logp=None,
            admit_below=DEFAULT_ADMIT_BELOW, merge_eps=0.0) -> AddResult:
        return self._store(namespace).add_admitted(keys, tokens, values, weights, source, logp, admit_below, merge_eps)

    def search(self, namespace, queries, k, return_keys=False, return_values=False,
               return_weights=False) -> SearchResult:
        return self._store(namespace).search(queries, k, return_keys, return_values, return_weights)

    def get(self, namespace, ids, return_optimizer_state=False) -> Rows:
        return self._store(namespace).get(ids, return_optimizer_state)

    def delete(self, namespace, ids=None, source=None) -> int:
        return self._store(namespace).delete(ids=ids, source=source)

    def retrieve(self, namespace, queries, k, temperature) -> RetrieveResult:
        return self._store(namespace).retrieve(queries, k, temperature)

    def retrieve_backward(self, namespace, queries, ids, alpha, distances, grad_memory, temperature):
        return self._store(namespace).retrieve_backward(queries, ids, alpha, distances, grad_memory, temperature)

    def apply_gradients(self, namespace, ids, grads) -> int:
        return self._store(namespace).apply_gradients(ids, grads)
