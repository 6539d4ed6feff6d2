"""NeighborStore: one process's neighbour store (no Ray, no gRPC).

It holds the entries of one namespace (or of one shard of it) on one device
and answers exact k-NN search over them. Every public method validates its
whole input before it changes anything, and takes the store's lock, so a
store shared by threads never shows a half-written batch.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from monim.datastore import admission, flat_index, memory_ops, optimizers
from monim.datastore.row_store import RowStore
from monim.protos import validation
from monim.protos.config import NamespaceConfig
from monim.protos.errors import AlreadyExists, IdsNotFound, InvalidArgument
from monim.protos.results import MISSING_ID, AddResult, RetrieveResult, Rows, SearchResult

BACKENDS = ("auto", "faiss", "torch")


def _torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16}[name]


class NeighborStore:
    """Exact k-NN store of (id, key, token, value, weight, source) entries.

    config: the namespace's NamespaceConfig.
    device: "cpu" or a CUDA device; all columns live there.
    backend: "faiss" (CPU only), "torch", or "auto" (torch on CUDA, faiss on CPU).
    id_stride, id_offset: the ids this store will mostly hold (a shard holds
        offset, offset + stride, ...), for fast id lookups; any id works.
    """

    def __init__(self, config: NamespaceConfig, device: str | torch.device = "cpu", backend: str = "auto",
                 id_stride: int = 1, id_offset: int = 0):
        if backend not in BACKENDS:
            raise InvalidArgument(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.config = config
        self.device = torch.device(device)
        if backend == "auto":
            backend = "torch" if self.device.type == "cuda" else "faiss"
        if backend == "faiss" and self.device.type != "cpu":
            raise InvalidArgument("the faiss backend needs a CPU store; use backend='torch' on CUDA")
        self.backend = backend
        # faiss reads the key buffer directly, so CPU keys stay float32.
        key_dtype = _torch_dtype(config.key_dtype) if self.device.type == "cuda" else torch.float32
        self.rows = RowStore(config.dim, config.value_dim, self.device, key_dtype,
                             state_columns=config.optimizer.state_columns() if config.value_dim else {},
                             id_stride=id_stride, id_offset=id_offset)
        self.next_id = 0
        self.optimizer_step = 0
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return self.rows.size

    # ----- writes ------------------------------------------------------------
    def add(self, keys: np.ndarray, tokens: np.ndarray, values: np.ndarray | None = None,
            weights: np.ndarray | None = None, source: str = "", ids: np.ndarray | None = None) -> np.ndarray:
        """Stores N entries; returns their ids, int64 [N].

        keys: float32/float16 [N, dim]; tokens: int32/int64 [N];
        values: float32 [N, value_dim] (zeros when None); weights: float32 [N]
        (ones when None); source: a tag for the whole batch; ids: int64 [N]
        chosen by the caller (the router), else the store numbers entries
        from its own counter.
        """
        keys = validation.check_vectors(keys, self.config.dim, "keys")
        n = keys.shape[0]
        tokens = validation.check_tokens(tokens, n)
        if values is not None:
            values = validation.check_values(values, n, self.config.value_dim)
        weights = np.ones(n, np.float32) if weights is None else validation.check_weights(weights, n)
        source = validation.check_source(source)
        with self._lock:
            if ids is None:
                ids = np.arange(self.next_id, self.next_id + n, dtype=np.int64)
            else:
                ids = validation.check_ids(ids)
                if ids.shape[0] != n:
                    raise InvalidArgument(f"keys and ids have different lengths: {n} keys, {ids.shape[0]} ids")
                if np.unique(ids).size != n or (ids < 0).any():
                    raise InvalidArgument("ids must be distinct and non-negative")
                present = ids[self.rows.rows_of(ids) >= 0]
                if present.size:
                    raise AlreadyExists(f"ids already stored: {present[:10].tolist()}")
            self.rows.append(ids, keys, tokens, values, weights, source)
            self.next_id = max(self.next_id, int(ids.max()) + 1)
        return ids

    def delete(self, ids: np.ndarray | None = None, source: str | None = None) -> int:
        """Deletes entries by id (unknown ids are ignored) or by source tag; returns how many went."""
        if (ids is None) == (source is None):
            raise InvalidArgument("delete needs either ids or a source tag, not both")
        if ids is not None:
            ids = validation.check_ids(ids)
        with self._lock:
            if ids is not None:
                rows = self.rows.rows_of(ids)
                rows = rows[rows >= 0]
            else:
                rows = self.rows.rows_with_source(validation.check_source(source))
            return self.rows.remove_rows(rows)

    # ----- reads -------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, return_keys: bool = False, return_values: bool = False,
               return_weights: bool = False) -> SearchResult:
        """Exact top-k of queries float32/float16 [B, dim]; see SearchResult for the shapes."""
        queries = validation.check_vectors(queries, self.config.dim, "queries")
        k = validation.check_k(k, self.config.max_k)
        if return_values and not self.config.value_dim:
            raise InvalidArgument("values were asked for but the namespace has value_dim 0")
        with self._lock:
            distances, rows = self._nearest_rows(queries, k)
            return self._gather(rows, distances, return_keys, return_values, return_weights)

    def _nearest_rows(self, queries: np.ndarray, k: int):
        stored = self.rows.size
        if self.backend == "faiss":
            return flat_index.faiss_search(queries, self.rows.keys[:stored].numpy(), k, self.config.metric)
        q = torch.from_numpy(queries).to(self.device)
        return flat_index.torch_search(q, self.rows.keys[:stored], self.rows.key_norms[:stored], k,
                                       self.config.metric)

    def _gather(self, rows: np.ndarray, distances: np.ndarray, return_keys: bool, return_values: bool,
                return_weights: bool) -> SearchResult:
        found = rows >= 0
        safe = torch.from_numpy(np.where(found, rows, 0)).to(self.device)
        mask = torch.from_numpy(found).to(self.device)

        def column(tensor, fill):
            picked = tensor[safe]
            shape = mask.shape + (1,) * (picked.dim() - mask.dim())
            return torch.where(mask.view(shape), picked, torch.as_tensor(fill, dtype=picked.dtype,
                                                                         device=picked.device)).cpu().numpy()

        if self.rows.size == 0:
            empty = np.zeros(rows.shape, np.int64)
            ids, tokens = empty - 1, empty.astype(np.int32) - 1
            keys = np.zeros(rows.shape + (self.config.dim,), np.float32) if return_keys else None
            values = np.zeros(rows.shape + (self.config.value_dim,), np.float32) if return_values else None
            weights = np.zeros(rows.shape, np.float32) if return_weights else None
            return SearchResult(ids, distances, tokens, keys, values, weights)
        return SearchResult(
            ids=column(self.rows.ids, MISSING_ID),
            distances=distances,
            tokens=column(self.rows.tokens, -1),
            keys=column(self.rows.keys, 0).astype(np.float32, copy=False) if return_keys else None,
            values=column(self.rows.values, 0) if return_values else None,
            weights=column(self.rows.weights, 0) if return_weights else None,
        )

    def _rows_of_stored(self, ids: np.ndarray) -> np.ndarray:
        """Rows of ids that must all be stored; NOT_FOUND naming the ones that are not."""
        rows = self.rows.rows_of(ids)
        if (rows < 0).any():
            raise IdsNotFound(self.config.name, ids[rows < 0])
        return rows

    def get(self, ids: np.ndarray, return_optimizer_state: bool = False) -> Rows:
        """Entries by id, in the order asked; NOT_FOUND (naming them) if any id is not stored."""
        ids = validation.check_ids(ids)
        with self._lock:
            index = torch.from_numpy(self._rows_of_stored(ids)).to(self.device)
            sources = self.rows.sources
            state = None
            if return_optimizer_state:
                state = {name: getattr(self.rows, name)[index].cpu().numpy() for name in self.rows.state_columns}
                state["step"] = np.array([self.optimizer_step], np.int64)
            return Rows(
                ids=ids.copy(),
                keys=self.rows.keys[index].float().cpu().numpy(),
                tokens=self.rows.tokens[index].cpu().numpy(),
                values=self.rows.values[index].cpu().numpy() if self.config.value_dim else None,
                weights=self.rows.weights[index].cpu().numpy(),
                sources=[sources[c] for c in self.rows.source_codes[index].tolist()],
                optimizer_state=state,
            )

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """bool [N]: which ids are stored."""
        with self._lock:
            return self.rows.rows_of(validation.check_ids(ids)) >= 0

    def stats(self) -> dict:
        return {"rows": self.rows.size, "device": str(self.device), "backend": self.backend,
                "next_id": self.next_id, "optimizer_step": self.optimizer_step}

    # ----- admission -------------------------------------------------------------
    def add_admitted(self, keys, tokens, values=None, weights=None, source: str = "", logp=None,
                     admit_below: float = admission.DEFAULT_ADMIT_BELOW, merge_eps: float = 0.0) -> AddResult:
        """Add with SeMem admission (log p < admit_below) and optional merge of near-duplicates.

        logp: float32 [N] log-probabilities of the tokens, or None (admit all).
        merge_eps: > 0 merges a row into an existing entry with the same token
        closer than this (its weight grows by 1). See datastore/admission.py.
        """
        keys = validation.check_vectors(keys, self.config.dim, "keys")
        n = keys.shape[0]
        tokens = validation.check_tokens(tokens, n)
        logp, admit_below, merge_eps = validation.check_admission(logp, admit_below, merge_eps, n)
        if values is not None:
            values = validation.check_values(values, n, self.config.value_dim)
        if weights is not None:
            weights = validation.check_weights(weights, n)
        source = validation.check_source(source)
        admitted = np.ones(n, bool) if logp is None else admission.admitted_mask(logp, admit_below)
        ids = np.full(n, MISSING_ID, np.int64)
        merged = np.zeros(n, bool)
        with self._lock:
            chosen = np.flatnonzero(admitted)
            if chosen.size and merge_eps > 0 and len(self):
                k = min(admission.MERGE_CANDIDATES, self.config.max_k)
                neighbours = self.search(keys[chosen], k)
                targets = admission.merge_targets(neighbours, tokens[chosen], merge_eps)
                self.increment_weights(*admission.weight_increments(targets))
                merged[chosen[targets >= 0]] = True
                ids[chosen[targets >= 0]] = targets[targets >= 0]
                chosen = chosen[targets < 0]
            if chosen.size:
                ids[chosen] = self.add(keys[chosen], tokens[chosen], None if values is None else values[chosen],
                                       None if weights is None else weights[chosen], source)
        return AddResult(ids=ids, admitted=admitted, merged=merged)

    def increment_weights(self, ids: np.ndarray, counts: np.ndarray) -> None:
        """weights[ids] += counts (ids distinct and stored)."""
        if ids.size == 0:
            return
        with self._lock:
            index = torch.from_numpy(self._rows_of_stored(ids)).to(self.device)
            self.rows.weights[index] += torch.from_numpy(counts.astype(np.float32)).to(self.device)

    # ----- learnable memory ---------------------------------------------------------
    def _slot_rows(self, ids: np.ndarray) -> torch.Tensor:
        """int64 [B, k] ids -> rows on the device, -1 where the id is not held here."""
        return torch.from_numpy(self.rows.rows_of(ids)).to(self.device)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device)

    def value_sum(self, ids: np.ndarray, alpha: np.ndarray) -> np.ndarray:
        """float32 [B, value_dim]: sum_i alpha_i v_i over the slots whose ids this store holds."""
        with self._lock:
            return memory_ops.value_sum(self.rows.values[: self.rows.size], self._slot_rows(ids),
                                        self._tensor(alpha)).cpu().numpy()

    def backward_partials(self, queries, ids, alpha, distances, grad_memory) -> memory_ops.BackwardPartials:
        """This store's part of a Retrieve backward (inputs already checked); then one optimizer step
        on the value rows it holds (a step is taken even when it holds none, to keep step counts equal)."""
        with self._lock:
            partials, rows, grads = memory_ops.slot_partials(
                self.rows.keys[: self.rows.size], self.rows.values[: self.rows.size], self._slot_rows(ids),
                self._tensor(alpha), self._tensor(distances), self._tensor(grad_memory))
            self._optimizer_step(rows, grads)
            return partials

    def _optimizer_step(self, rows: torch.Tensor, grads: torch.Tensor) -> None:
        """rows int64 [U] unique, grads float32 [U, value_dim]: clip, then one optimizer step."""
        self.optimizer_step += 1
        if rows.numel() == 0:
            return
        config = self.config.optimizer
        state = {name: getattr(self.rows, name) for name in self.rows.state_columns}
        optimizers.apply_step(config, self.optimizer_step, rows, optimizers.clip_rows(grads, config.max_grad_norm),
                              self.rows.values, state)

    def apply_gradients(self, ids: np.ndarray, grads: np.ndarray, allow_empty: bool = False) -> int:
        """One optimizer step with value gradients grads float32 [N, value_dim] for ids int64 [N]
        (repeated ids are summed). NOT_FOUND, changing nothing, if any id is not stored.
        Returns the number of distinct rows updated."""
        if allow_empty and ids.size == 0:
            with self._lock:
                self._optimizer_step(torch.empty(0, dtype=torch.int64), torch.empty(0, self.config.value_dim))
            return 0
        ids, grads = validation.check_gradients(ids, grads, self.config.value_dim)
        with self._lock:
            rows = self._tensor(self._rows_of_stored(ids))
            unique, summed = optimizers.coalesce(rows, self._tensor(grads))
            self._optimizer_step(unique, summed)
            return int(unique.numel())

    def retrieve(self, queries, k: int, temperature: float = 1.0) -> RetrieveResult:
        """Search + attention + value sum in this one store (the router splits this across shards)."""
        validation.check_value_namespace(self.config.value_dim, "Retrieve")
        temperature = validation.check_temperature(temperature)
        with self._lock:
            found = self.search(queries, k, return_weights=True)
            alpha = memory_ops.attention(found.distances, found.weights, found.ids, temperature)
            memory = self.value_sum(found.ids, alpha)
        return RetrieveResult(memory=memory, ids=found.ids, alpha=alpha, distances=found.distances,
                              tokens=found.tokens, weights=found.weights,
                              queries=validation.check_vectors(queries, self.config.dim, "queries"),
                              temperature=temperature)

    def retrieve_backward(self, queries, ids, alpha, distances, grad_memory, temperature: float):
        """Backward of ``retrieve`` in this one store: (grad_queries float32 [B, dim], grad_temperature);
        the value rows take one optimizer step. NOT_FOUND, changing nothing, if an id is gone."""
        queries, ids, alpha, distances, grad_memory, temperature = validation.check_backward_request(
            self.config, queries, ids, alpha, distances, grad_memory, temperature)
        with self._lock:
            self._rows_of_stored(ids[ids >= 0])
            partials = self.backward_partials(queries, ids, alpha, distances, grad_memory)
        return memory_ops.combine_backward(partials, queries, alpha, self.config.metric, temperature)
