"""The MoNIM layer: a kNN memory read as a layer, with its backward done by the store.

Forward (for each position's query q, the input of the last FFN):
    r = store.Retrieve(q, k, T)        ->  m = sum_i softmax(-d_i/T + log w_i) v_i,  computed next to the data
Backward (``RetrieveFunction.backward``):
    store.RetrieveBackward(q, r, dL/dm) ->  the value rows take one step of the namespace's optimizer;
                                             dL/dq and dL/dT come back into the model's autograd graph.
The layer's output is gated, ``g * m`` (g learnable, init small), and the FFN wrapper
(model_client/hf.py) adds it to the FFN's output: h' = FFN(x) + g * m.

kNN-LM mode does not touch values: it searches the top-k (ids, distances, tokens, weights),
computes alpha locally (T learnable) and turns it into p_kNN over the vocabulary, to be mixed
with the LM's distribution: p = lambda * p_kNN + (1 - lambda) * p_LM.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from monim.protos.errors import InvalidArgument
from torch import nn

MODES = ("monim", "knnlm")


class StoreTimer:
    """Wall-clock seconds of each store call, by operation."""

    def __init__(self):
        self.calls: dict[str, list[float]] = {}
        self.rows: dict[str, list[int]] = {}

    def record(self, operation: str, seconds: float, rows: int) -> None:
        self.calls.setdefault(operation, []).append(seconds)
        self.rows.setdefault(operation, []).append(rows)

    def summary(self) -> dict:
        """Per operation: calls, total_s, p50_ms, p90_ms, rows_per_call (the largest and the median)."""
        out = {}
        for operation, seconds in self.calls.items():
            ms = np.asarray(seconds) * 1e3
            rows = np.asarray(self.rows[operation])
            out[operation] = {"calls": len(ms), "total_s": float(ms.sum() / 1e3), "p50_ms": float(np.median(ms)),
                              "p90_ms": float(np.percentile(ms, 90)), "median_rows": float(np.median(rows)),
                              "max_rows": int(rows.max())}
        return out

    def reset(self) -> None:
        self.calls.clear()
        self.rows.clear()


class RetrieveFunction(torch.autograd.Function):
    """m = Retrieve(queries, T) with the store doing forward and backward.

    queries: float [M, dim] (any device); temperature: 0-d tensor; values: a 0-d tensor that stands
    for the store's value rows in autograd: when it requires grad, the backward runs (and the
    rows step) even if neither the queries nor the temperature need a gradient, e.g. a frozen LM
    with a fixed T. Its own gradient is always 0.
    Returns m: [M, value_dim] on the queries' device and dtype.
    The backward has a side effect: the store applies the value update. Call it once per forward
    (no double backward, no recomputation under activation checkpointing).
    """

    @staticmethod
    def forward(ctx, queries, temperature, values, layer: "MoNIMLayer"):
        started = time.perf_counter()
        # A backward follows when an input needs a gradient: then the server keeps the forward's state
        # and the backward sends only grad_memory.
        queries_host = queries.detach().float().cpu().numpy()
        if layer.decoding is not None and not any(ctx.needs_input_grad[:3]):  # generating: no backward follows
            result = layer.decoding.retrieve(layer.namespace, queries_host, layer.k, float(temperature.detach()))
        else:
            result = layer.client.retrieve(layer.namespace, queries_host, layer.k, float(temperature.detach()),
                                           keep_state=any(ctx.needs_input_grad[:3]))
        layer.timer.record("retrieve", time.perf_counter() - started, queries.shape[0])
        ctx.result, ctx.layer = result, layer
        ctx.device, ctx.dtype = queries.device, queries.dtype
        layer.last_result = result
        return torch.from_numpy(result.memory).to(queries.device, queries.dtype)

    @staticmethod
    def backward(ctx, grad_memory):
        layer = ctx.layer
        started = time.perf_counter()
        grad_queries, grad_temperature = layer.client.retrieve_backward(
            layer.namespace, ctx.result, grad_memory.detach().float().cpu().numpy(), step_values=layer.train_values)
        layer.timer.record("retrieve_backward", time.perf_counter() - started, grad_memory.shape[0])
        return (torch.from_numpy(grad_queries).to(ctx.device, ctx.dtype),
                torch.tensor(grad_temperature, dtype=torch.float32, device=ctx.device),
                torch.zeros((), device=ctx.device), None)


class MoNIMLayer(nn.Module):
    """A memory layer over a MemoryClient namespace.

    client: MemoryClient (remote or ":memory:"); namespace: its name; k: neighbours per query;
    temperature: initial T (learned as log T when learn_temperature); gate: initial g;
    mode: "monim" (values, Retrieve + backward on the store) or "knnlm" (p_kNN from tokens);
    knn_lambda: initial lambda of the kNN-LM mixture (learned when learn_lambda);
    train_values: the store's value rows take an optimizer step in every backward that reaches the
    memory's output (also with a frozen LM and a fixed T); False reads them only (a learned T and
    the queries still get their gradients).
    """

    def __init__(self, client, namespace: str, k: int = 32, temperature: float = 1.0, gate: float = 0.05,
                 mode: str = "monim", learn_temperature: bool = True, knn_lambda: float = 0.25,
                 learn_lambda: bool = False, train_values: bool = True):
        super().__init__()
        if mode not in MODES:
            raise InvalidArgument(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if temperature <= 0 or not 0 < knn_lambda < 1:
            raise InvalidArgument("temperature must be > 0 and knn_lambda in (0, 1)")
        self.client, self.namespace, self.k, self.mode = client, namespace, k, mode
        self.train_values = train_values
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)), requires_grad=learn_temperature)
        self.gate = nn.Parameter(torch.tensor(float(gate)))
        lam = math.log(knn_lambda / (1 - knn_lambda))
        self.knn_lambda_logit = nn.Parameter(torch.tensor(lam), requires_grad=learn_lambda)
        self.timer = StoreTimer()
        self.last_result = None
        # A DecodeStream (client.decode()) for reads no backward follows, e.g. in generate(); attach_monim
        # opens one at the first decoding step. None: every read is a call of its own.
        self.decoding = None
        config = client.describe_namespace(namespace).config  # NotFound here, not at the first step
        self.dim, self.value_dim = config.dim, config.value_dim
        if mode == "monim" and self.value_dim == 0:
            raise InvalidArgument(f"namespace {namespace!r} has no value vectors (value_dim 0); "
                                  "MoNIM mode needs them (or use mode='knnlm')")
        if not 1 <= k <= config.max_k:
            raise InvalidArgument(f"k must be in [1, {config.max_k}] (the namespace's max_k), got {k}")

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    @property
    def knn_lambda(self) -> torch.Tensor:
        return torch.sigmoid(self.knn_lambda_logit)

    def _selected(self, hidden: torch.Tensor, mask: torch.Tensor | None):
        """Flattens [batch, seq, dim] to the non-padding positions: (queries [M, dim], index [M])."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        if mask is None:
            return flat, None
        index = torch.nonzero(mask.reshape(-1).bool(), as_tuple=False).squeeze(1)
        return flat[index], index

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden: [batch, seq, dim] (the last FFN's input); mask: [batch, seq], 0 at padding.
        Returns m [batch, seq, value_dim] (zeros at padding), not gated."""
        if self.mode != "monim":
            raise InvalidArgument("forward() returns value memory; in knnlm mode use knn_distribution()")
        queries, index = self._selected(hidden, mask)
        batch, seq = hidden.shape[:2]
        if queries.shape[0] == 0:
            self.last_result = None
            return hidden.new_zeros(batch, seq, self.value_dim)
        values = hidden.new_zeros((), dtype=torch.float32).requires_grad_(self.train_values and torch.is_grad_enabled())
        memory = RetrieveFunction.apply(queries, self.temperature, values, self)
        if index is None:
            return memory.reshape(batch, seq, -1)
        out = memory.new_zeros(batch * seq, memory.shape[-1])
        return out.index_copy(0, index, memory).reshape(batch, seq, -1)

    def knn_distribution(self, hidden: torch.Tensor, vocab_size: int, mask: torch.Tensor | None = None):
        """kNN-LM: p_kNN [batch, seq, vocab] from the neighbours' tokens, alpha = softmax(-d/T + log w)
        computed here (so T gets its gradient locally). Padding positions get all zeros."""
        queries, index = self._selected(hidden, mask)
        batch, seq = hidden.shape[:2]
        started = time.perf_counter()
        reader = self.decoding if self.decoding is not None and not torch.is_grad_enabled() else self.client
        found = reader.search(self.namespace, queries.detach().float().cpu().numpy(), self.k, return_weights=True)
        self.timer.record("search", time.perf_counter() - started, queries.shape[0])
        ids = torch.from_numpy(found.ids).to(hidden.device)
        distances = torch.from_numpy(np.where(found.ids >= 0, found.distances, 0)).to(hidden.device)
        scores = -distances / self.temperature + torch.from_numpy(found.weights).to(hidden.device).clamp_min(1e-30).log()
        scores = scores.masked_fill(ids < 0, float("-inf"))
        alpha = torch.nan_to_num(torch.softmax(scores, dim=1), nan=0.0)
        tokens = torch.from_numpy(found.tokens.astype(np.int64)).clamp_min(0).to(hidden.device)
        p_knn = torch.zeros(queries.shape[0], vocab_size, device=hidden.device).scatter_add_(1, tokens, alpha)
        if index is not None:
            p_knn = p_knn.new_zeros(batch * seq, vocab_size).index_copy(0, index, p_knn)
        return p_knn.reshape(batch, seq, vocab_size)

    def mix_log_probs(self, logits: torch.Tensor, p_knn: torch.Tensor) -> torch.Tensor:
        """log(lambda * p_kNN + (1 - lambda) * p_LM) [batch, seq, vocab]; positions without
        neighbours keep p_LM. The result serves as logits (its softmax is the mixture)."""
        p_lm = torch.softmax(logits.float(), dim=-1)
        lam = self.knn_lambda * (p_knn.sum(-1, keepdim=True) > 0)
        return torch.log((lam * p_knn + (1 - lam) * p_lm).clamp_min(1e-30)).to(logits.dtype)
