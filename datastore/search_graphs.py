"""CUDA graphs of a GPU store's small searches: a decoding step's read as one launch.

A decoding step searches with one query (or a few). Over 1M x 768 float16 keys the GPU's work is
~0.7 ms on an H100, but issuing it from Python took ~1.7 ms: some fifty kernels (the query's float16
scale, the matmul, the distances, top-k, the re-rank, the gathers of ids and tokens), each launched
by the host in turn. A store that meets the same shape of search again captures the whole search,
from the query's copy to the answer's columns, as one CUDA graph, and replays it from then on: one
launch, and the host waits only for the GPU.

What a graph depends on is its key: the rows stored, the batch, k, the query's dtype and the columns
asked; and the columns' addresses, which change only when RowStore reallocates them (RowStore.layout:
every graph is dropped then, before it could read freed memory). Anything else a graph reads where it
is stored, so it sees updates in place (values stepped, weights merged, keys replaced). A search of a
new shape (rows were added since) runs eagerly; a shape is captured on its CAPTURE_AFTER-th search,
so a store written between every search never pays for a capture. At most KEPT graphs are held per
store (least recently used out), each with its own memory pool (a few score rows: the search is one
scan block, flat_index.one_block).

The device path's Retrieve forward (NeighborStore.forward given a tensor: a decoding model's memory
read with an in-process store on its GPU) is captured the same way, search, alpha and m in one graph:
its query is copied in on the device, the temperature is an input of the graph (a learned T changes
every step), and its answer is handed back as tensors on the device, not waited for, so the host
goes on launching the model's next kernels while the GPU reads the memory.

Only for a flat namespace on a GPU, without rows hidden by a reshard, and at most MAX_BATCH queries.
MONIM_SEARCH_GRAPHS=0 in the environment turns graphs off.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from monim.datastore import flat_index, memory_ops

log = logging.getLogger(__name__)

ENABLED = os.environ.get("MONIM_SEARCH_GRAPHS", "1") != "0"
MAX_BATCH = 16
CAPTURE_AFTER = 2
KEPT = 4
# Most bytes of one answer a graph hands back (keys or values asked at large k go eagerly).
MAX_ANSWER_BYTES = 8 << 20
_MAX_SEEN = 256


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    query: torch.Tensor  # the static input on the device
    query_host: torch.Tensor | None  # pinned: a search's query is copied through it
    outputs: dict  # {column: static output tensor on the device, or None}
    host: dict  # {column: pinned tensor the output is copied into}
    temperature: torch.Tensor | None = None  # a forward's: its static input on the device


class SearchGraphs:
    """One store's captured searches and forwards.

    answer(queries: device tensor [B, dim], k, columns) -> {column: device tensor or None}: the store's
    search without a host copy or a wait (NeighborStore._device_answer); columns is the tuple
    (return_keys, return_values, return_weights).
    forward(queries, k, temperature: 0-d device tensor) -> {column: device tensor}: the store's Retrieve
    forward the same way (NeighborStore._device_forward); None where the store has none.
    """

    def __init__(self, rows, answer: Callable[[torch.Tensor, int, tuple], dict],
                 forward: Callable[[torch.Tensor, int, torch.Tensor], dict] | None = None):
        self.rows = rows
        self._answer = answer
        self._forward = forward
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._seen: dict[tuple, int] = {}
        self._layout = rows.layout
        self.captures = 0
        self.replays = 0
        self.failure: str | None = None  # why graphs were turned off for this store

    def search(self, queries, k: int, columns: tuple) -> dict | None:
        """{column: numpy array} of the search's answer from a graph, or None where this search is not
        one for a graph (the caller answers it eagerly). The caller holds the store's lock. queries a
        tensor on the store's device (the device path): {column: tensor there}, queued, not waited for."""
        graph = self._graph(queries, k, columns)
        if graph is None:
            return None
        if torch.is_tensor(queries):
            return self._replay_on_device(graph, queries)
        return self._replay(graph, queries)

    def forward(self, queries: torch.Tensor, k: int, temperature: float) -> dict | None:
        """{column: tensor on the device} of the Retrieve forward (ids, distances, tokens, weights, alpha,
        memory) from a graph, queued, not waited for; None where this forward is not one for a graph
        (the caller runs it eagerly). queries: float32 [B, dim] on the store's device. The caller holds
        the store's lock."""
        graph = None if self._forward is None else self._graph(queries, k, ("forward",), temperature)
        if graph is None:
            return None
        graph.temperature.fill_(temperature)
        return self._replay_on_device(graph, queries)

    def _replay_on_device(self, graph: _Graph, queries: torch.Tensor) -> dict:
        graph.query.copy_(queries)
        graph.graph.replay()
        self.replays += 1
        # Copies: the caller keeps its answer while the next step's replay writes the static outputs.
        return {name: None if tensor is None else tensor.clone() for name, tensor in graph.outputs.items()}

    def _graph(self, queries, k: int, columns: tuple, temperature: float = 1.0) -> _Graph | None:
        """The graph of this shape, captured now if it is due; None if the shape is not one for a graph,
        not due yet, or its capture failed."""
        key = self._key(queries, k, columns)
        if key is None:
            return None
        graph = self._graphs.get(key)
        if graph is None:
            if not self._due(key):
                return None
            graph = self._capture(key, queries, k, columns, temperature)
            if graph is None:
                return None
        self._graphs.move_to_end(key)
        return graph

    def _due(self, key: tuple) -> bool:
        """Whether a shape not captured yet is to be captured now (its CAPTURE_AFTER-th time)."""
        seen = self._seen.get(key, 0) + 1
        if seen < CAPTURE_AFTER:
            if len(self._seen) >= _MAX_SEEN:
                self._seen.clear()
            self._seen[key] = seen
            return False
        self._seen.pop(key, None)
        return True

    def _key(self, queries, k: int, columns: tuple) -> tuple | None:
        rows = self.rows
        if not ENABLED or self.failure is not None or rows.device.type != "cuda" or rows.size == 0:
            return None
        batch = queries.shape[0]
        if not 0 < batch <= MAX_BATCH or not flat_index.one_block(batch, rows.size):
            return None
        if columns == ("forward",):  # ids, distances, tokens, weights, alpha; m; the value rows gathered
            answer_bytes = batch * (k * 24 + 4 * rows.value_dim)
            if batch * k * rows.value_dim > memory_ops.DENSE_GATHER_FLOATS:
                return None  # (a larger sum waits for the host to size its sparse matrix: no graph takes it)
        else:
            return_keys, return_values, return_weights = columns
            answer_bytes = batch * k * (8 + 4 + 4 + 4 * (rows.dim * return_keys + rows.value_dim * return_values
                                                         + return_weights))
        if answer_bytes > MAX_ANSWER_BYTES:
            return None
        if rows.layout != self._layout:  # the columns moved: every graph would read freed memory
            self.drop()
            self._layout = rows.layout
        # A tensor's graph is another than an array's of the same shape: no host buffers, the answer left there.
        return rows.size, batch, k, str(queries.dtype).removeprefix("torch."), columns, torch.is_tensor(queries)

    def _capture(self, key: tuple, queries, k: int, columns: tuple, temperature: float = 1.0) -> _Graph | None:
        device = self.rows.device
        on_device, forward = torch.is_tensor(queries), columns == ("forward",)
        query = torch.empty(queries.shape, dtype=queries.dtype if on_device else _torch_dtype(queries), device=device)
        query_host = None if on_device else torch.empty(queries.shape, dtype=query.dtype, pin_memory=True)
        if on_device:
            query.copy_(queries)
        else:
            query_host.numpy()[...] = queries
            query.copy_(query_host)
        static_temperature = torch.full((), float(temperature), dtype=torch.float32, device=device) if forward \
            else None

        def run():
            return self._forward(query, k, static_temperature) if forward else self._answer(query, k, columns)

        try:
            # Warm up on a side stream first (Triton compiles, cuBLAS picks its kernel, torch's lazy
            # state), as torch.cuda.graphs asks; then capture. thread_local: other threads of the
            # process (other stores, a snapshot's copies) may use the GPU meanwhile.
            with torch.cuda.device(device):
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    run()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    outputs = run()
        except Exception as error:  # noqa: BLE001 (a search that can't be captured is still answered)
            self.failure = f"{type(error).__name__}: {error}"
            self.drop()
            log.warning("search graphs off for this store: capture failed (%s); searches run eagerly", self.failure)
            return None
        host = {} if on_device else {name: torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                                     for name, t in outputs.items() if t is not None}
        captured = _Graph(graph, query, query_host, outputs, host, static_temperature)
        self._graphs[key] = captured
        while len(self._graphs) > KEPT:
            self._graphs.popitem(last=False)
        self.captures += 1
        return captured

    def _replay(self, graph: _Graph, queries: np.ndarray) -> dict:
        query = graph.query
        graph.query_host.numpy()[...] = queries  # the last replay's copy ended: it was waited for
        with torch.cuda.device(query.device):  # a replay launches on the current device's stream
            stream = torch.cuda.current_stream()
            query.copy_(graph.query_host, non_blocking=True)
            graph.graph.replay()
            for name, buffer in graph.host.items():
                buffer.copy_(graph.outputs[name], non_blocking=True)
            stream.synchronize()
        self.replays += 1
        return {name: graph.host[name].numpy().copy() if name in graph.host else None for name in graph.outputs}

    def drop(self) -> None:
        """Forgets every graph (their memory goes back to torch's allocator)."""
        self._graphs.clear()
        self._seen.clear()


def _torch_dtype(array: np.ndarray) -> torch.dtype:
    return torch.from_numpy(array[:0]).dtype
