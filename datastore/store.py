"""NeighborStore: one process's neighbour store (no Ray, no gRPC).

It holds the entries of one namespace (or of one shard of it) on one device
and answers exact k-NN search over them. Every public method validates its
whole input before it changes anything, and takes the store's lock, so a
store shared by threads never shows a half-written batch.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import weakref

import numpy as np
import torch
from monim.datastore import flat_index, memory_ops, optimizers
from monim.datastore.background_index import ID_BITS, ID_MASK
from monim.datastore.hnsw_index import HnswIndex
from monim.datastore.ivf_index import IvfIndex
from monim.datastore.row_store import RowStore
from monim.datastore.search_graphs import SearchGraphs
from monim.datastore.transfer import to_device, to_host, to_host_all, to_host_later
from monim.protos import validation
from monim.protos.config import NamespaceConfig
from monim.protos.errors import AlreadyExists, IdsNotFound, InvalidArgument
from monim.protos.results import MISSING_ID, Rows, SearchResult

BACKENDS = ("auto", "faiss", "torch")


@dataclasses.dataclass(frozen=True)
class HeldRows:
    """The rows a backward's value gradients are for, as the store held them: int64 [U] on its device,
    sorted and distinct (memory_ops.slot_partials' unique rows), valid in the same RowStore (not one a
    restore made since: weakly held, never kept alive) while its removals are ``removals`` (no row
    deleted since). A step of exactly those gradients takes them as they are: no lookup of the ids
    through the id map, no sort to sum repeated ones (a training step at B=4096, k=1024 touches about
    a million rows)."""

    rows: torch.Tensor
    row_store: weakref.ref
    removals: int

    def valid_in(self, row_store: RowStore) -> bool:
        return self.row_store() is row_store and self.removals == row_store.removals


class KeptRows:
    """The rows of a few recent searches' answers, by the name the search was given (a training step's
    forward keeps them for its value sums and its backward: B x k ids at B=4096, k=1024 are 32 MB to
    copy to the device and look up each time). An answer's rows are those of its ids while no row has
    been deleted since (RowStore.removals). At most MAX_ENTRIES answers and MAX_BYTES, oldest out."""

    MAX_ENTRIES = 8
    MAX_BYTES = 256 << 20

    def __init__(self):
        # name -> (RowStore.removals when kept, {"rows", ...: tensors}, their bytes)
        self._answers: collections.OrderedDict[str, tuple[int, dict, int]] = collections.OrderedDict()
        self.bytes = 0

    def put(self, name: str, rows: torch.Tensor, removals: int, **more: torch.Tensor) -> None:
        """Keeps rows int64 [B, k] (and more [B, k] tensors of the same answer: alpha, distances)."""
        answer = {"rows": rows, **more}
        nbytes = sum(t.nbytes for t in answer.values())
        if nbytes > self.MAX_BYTES:
            return
        self._drop(name)
        while self._answers and (len(self._answers) >= self.MAX_ENTRIES or self.bytes + nbytes > self.MAX_BYTES):
            self._drop(next(iter(self._answers)))
        self._answers[name] = (removals, answer, nbytes)
        self.bytes += nbytes

    def get(self, name: str, removals: int) -> dict | None:
        """{"rows": ..., and what else was kept} under name, if no row was deleted since (else dropped: None)."""
        kept = self._answers.get(name)
        if kept is None:
            return None
        if kept[0] != removals:
            self._drop(name)
            return None
        return kept[1]

    def _drop(self, name: str) -> None:
        kept = self._answers.pop(name, None)
        if kept is not None:
            self.bytes -= kept[2]

    def clear(self) -> None:
        self._answers.clear()
        self.bytes = 0


# The approximate index of each index kind but flat (exact), by the namespace's ``index``.
_APPROXIMATE = {"ivf_flat": IvfIndex, "ivf_pq": IvfIndex, "hnsw": HnswIndex}


class NeighborStore:
    """k-NN store of (id, key, token, value, weight, source) entries: exact (index flat), or
    exact until its index is built and then approximate (ivf_flat, ivf_pq: datastore/ivf_index.py;
    hnsw: datastore/hnsw_index.py).

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
        key_dtype = torch.float16 if self.device.type == "cuda" and config.key_dtype in ("auto", "float16") \
            else torch.float32
        self.rows = RowStore(config.dim, config.value_dim, self.device, key_dtype,
                             state_columns=config.optimizer.state_columns() if config.value_dim else {},
                             id_stride=id_stride, id_offset=id_offset)
        self.next_id = 0
        self.id_stride, self.id_offset = id_stride, id_offset
        self._lock = threading.RLock()
        # The approximate index of an ivf or hnsw namespace (None for flat); it shares the store's lock.
        self.approximate = _APPROXIMATE[config.index](config, self.rows, self._lock) \
            if config.index in _APPROXIMATE else None
        self.kept_rows = KeptRows()
        # A flat GPU store's small searches, captured as CUDA graphs once a shape repeats.
        self.graphs = SearchGraphs(self.rows, self._device_answer, self._device_forward) \
            if self.device.type == "cuda" and self.approximate is None else None

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
                if self.approximate is not None and int(ids.max()) > ID_MASK:
                    raise InvalidArgument(f"ids of a namespace with index {self.config.index} must be below 2^{ID_BITS}, "
                                          f"got {int(ids.max())}")
            self.rows.append(ids, keys, tokens, values, weights, source)
            self.next_id = max(self.next_id, int(ids.max()) + 1)
            if self.approximate is not None:
                self.approximate.after_add(ids, self._as_stored(keys))
        return ids

    def _as_stored(self, keys: np.ndarray) -> np.ndarray:
        """keys float32 [N, dim] (C-contiguous) as the row store holds them (rounded to float16 on a
        float16 store): what an index is given, so that it answers the distances a build (which
        reads the stored keys) would."""
        if self.rows.key_dtype == torch.float16:
            keys = np.asarray(keys).astype(np.float16)
        return np.ascontiguousarray(keys, dtype=np.float32)

    def delete(self, ids: np.ndarray | None = None, source: str | None = None) -> int:
        """Deletes entries by id (unknown ids are ignored) or by source tag; returns how many went."""
        return int(self.remove(ids, source).size)

    def remove(self, ids: np.ndarray | None = None, source: str | None = None) -> np.ndarray:
        """delete, answering the ids of the entries that went (int64; a shard remembers them for the
        request's retries: workers/shard.py _deleted_ids)."""
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
            removed = self.rows.remove_rows(rows)
            if self.approximate is not None and removed.size:
                self.approximate.after_delete(removed)
            return removed

    # ----- reads -------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, return_keys: bool = False, return_values: bool = False,
               return_weights: bool = False, nprobe: int = 0, rerank: int = 0,
               hidden: np.ndarray | None = None, keep_rows: str = "", ef: int = 0) -> SearchResult:
        """Top-k of queries float32/float16 [B, dim]; see SearchResult for the shapes. Exact on a flat
        namespace and on an ivf or hnsw one until its index is built; then by the index: ivf probing
        nprobe lists (0: min(32, nlist)), with rerank > 0 candidates ranked again by exact distance;
        hnsw with a beam of ef (0: max(64, k)) candidates.
        hidden: int64 ids left out of the answer (rows a reshard is copying here, which their old
        shard still answers for).
        keep_rows: a name under which the answer's rows stay on the store's device for a while, for
        value_sum and backward_partials over exactly this answer's ids (KeptRows): a training step's
        B x k ids then go to the device and through the id map once, not three times."""
        on_device = validation.is_tensor(queries)  # the device path: the answer as tensors there, not waited for
        queries, k, options = self._checked_search(queries, k, nprobe, rerank, ef)
        if return_values and not self.config.value_dim:
            raise InvalidArgument("values were asked for but the namespace has value_dim 0")
        columns = (return_keys, return_values, return_weights)
        with self._lock:
            held = 0 if hidden is None or not len(hidden) else int((self.rows.rows_of(hidden) >= 0).sum())
            if not held and self.graphs is not None:
                answer = self.graphs.search(queries, k, columns)
                if answer is not None:
                    return self._result(answer)
            distances, rows = self._search_rows(queries, k, options, hidden, held)
            if keep_rows:
                self.kept_rows.put(keep_rows, rows, self.rows.removals)
            return self._gather(rows, distances, *columns, on_device=on_device)

    def _checked_search(self, queries, k, nprobe: int, rerank: int, ef: int):
        """A search's queries, k and index options, checked (INVALID_ARGUMENT naming the bad one):
        (queries, k, {"nprobe", "rerank", "ef"} with the defaults filled in)."""
        if validation.is_tensor(queries):  # forward's device path: the queries stay where they are
            queries = validation.check_vector_tensor(queries.to(self.device), self.config.dim, "queries")
        else:
            queries = validation.check_vectors(queries, self.config.dim, "queries")
        k = validation.check_k(k, self.config.max_k)
        nprobe, rerank, ef = validation.check_search_options(self.config.index, self.config.nlist, k, nprobe, rerank, ef)
        return queries, k, {"nprobe": nprobe, "rerank": rerank, "ef": ef}

    def _search_rows(self, queries: np.ndarray, k: int, options: dict, hidden=None, held: int = 0):
        """(distances float32 [B, k], rows int64 tensor [B, k], -1 where none) of a search (under the
        lock): by the approximate index once built, else exact; held of the hidden ids left out."""
        found = None if self.approximate is None else self.approximate.search(_on_host(queries), k + held, **options)
        if found is None:
            distances, rows = self._nearest_rows(queries, k + held)
        else:
            distances, ids = found
            rows = np.where(ids >= 0, self.rows.rows_of(np.maximum(ids, 0)), -1)
        if held:
            distances, rows = self._leave_out(distances, rows, hidden, k)
        return distances, rows if isinstance(rows, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(rows))

    def forward(self, queries: np.ndarray, k: int, temperature: float, keep_rows: str = "", nprobe: int = 0,
                rerank: int = 0, ef: int = 0) -> tuple[SearchResult, np.ndarray, np.ndarray]:
        """A Retrieve's forward where this store holds every row (a deployment of one shard): the search
        (ids, distances, tokens, weights), alpha = softmax(-d/T + log w) and m = sum_i alpha_i v_i, all on
        the store's device, under one hold of the lock. Returns (SearchResult, alpha float32 [B, k],
        memory float32 [B, value_dim]). keep_rows: as search, with alpha and distances kept beside the
        rows for the backward (backward_partials' kept).
        queries a torch tensor (the in-process store's device path, docs/API.md "Tensors in and out"):
        every array of the answer is a tensor on the store's device, queued there, not waited for;
        nothing goes through the host but the finite check's one flag."""
        on_device = validation.is_tensor(queries)
        queries, k, options = self._checked_search(queries, k, nprobe, rerank, ef)
        temperature = validation.check_temperature(temperature)
        validation.check_value_namespace(self.config.value_dim, "Retrieve")
        with self._lock:
            answer = None
            if on_device and not keep_rows and self.graphs is not None:  # a decoding step's: one graph launch
                answer = self.graphs.forward(queries, k, temperature)
            if answer is None:
                later = {}  # the host path's search columns go to the host while alpha and m are computed
                answer = self._device_forward(queries, k, temperature, self._search_rows(queries, k, options),
                                              None if on_device else lambda columns: later.update(
                                                  host=to_host_later(columns)))
            if keep_rows:
                self.kept_rows.put(keep_rows, answer["rows"], self.rows.removals, alpha=answer["alpha"],
                                   distances=answer["distances"])
            if on_device:
                return SearchResult(**{name: answer[name] for name in ("ids", "distances", "tokens", "weights")}), \
                    answer["alpha"], answer["memory"]
            mine = to_host_all({"alpha": answer["alpha"], "memory": answer["memory"]})
            host = later["host"]()
        return self._result(host), mine["alpha"], mine["memory"]

    def _device_forward(self, queries: torch.Tensor, k: int, temperature, found=None, searched=None) -> dict:
        """forward's answer as tensors on the store's device, queued, never waited for (a forward's CUDA
        graph captures it: datastore/search_graphs.py): {ids, distances, tokens, weights, alpha [B, k],
        memory [B, value_dim], rows [B, k]}. temperature: a float, or a 0-d tensor on the device (the
        graph's input). found: the search's (distances, rows), if made already; searched(columns): called
        with the search's columns as soon as they are queued."""
        distances, rows = found if found is not None else self._torch_nearest(queries, k)
        rows = rows.to(self.device)
        columns = self._answer_columns(rows, torch.as_tensor(distances).to(self.device), False, False, True)
        if searched is not None:
            searched(columns)
        alpha = memory_ops.attention_tensor(columns["distances"], columns["weights"], rows >= 0, temperature)
        memory = memory_ops.value_sum(self.rows.values[: self.rows.size], rows, alpha)
        return {name: columns[name] for name in ("ids", "distances", "tokens", "weights")} | {
            "alpha": alpha, "memory": memory, "rows": rows}

    def _leave_out(self, distances, rows, hidden: np.ndarray, k: int):
        """The first k of each query's [k + h] nearest rows that do not hold a hidden id (numpy)."""
        distances, rows = (t.cpu().numpy() if isinstance(t, torch.Tensor) else t for t in (distances, rows))
        found = rows >= 0
        ids = self.rows.ids[: self.rows.size].cpu().numpy()[np.where(found, rows, 0)]
        keep = found & ~np.isin(ids, hidden)
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
        kept = np.take_along_axis(keep, order, axis=1)
        rows = np.where(kept, np.take_along_axis(rows, order, axis=1), -1)
        distances = np.where(kept, np.take_along_axis(distances, order, axis=1), np.inf).astype(distances.dtype)
        return distances, rows

    def _nearest_rows(self, queries: np.ndarray, k: int):
        """(distances float32 [B, k], rows int64 [B, k]): numpy from faiss, tensors on the store's
        device from the torch kernel (left there for _gather)."""
        stored = self.rows.size
        if self.backend == "faiss":
            return flat_index.faiss_search(_on_host(queries), self.rows.keys[:stored].numpy(), k, self.config.metric)
        return self._torch_nearest(to_device(queries, self.device), k)

    def _torch_nearest(self, queries: torch.Tensor, k: int):
        stored = self.rows.size
        return flat_index.torch_nearest(queries, self.rows.keys[:stored], self.rows.key_norms[:stored], k,
                                        self.config.metric)

    def _device_answer(self, queries: torch.Tensor, k: int, columns: tuple) -> dict:
        """The search's answer as tensors on the store's device, queued, not waited for (what a search's
        CUDA graph captures). columns: (return_keys, return_values, return_weights)."""
        distances, rows = self._torch_nearest(queries, k)
        return self._answer_columns(rows, distances, *columns)

    def _gather(self, rows, distances, return_keys: bool, return_values: bool, return_weights: bool,
                on_device: bool = False) -> SearchResult:
        """The answer's columns for rows (int64 [B, k], -1 where none: a tensor, on the host or on the
        store's device), brought to the host together (one wait for the device); on_device: left on the
        store's device as tensors (the device path), not waited for."""
        if self.rows.size == 0:
            rows = rows.cpu().numpy()
            distances = distances.cpu().numpy() if isinstance(distances, torch.Tensor) else distances
            empty = np.zeros(rows.shape, np.int64)
            ids, tokens = empty - 1, empty.astype(np.int32) - 1
            keys = np.zeros(rows.shape + (self.config.dim,), np.float32) if return_keys else None
            values = np.zeros(rows.shape + (self.config.value_dim,), np.float32) if return_values else None
            weights = np.zeros(rows.shape, np.float32) if return_weights else None
            found = SearchResult(ids, distances, tokens, keys, values, weights)
            return found.to_tensors(self.device) if on_device else found
        rows = rows.to(self.device)
        if on_device:
            distances = torch.as_tensor(distances).to(self.device)
        columns = self._answer_columns(rows, distances, return_keys, return_values, return_weights)
        return self._result(columns if on_device else to_host_all(columns))

    def _answer_columns(self, rows: torch.Tensor, distances, return_keys: bool, return_values: bool,
                        return_weights: bool) -> dict:
        """{column: tensor on the store's device} of a search's answer for rows (int64 [B, k], -1 where
        none): ids, distances, tokens, and keys, values, weights when asked (else None). Queued on the
        device, never waited for (a search's CUDA graph captures it: datastore/search_graphs.py)."""
        found = rows >= 0
        safe = rows.clamp_min(0)

        def column(tensor, fill):
            picked = tensor[safe]
            return picked.masked_fill_(~found.view(found.shape + (1,) * (picked.dim() - found.dim())), fill)

        return {
            "ids": column(self.rows.ids, MISSING_ID),
            "distances": distances,
            "tokens": column(self.rows.tokens, -1),
            "keys": column(self.rows.keys, 0) if return_keys else None,
            "values": column(self.rows.values, 0) if return_values else None,
            "weights": column(self.rows.weights, 0) if return_weights else None,
        }

    @staticmethod
    def _result(answer: dict) -> SearchResult:
        """The answer's columns (numpy, or tensors on the device path) as a SearchResult, keys in float32."""
        keys = answer["keys"]
        if keys is not None:
            answer["keys"] = keys.float() if torch.is_tensor(keys) else keys.astype(np.float32, copy=False)
        return SearchResult(**answer)

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
                state["step"] = self.rows.steps[index].cpu().numpy()
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
        """rows, device, backend, next_id, bytes (held for the rows and the index); for an ivf or
        hnsw namespace also index_state ("exact" | "training" | "trained"), index_trainings,
        index_tombstones, index_drift, index_train_seconds (BackgroundIndex.stats; hnsw also
        index_unindexed, the rows waiting to enter its graph)."""
        with self._lock:
            stats = {"rows": self.rows.size, "device": str(self.device), "backend": self.backend,
                     "next_id": self.next_id, "bytes": self.nbytes, "index_state": "exact"}
            if self.approximate is not None:
                stats.update(self.approximate.stats())
            return stats

    @property
    def nbytes(self) -> int:
        """Bytes the store holds: its columns (allocated), and for an ivf or hnsw namespace its index
        as counted for every row from the first (BackgroundIndex.reserved_bytes: a build never adds any)."""
        approximate = self.approximate
        return self.rows.nbytes + (approximate.reserved_bytes(self.rows.capacity) if approximate is not None else 0)

    def drop_kept_rows(self) -> None:
        """Drops the rows kept for recent steps (a cache: their backward looks its ids up instead)."""
        with self._lock:
            self.kept_rows.clear()

    def growth_bytes(self, rows: int) -> int:
        """Bytes that storing ``rows`` more rows allocates (RowStore.growth_bytes, and their index entries)."""
        grown = self.rows.growth_bytes(rows)
        if self.approximate is not None and grown:
            capacity = grown // self.rows.row_bytes  # the columns' new capacity
            grown += self.approximate.reserved_bytes(capacity) - self.approximate.reserved_bytes(self.rows.capacity)
        return grown

    def wait_for_index(self, timeout_s: float | None = None) -> bool:
        """Waits until no index build or compaction is running (tests, benchmarks); True if none is."""
        return True if self.approximate is None else self.approximate.wait_idle(timeout_s)

    def close(self) -> None:
        """The namespace was dropped: background index work stops, captured searches go."""
        if self.approximate is not None:
            self.approximate.close()
        if self.graphs is not None:
            with self._lock:
                self.graphs.drop()

    def increment_weights(self, ids: np.ndarray, counts: np.ndarray) -> None:
        """weights[ids] += counts (ids distinct and stored)."""
        if ids.size == 0:
            return
        with self._lock:
            index = torch.from_numpy(self._rows_of_stored(ids)).to(self.device)
            self.rows.weights[index] += torch.from_numpy(counts.astype(np.float32)).to(self.device)

    # ----- learnable memory ---------------------------------------------------------
    def _kept_part(self, kept: tuple[str, int] | None, ids: np.ndarray) -> dict | None:
        """kept: (name, first) when ids are rows [first, first + B) of a search's answer kept under that
        name (search's keep_rows), exactly: {"rows", and "alpha", "distances" where forward kept them}
        of those rows, while no row was deleted since; else None."""
        answer = None if kept is None else self.kept_rows.get(kept[0], self.rows.removals)
        if answer is None:
            return None
        part = {name: tensor[kept[1] : kept[1] + ids.shape[0]] for name, tensor in answer.items()}
        return part if part["rows"].shape == ids.shape else None

    def _held_rows(self, ids: np.ndarray, kept_part: dict | None = None) -> torch.Tensor:
        """int64 [...] ids -> rows on the device, -1 where the id is -1 (an empty slot, or an id the
        caller left to another store: the router masks each shard's ids by placement). NOT_FOUND
        naming every id >= 0 that is not stored. kept_part (_kept_part): the rows a search found them at."""
        if kept_part is not None:
            return kept_part["rows"].to(self.device)
        if torch.is_tensor(ids) and self.device.type == "cpu":  # a device path's ids, on the host store's device
            ids = ids.numpy()
        if self.device.type == "cpu":
            rows = self.rows.rows_of(ids)
            gone = (ids >= 0) & (rows < 0)
            if gone.any():
                raise IdsNotFound(self.config.name, ids[gone])
            return torch.from_numpy(rows)
        # On a GPU the ids go there once and are looked up there (B x k of them in a training step).
        on_device = ids.to(self.device, torch.int64) if torch.is_tensor(ids) \
            else self._tensor(np.ascontiguousarray(ids, np.int64))
        rows = self.rows.id_map.lookup_tensor(on_device)
        gone = (on_device >= 0) & (rows < 0)
        if bool(gone.any()):
            raise IdsNotFound(self.config.name, on_device[gone].cpu().numpy())
        return rows

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        """The array (only read from: a request's, maybe read-only) as a tensor on the store's device."""
        return to_device(array, self.device)

    def value_sum(self, ids: np.ndarray, alpha: np.ndarray, kept: tuple[str, int] | None = None) -> np.ndarray:
        """float32 [B, value_dim]: sum_i alpha_i v_i over the slots whose ids are >= 0 (those of this store).
        NOT_FOUND if one of them is no longer stored (never a silently smaller sum). kept: _kept_part."""
        with self._lock:
            rows = self._held_rows(ids, self._kept_part(kept, ids))
            return to_host(memory_ops.value_sum(self.rows.values[: self.rows.size], rows, self._tensor(alpha)))

    def backward_partials(self, queries, ids, alpha, distances, grad_memory, kept: tuple[str, int] | None = None):
        """This store's part of a Retrieve backward (inputs already checked), computed from the
        values as they are now; changes nothing. NOT_FOUND, if an id that belongs here is gone.
        kept: _kept_part (with the forward's own alpha and distances where forward kept them). Returns
        (the BackwardPartials packed in one float64 tensor on the store's device (slot_partials), ids
        int64 [U] of the rows it holds, their value gradients [U, value_dim] on the device, HeldRows:
        the rows of those ids, for a step of exactly these gradients)."""
        with self._lock:
            part = self._kept_part(kept, ids)
            rows = self._held_rows(ids, part)
            if part is not None and "alpha" in part:
                alpha_t, distances_t = part["alpha"], part["distances"]
            else:
                alpha_t, distances_t = self._tensor(alpha), self._tensor(distances)
            found = {}  # the rows' ids, to the host before the sums are queued (they run while the step is staged)
            partials, unique_rows, grads = memory_ops.slot_partials(
                self.rows.keys[: self.rows.size], self.rows.values[: self.rows.size], rows,
                alpha_t, distances_t, self._tensor(grad_memory),
                rows_found=lambda unique: found.update(ids=to_host(self.rows.ids[unique])))
            held = HeldRows(unique_rows, weakref.ref(self.rows), self.rows.removals)
            return partials, found["ids"], grads, held

    def check_stored(self, ids: np.ndarray) -> None:
        """NOT_FOUND naming the ids (all of which belong here) that are not stored."""
        with self._lock:
            self._rows_of_stored(ids)

    def step(self, ids: np.ndarray, grads: torch.Tensor | np.ndarray, dry_run: bool = False,
             held: HeldRows | None = None) -> int:
        """One optimizer step: value gradients grads [N, value_dim] for ids int64 [N] (repeated ids
        are summed, then each row's gradient is clipped). Ids no longer stored are skipped (a delete
        wins over an update). Returns the number of rows updated. INVALID_ARGUMENT, changing nothing,
        if the step would overflow float32; dry_run: only that check (for a step being staged).
        held: the rows of exactly these ids (backward_partials'), taken as they are while no row was
        deleted since; else the ids are looked up."""
        with self._lock:
            grads = torch.as_tensor(grads).to(self.device, torch.float32)
            if held is not None and held.valid_in(self.rows) and held.rows.numel() == len(ids):
                unique, summed = held.rows, grads  # distinct, every one stored: nothing to sum or skip
            else:
                rows = self.rows.rows_of(ids)
                kept = rows >= 0
                if not kept.any():
                    return 0
                unique, summed = optimizers.coalesce(self._tensor(rows[kept]), grads[self._tensor(kept)])
            if not unique.numel():
                return 0
            config = self.config.optimizer
            state = {name: getattr(self.rows, name) for name in self.rows.state_columns}
            optimizers.apply_step(config, self.rows.steps, unique, optimizers.clip_rows(summed, config.max_grad_norm),
                                  self.rows.values, state, dry_run=dry_run)
            return int(unique.numel())

    # ----- snapshots (datastore/snapshot.py) --------------------------------------------
    def host_buffers(self, rows: int) -> dict[str, torch.Tensor]:
        """Pre-faulted CPU tensors for ``rows`` rows of every snapshot column (RowStore.host_columns),
        made without the lock, so that ``copy_for_snapshot`` holds it only for a memcpy."""
        return self.rows.host_columns(rows)

    def copy_for_snapshot(self, out: dict[str, torch.Tensor] | None = None) -> dict:
        """A copy of everything a snapshot keeps, taken under the lock in one go (writers wait for
        the copy only, never for the files). out: buffers from ``host_buffers``, used if they have room.

        Returns {"config", "next_id", "insertions", "sources" (list[str]), "rows" (N),
        "columns": name -> CPU tensor [N, ...]} (RowStore.snapshot_columns; keys in the store's
        key dtype), sharing no memory with the store.
        """
        with self._lock:
            return {
                "config": self.config,
                "next_id": self.next_id,
                "insertions": self.rows.insertions,
                "sources": list(self.rows.sources),
                "rows": self.rows.size,
                "columns": self.rows.copy_to_host(out),
            }

    def reserve(self, rows: int) -> None:
        """Room for ``rows`` more rows without regrowing (a restore knows its row count)."""
        with self._lock:
            self.rows.reserve(rows)

    def restore_rows(self, ids: np.ndarray, keys: np.ndarray, tokens: np.ndarray, values: np.ndarray | None,
                     weights: np.ndarray, created: np.ndarray, sources: list[str], source_codes: np.ndarray,
                     steps: np.ndarray, state: dict[str, np.ndarray]) -> None:
        """Appends N rows with every column exactly as a snapshot holds them (RowStore.load_columns
        gives the shapes); ``add`` would instead start their created counter, steps and optimizer
        state afresh. Checks the shapes, dtypes and ids (distinct, non-negative, not stored yet)
        before it changes anything. next_id moves past the largest id."""
        n = ids.shape[0]
        value_dim = self.config.value_dim
        expected = {"ids": (ids, np.int64, (n,)), "keys": (keys, np.float32, (n, self.config.dim)),
                    "tokens": (tokens, np.int32, (n,)), "weights": (weights, np.float32, (n,)),
                    "created": (created, np.int64, (n,)), "source_codes": (source_codes, np.int32, (n,)),
                    "steps": (steps, np.int64, (n,))}
        if value_dim:
            expected["values"] = (values, np.float32, (n, value_dim))
        if set(state) != set(self.rows.state_columns):
            raise InvalidArgument(f"optimizer state columns {sorted(state)} do not match the namespace's "
                                  f"{sorted(self.rows.state_columns)}")
        for name, column in state.items():
            expected[name] = (column, np.float32, (n, value_dim))
        for name, (array, dtype, shape) in expected.items():
            if not isinstance(array, np.ndarray) or array.dtype != dtype or array.shape != shape:
                got = f"{array.dtype} {list(array.shape)}" if isinstance(array, np.ndarray) else type(array).__name__
                raise InvalidArgument(f"restored column {name} must be {np.dtype(dtype)} {list(shape)}, got {got}")
        if n and (int(source_codes.min()) < 0 or int(source_codes.max()) >= len(sources)):
            raise InvalidArgument(f"restored source codes must index the {len(sources)} sources given")
        if n and (np.unique(ids).size != n or int(ids.min()) < 0):
            raise InvalidArgument("restored ids must be distinct and non-negative")
        with self._lock:
            present = ids[self.rows.rows_of(ids) >= 0]
            if present.size:
                raise AlreadyExists(f"ids already stored: {present[:10].tolist()}")
            self.rows.load_columns(ids, keys, tokens, values if value_dim else None, weights, created, sources,
                                   source_codes, steps, state)
            if n:
                self.next_id = max(self.next_id, int(ids.max()) + 1)
                if self.approximate is not None:  # restored rows are indexed as added ones (a trained index is not kept)
                    self.approximate.after_add(ids, self._as_stored(keys))

    def advance_counters(self, next_id: int, insertions: int) -> None:
        """Moves next_id and the insertion counter up to the given values (a restore sets them as
        the snapshot recorded them, past rows that were deleted)."""
        with self._lock:
            self.next_id = max(self.next_id, int(next_id))
            self.rows.advance_insertions(insertions)


def _on_host(queries):
    """Queries as numpy for an index on the host (faiss): a device path's tensor is copied there."""
    return queries.cpu().numpy() if torch.is_tensor(queries) else queries
