"""Router: one front end's view of the deployment; scatters requests to shards and gathers.

Placement: entry ``id`` lives on shard ``id % num_shards``. Ids come from the
registry in blocks, so an Add's rows spread evenly over the shards.
The router validates a whole request against the namespace's config before
any shard sees it, so a bad request changes nothing anywhere.
"""

from __future__ import annotations

import numpy as np
from monim.datastore import admission, memory_ops
from monim.protos import validation
from monim.protos.config import NamespaceConfig, validate_namespace_name
from monim.protos.errors import IdsNotFound, InvalidArgument, MemoryStoreError, NamespaceNotFound
from monim.protos.results import MISSING_ID, AddResult, RetrieveResult, Rows, SearchResult
from monim.workers.merge import merge_topk

DEFAULT_TIMEOUT_S = 120.0


class Router:
    """runtime: a RayRuntime or LocalRuntime (see workers/runtime.py)."""

    def __init__(self, runtime, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.runtime = runtime
        self.num_shards = runtime.num_shards
        self.timeout_s = timeout_s
        self._configs: dict[str, NamespaceConfig] = {}

    def _all_shards(self, method: str, *args) -> list:
        return self._call([(s, method, args) for s in range(self.num_shards)])

    def _call(self, calls) -> list:
        """Scatter/gather; a namespace another front end dropped leaves this one's cache too."""
        try:
            return self.runtime.call_shards(calls, self.timeout_s)
        except NamespaceNotFound as error:
            self._configs.pop(error.namespace, None)
            raise

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
            weights: np.ndarray | None = None, source: str = "", logp: np.ndarray | None = None,
            admit_below: float = admission.DEFAULT_ADMIT_BELOW, merge_eps: float = 0.0) -> AddResult:
        """Stages: validate the batch; keep the admitted rows (logp < admit_below); with merge_eps,
        search all shards for same-token near-duplicates and grow their weights; allocate an id
        block for the rest; route rows by id % S; add on the shards.
        Returns AddResult (ids int64 [N] in row order, -1 where not admitted)."""
        config = self.config(namespace)
        keys = validation.check_vectors(keys, config.dim, "keys")
        n = keys.shape[0]
        tokens = validation.check_tokens(tokens, n)
        if values is not None:
            values = validation.check_values(values, n, config.value_dim)
        if weights is not None:
            weights = validation.check_weights(weights, n)
        source = validation.check_source(source)
        logp, admit_below, merge_eps = validation.check_admission(logp, admit_below, merge_eps, n)
        admitted = np.ones(n, bool) if logp is None else admission.admitted_mask(logp, admit_below)
        ids = np.full(n, MISSING_ID, np.int64)
        merged = np.zeros(n, bool)
        chosen = np.flatnonzero(admitted)
        if chosen.size and merge_eps > 0:
            neighbours = self.search(namespace, keys[chosen], min(admission.MERGE_CANDIDATES, config.max_k))
            targets = admission.merge_targets(neighbours, tokens[chosen], merge_eps)
            target_ids, counts = admission.weight_increments(targets)
            self._call([(shard, "increment_weights", (namespace, target_ids[positions], counts[positions]))
                        for shard, positions in self._route_ids(target_ids)])
            merged[chosen[targets >= 0]] = True
            ids[chosen[targets >= 0]] = targets[targets >= 0]
            chosen = chosen[targets < 0]
        if chosen.size:
            ids[chosen] = self._add_rows(namespace, keys[chosen], tokens[chosen],
                                         None if values is None else values[chosen],
                                         None if weights is None else weights[chosen], source)
        return AddResult(ids=ids, admitted=admitted, merged=merged)

    def _add_rows(self, namespace, keys, tokens, values, weights, source) -> np.ndarray:
        n = keys.shape[0]
        start = self.runtime.call_registry("allocate_ids", namespace, n)
        ids = np.arange(start, start + n, dtype=np.int64)
        calls = []
        for shard, rows in self._route_ids(ids):
            calls.append((shard, "add", (namespace, ids[rows], keys[rows], tokens[rows],
                                         None if values is None else values[rows],
                                         None if weights is None else weights[rows], source)))
        self._call(calls)
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

    # ----- learnable memory ----------------------------------------------------------
    def retrieve(self, namespace: str, queries: np.ndarray, k: int, temperature: float = 1.0) -> RetrieveResult:
        """The MoNIM forward, exact across shards. Stages: validate; every shard searches its top-k
        (ids, distances, weights); merge to the global top-k; alpha = softmax(-d/T + log w) here;
        every shard sums alpha_i v_i over its own ids; add the partial sums."""
        config = self.config(namespace)
        validation.check_value_namespace(config.value_dim, "Retrieve")
        temperature = validation.check_temperature(temperature)
        queries = validation.check_vectors(queries, config.dim, "queries")
        found = self.search(namespace, queries, k, return_weights=True)
        alpha = memory_ops.attention(found.distances, found.weights, found.ids, temperature)
        memory = sum(self._all_shards("value_sum", namespace, found.ids, alpha))
        return RetrieveResult(memory=memory, ids=found.ids, alpha=alpha, distances=found.distances,
                              tokens=found.tokens, weights=found.weights, queries=queries, temperature=temperature)

    def _require_stored(self, namespace: str, ids: np.ndarray, empty_slots: bool = False) -> None:
        """NOT_FOUND naming every id that no shard stores (with empty_slots, id -1 marks an empty
        top-k slot and is skipped); a read-only round that makes the following write
        all-or-nothing across shards."""
        ids = np.unique(ids[ids != MISSING_ID] if empty_slots else ids)
        missing = [ids[ids < 0]]
        ids = ids[ids >= 0]
        if ids.size:
            missing += self._call([(shard, "missing_ids", (namespace, ids[positions]))
                                   for shard, positions in self._route_ids(ids)])
        missing = np.concatenate(missing)
        if missing.size:
            raise IdsNotFound(namespace, missing)

    def retrieve_backward(self, namespace: str, queries, ids, alpha, distances, grad_memory,
                          temperature: float) -> tuple[np.ndarray, float]:
        """The MoNIM backward. Stages: validate; check every id is still stored; every shard computes
        its partial sums (before its values change) and takes the optimizer step on its rows;
        add the partials and finish dL/dq and dL/dT here.
        Returns (grad_queries float32 [B, dim], grad_temperature)."""
        config = self.config(namespace)
        queries, ids, alpha, distances, grad_memory, temperature = validation.check_backward_request(
            config, queries, ids, alpha, distances, grad_memory, temperature)
        self._require_stored(namespace, ids, empty_slots=True)
        partials = self._all_shards("backward_partials", namespace, queries, ids, alpha, distances, grad_memory)
        total = partials[0]
        for part in partials[1:]:
            total = total + part
        return memory_ops.combine_backward(total, queries, alpha, config.metric, temperature)

    def apply_gradients(self, namespace: str, ids, grads) -> int:
        """One optimizer step with value gradients grads [N, value_dim] for ids [N]. Stages: validate;
        check every id is stored; every shard steps (on its own ids, possibly none). Returns rows updated."""
        config = self.config(namespace)
        ids, grads = validation.check_gradients(ids, grads, config.value_dim)
        self._require_stored(namespace, ids)
        owner = ids % self.num_shards
        calls = [(shard, "apply_gradients", (namespace, ids[owner == shard], grads[owner == shard]))
                 for shard in range(self.num_shards)]
        return sum(self._call(calls))

    def _route_ids(self, ids: np.ndarray):
        """Yields (shard, positions in ids) for the shards that own some of the ids."""
        owner = ids % self.num_shards
        for shard in range(self.num_shards):
            positions = np.flatnonzero(owner == shard)
            if positions.size:
                yield shard, positions

    def get(self, namespace: str, ids: np.ndarray, return_optimizer_state: bool = False) -> Rows:
        """Stages: route ids to their shards; fetch; NOT_FOUND naming every missing id; reassemble in order."""
        config = self.config(namespace)
        ids = validation.check_ids(ids)
        routes = list(self._route_ids(ids))
        answers = self._call([(shard, "get_present", (namespace, ids[positions], return_optimizer_state))
                              for shard, positions in routes])
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
        if return_optimizer_state:
            out.optimizer_state = self._gather_state(routes, answers, n, config.value_dim)
        return out

    @staticmethod
    def _gather_state(routes, answers, n: int, value_dim: int) -> dict:
        state = {}
        for (_, positions), (rows, _) in zip(routes, answers):
            for name, array in rows.optimizer_state.items():
                if name == "step":
                    state["step"] = array
                    continue
                state.setdefault(name, np.empty((n, value_dim), np.float32))[positions] = array
        return state

    def delete(self, namespace: str, ids: np.ndarray | None = None, source: str | None = None) -> int:
        """Deletes by ids (routed to their shards; unknown ids ignored) or by source (every shard)."""
        self.config(namespace)
        if (ids is None) == (source is None):
            raise InvalidArgument("delete needs either ids or a source tag, not both")
        if source is not None:
            return sum(self._all_shards("delete", namespace, None, validation.check_source(source)))
        ids = validation.check_ids(ids)
        ids = ids[ids >= 0]
        calls = [(shard, "delete", (namespace, ids[positions], None)) for shard, positions in self._route_ids(ids)]
        return sum(self._call(calls)) if calls else 0
