"""Router: one front end's view of the deployment; scatters requests to shards and gathers.

Placement: entry ``id`` lives on shard ``id % num_shards``. Ids come from the
registry in blocks, so an Add's rows spread evenly over the shards.
The router validates a whole request against the namespace's config before
any shard sees it, so a bad request changes nothing anywhere.
"""

from __future__ import annotations

import numpy as np

from datastore import NamespaceConfig, Rows, SearchResult, validate_namespace_name, validation
from datastore.errors import IdsNotFound, InvalidArgument, MemoryStoreError
from workers.merge import merge_topk

DEFAULT_TIMEOUT_S = 120.0


class Router:
    """runtime: a RayRuntime or LocalRuntime (see workers/runtime.py)."""

    def __init__(self, runtime, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.runtime = runtime
        self.num_shards = runtime.num_shards
        self.timeout_s = timeout_s
        self._configs: dict[str, NamespaceConfig] = {}

    def _all_shards(self, method: str, *args) -> list:
        return self.runtime.call_shards([(s, method, args) for s in range(self.num_shards)], self.timeout_s)

    def config(self, namespace: str) -> NamespaceConfig:
        """The namespace's config, from this front end's cache or the registry."""
        validate_namespace_name(namespace)
        config = self._configs.get(namespace)
        if config is None:
            config = self._configs[namespace] = NamespaceConfig.from_dict(
                self.runtime.call_registry("config", namespace))
        return config

    # ----- namespaces ----------------------------------------------------------
    def create_namespace(self, config: NamespaceConfig) -> NamespaceConfig:
        """Stages: register (ALREADY_EXISTS if taken); create on every shard; on failure undo both."""
        self.runtime.call_registry("create", config.to_dict())
        try:
            self._all_shards("create_namespace", config.to_dict())
        except MemoryStoreError:
            self._all_shards("drop_namespace", config.name)
            self.runtime.call_registry("drop", config.name)
            raise
        self._configs[config.name] = config
        return config

    def list_namespaces(self) -> list[NamespaceConfig]:
        return [NamespaceConfig.from_dict(c) for c in self.runtime.call_registry("list")]

    def describe_namespace(self, namespace: str) -> dict:
        config = self.config(namespace)
        shards = self._all_shards("stats", namespace)
        return {
            "config": config,
            "rows": sum(s["rows"] for s in shards),
            "shards": shards,
            "next_id": self.runtime.call_registry("next_id", namespace),
        }

    def drop_namespace(self, namespace: str) -> int:
        """Stages: unregister (NOT_FOUND if absent); drop on every shard; returns rows dropped."""
        validate_namespace_name(namespace)
        self.runtime.call_registry("drop", namespace)
        self._configs.pop(namespace, None)
        return sum(self._all_shards("drop_namespace", namespace))

    # ----- data ------------------------------------------------------------------
    def add(self, namespace: str, keys: np.ndarray, tokens: np.ndarray, values: np.ndarray | None = None,
            weights: np.ndarray | None = None, source: str = "") -> np.ndarray:
        """Stages: validate the batch; allocate an id block; route rows by id % S; add on the shards.

        Returns int64 [N] ids in the order of the rows given.
        """
        config = self.config(namespace)
        keys = validation.check_vectors(keys, config.dim, "keys")
        n = keys.shape[0]
        tokens = validation.check_tokens(tokens, n)
        if values is not None:
            values = validation.check_values(values, n, config.value_dim)
        if weights is not None:
            weights = validation.check_weights(weights, n)
        source = validation.check_source(source)
        start = self.runtime.call_registry("allocate_ids", namespace, n)
        ids = np.arange(start, start + n, dtype=np.int64)
        calls = []
        for shard in range(self.num_shards):
            rows = np.flatnonzero(ids % self.num_shards == shard)
            if rows.size:
                calls.append((shard, "add", (
                    namespace, ids[rows], keys[rows], tokens[rows],
                    None if values is None else values[rows],
                    None if weights is None else weights[rows], source)))
        self.runtime.call_shards(calls, self.timeout_s)
        return ids

    def search(self, namespace: str, queries: np.ndarray, k: int, return_keys: bool = False,
               return_values: bool = False, return_weights: bool = False) -> SearchResult:
        """Stages: validate; send the queries to every shard at once; merge the per-shard top-k."""
        config = self.config(namespace)
        queries = validation.check_vectors(queries, config.dim, "queries")
        k = validation.check_k(k, config.max_k)
        if return_values and not config.value_dim:
            raise InvalidArgument("values were asked for but the namespace has value_dim 0")
        results = self._all_shards("search", namespace, queries, k, return_keys, return_values, return_weights)
        return merge_topk(results, k)

    def _route_ids(self, ids: np.ndarray):
        """Yields (shard, positions in ids) for the shards that own some of the ids."""
        owner = ids % self.num_shards
        for shard in range(self.num_shards):
            positions = np.flatnonzero(owner == shard)
            if positions.size:
                yield shard, positions

    def get(self, namespace: str, ids: np.ndarray) -> Rows:
        """Stages: route ids to their shards; fetch; NOT_FOUND naming every missing id; reassemble in order."""
        config = self.config(namespace)
        ids = validation.check_ids(ids)
        routes = list(self._route_ids(ids))
        answers = self.runtime.call_shards(
            [(shard, "get_present", (namespace, ids[positions])) for shard, positions in routes], self.timeout_s)
        missing = np.concatenate([m for _, m in answers] + [ids[ids < 0]])
        if missing.size:
            raise IdsNotFound(namespace, np.unique(missing))
        n = ids.shape[0]
        out = Rows(ids=ids.copy(), keys=np.empty((n, config.dim), np.float32), tokens=np.empty(n, np.int32),
                   values=np.empty((n, config.value_dim), np.float32) if config.value_dim else None,
                   weights=np.empty(n, np.float32), sources=[""] * n)
        for (_, positions), (rows, _) in zip(routes, answers):
            out.keys[positions] = rows.keys
            out.tokens[positions] = rows.tokens
            out.weights[positions] = rows.weights
            if out.values is not None:
                out.values[positions] = rows.values
            for position, source in zip(positions.tolist(), rows.sources):
                out.sources[position] = source
        return out

    def delete(self, namespace: str, ids: np.ndarray | None = None, source: str | None = None) -> int:
        """Deletes by ids (routed to their shards; unknown ids ignored) or by source (every shard)."""
        self.config(namespace)
        if (ids is None) == (source is None):
            raise InvalidArgument("delete needs either ids or a source tag, not both")
        if source is not None:
            return sum(self._all_shards("delete", namespace, None, validation.check_source(source)))
        ids = validation.check_ids(ids)
        calls = [(shard, "delete", (namespace, ids[positions], None))
                 for shard, positions in self._route_ids(ids[ids >= 0])]
        return sum(self.runtime.call_shards(calls, self.timeout_s)) if calls else 0
