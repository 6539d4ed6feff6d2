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
from monim.protos.errors import FailedPrecondition, InvalidArgument
from torch import nn

MODES = ("monim", "knnlm")
COMBINERS = ("fixed", "adaptive")


class AdaptiveCombiner(nn.Module):
    """The MoNIM reference code's "meta-k" adapter: per position, how much to trust the memory.

    Fed, per position, the log of each of the top-k neighbours' distances (0 for a missing one), the
    fraction of present neighbours, the count of distinct tokens among them (/ k), and the LM's own
    entropy and max probability; a two-layer MLP outputs one number: lambda's logit (kNN-LM mode)
    or the gate (MoNIM mode). The last layer starts at zero with its bias at ``initial``, so a fresh
    combiner gives the fixed lambda / gate everywhere and training moves it from there.
    """

    def __init__(self, k: int, initial: float, hidden: int = 32):
        super().__init__()
        self.k = k
        self.net = nn.Sequential(nn.Linear(k + 4, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[2].weight)
        nn.init.constant_(self.net[2].bias, float(initial))

    @staticmethod
    def neighbour_features(distances: torch.Tensor, ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """float32 [M, k + 2] from one search: log(1 + d) per slot (0 where missing), the fraction of
        present slots, the count of distinct tokens among the present ones / k. Inputs [M, k]."""
        present = ids >= 0
        k = ids.shape[1]
        log_d = torch.where(present, torch.log1p(distances.float().clamp_min(0)), torch.zeros((), device=ids.device))
        sorted_tokens = torch.where(present, tokens.long(), torch.full_like(tokens.long(), -1)).sort(dim=1).values
        starts_run = torch.ones_like(present)
        starts_run[:, 1:] = sorted_tokens[:, 1:] != sorted_tokens[:, :-1]
        distinct = (starts_run & (sorted_tokens >= 0)).sum(1)
        return torch.cat([log_d, present.float().mean(1, keepdim=True), distinct.float().unsqueeze(1) / k], dim=1)

    @staticmethod
    def lm_features(logits: torch.Tensor) -> torch.Tensor:
        """float32 [..., 2]: the entropy (nats) and the max probability of softmax(logits)."""
        log_p = torch.log_softmax(logits.detach().float(), dim=-1)
        p = log_p.exp()
        return torch.stack([-(p * log_p).sum(-1), p.max(-1).values], dim=-1)

    def forward(self, neighbour_features: torch.Tensor, lm_features: torch.Tensor) -> torch.Tensor:
        """[..., k + 2] and [..., 2] -> [...], the raw output (lambda's logit or the gate)."""
        return self.net(torch.cat([neighbour_features, lm_features], dim=-1)).squeeze(-1)


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
        # Tensors in and out (as_tensors): with an in-process store on the model's GPU nothing leaves it and
        # the host does not wait here; with a server the queries' one copy is the wire's.
        # Only m comes back (memory_only) unless the neighbours are used here too (mix_knn, the adaptive combiner's
        # features): B x value_dim, not B x k x 28 bytes.
        sent, memory_only = queries.detach().float(), layer.needs_memory_only
        if layer.decoding is not None and not any(ctx.needs_input_grad[:3]):  # generating: no backward follows
            result = layer.decoding.retrieve(layer.namespace, sent, layer.k, layer.temperature_value(),
                                             as_tensors=True, memory_only=memory_only)
        else:
            result = layer.client.retrieve(layer.namespace, sent, layer.k, layer.temperature_value(),
                                           keep_state=any(ctx.needs_input_grad[:3]), as_tensors=True,
                                           memory_only=memory_only)
        layer.timer.record("retrieve", time.perf_counter() - started, queries.shape[0])
        ctx.result, ctx.layer = result, layer
        ctx.device, ctx.dtype = queries.device, queries.dtype
        layer.last_result = result
        return result.memory.to(queries.device, queries.dtype)

    @staticmethod
    def backward(ctx, grad_memory):
        layer = ctx.layer
        started = time.perf_counter()
        grad_memory = grad_memory.detach().float()
        try:
            grad_queries, grad_temperature = layer.client.retrieve_backward(
                layer.namespace, ctx.result, grad_memory, step_values=layer.train_values)
        except FailedPrecondition as error:
            if ctx.result.has_neighbours or "retrieve handle" not in error.message:
                raise
            # The forward's state was kept at the store only (memory_only) and is gone (expired, evicted, its
            # endpoint restarted): its neighbours are searched again, with the forward's queries and T.
            again = layer.client.retrieve(layer.namespace, ctx.result.queries, layer.k, ctx.result.temperature,
                                          keep_state=True, as_tensors=True)
            grad_queries, grad_temperature = layer.client.retrieve_backward(
                layer.namespace, again, grad_memory, step_values=layer.train_values)
        layer.timer.record("retrieve_backward", time.perf_counter() - started, grad_memory.shape[0])
        return (grad_queries.to(ctx.device, ctx.dtype),
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
    mix_knn: MoNIM mode also mixes p_kNN, built from the same Retrieve's neighbours, into the output
    (p = lambda p_kNN + (1 - lambda) p_model): the values and the tokens' mixture at once.
    combiner: "fixed" (one learned lambda / gate) or "adaptive" (an AdaptiveCombiner gives lambda in
    kNN-LM mode, the gate in MoNIM mode, per position).
    """

    def __init__(self, client, namespace: str, k: int = 32, temperature: float = 1.0, gate: float = 0.05,
                 mode: str = "monim", learn_temperature: bool = True, knn_lambda: float = 0.25,
                 learn_lambda: bool = False, train_values: bool = True, mix_knn: bool = False,
                 combiner: str = "fixed"):
        super().__init__()
        if mode not in MODES:
            raise InvalidArgument(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if combiner not in COMBINERS:
            raise InvalidArgument(f"unknown combiner {combiner!r}; choose one of {', '.join(COMBINERS)}")
        if temperature <= 0 or not 0 < knn_lambda < 1:
            raise InvalidArgument("temperature must be > 0 and knn_lambda in (0, 1)")
        self.client, self.namespace, self.k, self.mode = client, namespace, k, mode
        self.train_values = train_values
        self.mix_knn = mix_knn or mode == "knnlm"
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)), requires_grad=learn_temperature)
        self._temperature_read = (None, temperature)  # ((data_ptr, version) of log T when read, T): temperature_value
        self.gate = nn.Parameter(torch.tensor(float(gate)))
        lam = math.log(knn_lambda / (1 - knn_lambda))
        self.knn_lambda_logit = nn.Parameter(torch.tensor(lam), requires_grad=learn_lambda)
        self.combiner = None
        if combiner == "adaptive":
            self.combiner = AdaptiveCombiner(k, lam if mode == "knnlm" else gate)
        self.timer = StoreTimer()
        self.last_result = None
        self.last_features = None  # [batch, seq, k + 2]: the last search's neighbour features (adaptive)
        self.last_selection = None  # (index, batch, seq) of the last forward's queries
        self.last_mean_output = None  # adaptive: the mean gate / lambda of the last forward
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
    def needs_memory_only(self) -> bool:
        """Whether a Retrieve's m is all this layer reads of it (no p_kNN of its neighbours, no adaptive
        combiner's features): then it asks for m alone (memory_only)."""
        return self.mode == "monim" and not self.mix_knn and self.combiner is None

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    def temperature_value(self) -> float:
        """T as a float for the store, read from the parameter's device only when log T changed since the
        last read (an optimizer's step or a load changes its version): a decoding step on a GPU then makes
        the host wait for nothing but the store's finite check."""
        parameter = self.log_temperature
        seen = (parameter.data_ptr(), parameter._version)
        if self._temperature_read[0] != seen:
            self._temperature_read = (seen, math.exp(float(parameter.detach())))
        return self._temperature_read[1]

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
        self.last_selection = (index, batch, seq)
        if queries.shape[0] == 0:
            self.last_result = None
            return hidden.new_zeros(batch, seq, self.value_dim)
        values = hidden.new_zeros((), dtype=torch.float32).requires_grad_(self.train_values and torch.is_grad_enabled())
        memory = RetrieveFunction.apply(queries, self.temperature, values, self)
        self._record_features(self.last_result.distances, self.last_result.ids, self.last_result.tokens, index,
                              batch, seq, hidden.device)
        return self._scatter(memory, index, batch, seq)

    @staticmethod
    def _scatter(rows: torch.Tensor, index: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor:
        """[M, width] at the selected positions -> [batch, seq, width] with zeros elsewhere."""
        if index is None:
            return rows.reshape(batch, seq, -1)
        out = rows.new_zeros(batch * seq, rows.shape[-1])
        return out.index_copy(0, index, rows).reshape(batch, seq, -1)

    def _record_features(self, distances, ids, tokens, index, batch, seq, device) -> None:
        if self.combiner is None:
            return
        features = AdaptiveCombiner.neighbour_features(*(torch.as_tensor(array).to(device)
                                                         for array in (distances, ids, tokens)))
        self.last_features = self._scatter(features, index, batch, seq)

    def gate_at(self, lm_logits: torch.Tensor | None) -> torch.Tensor:
        """MoNIM mode's gate: the scalar g, or with the adaptive combiner g per position [batch, seq, 1]
        from the last Retrieve's neighbours and the LM's logits without the memory [batch, seq, vocab]."""
        if self.combiner is None:
            return self.gate
        gate = self.combiner(self.last_features, AdaptiveCombiner.lm_features(lm_logits)).unsqueeze(-1)
        self.last_mean_output = float(gate.detach().mean())
        return gate

    def lambda_at(self, logits: torch.Tensor) -> torch.Tensor:
        """lambda of the kNN-LM mixture: the scalar, or per position [batch, seq, 1] (adaptive)."""
        if self.combiner is None or self.mode == "monim":
            return self.knn_lambda
        lam = torch.sigmoid(self.combiner(self.last_features, AdaptiveCombiner.lm_features(logits))).unsqueeze(-1)
        self.last_mean_output = float(lam.detach().mean())
        return lam

    def neighbour_distribution(self, vocab_size: int, device=None) -> torch.Tensor | None:
        """p_kNN [batch, seq, vocab] of the last forward's neighbours (MoNIM mode with mix_knn), alpha
        computed here from their distances with this layer's T (so T gets this path's gradient too);
        None if that forward had no query."""
        r = self.last_result
        if r is None:
            return None
        index, batch, seq = self.last_selection
        return self._distribution(r.ids, r.distances, r.weights, r.tokens, vocab_size, index, batch, seq, device)

    def _distribution(self, ids, distances, weights, tokens, vocab_size, index, batch, seq, device):
        # numpy (a search's) or tensors (a Retrieve's with as_tensors, already on the device)
        ids, distances, weights, tokens = (torch.as_tensor(array).to(device) for array in (ids, distances, weights,
                                                                                            tokens))
        distances = distances.masked_fill(ids < 0, 0.0)
        scores = -distances / self.temperature + weights.clamp_min(1e-30).log()
        scores = scores.masked_fill(ids < 0, float("-inf"))
        alpha = torch.nan_to_num(torch.softmax(scores, dim=1), nan=0.0)
        tokens = tokens.long().clamp_min(0)
        p_knn = torch.zeros(ids.shape[0], vocab_size, device=device).scatter_add_(1, tokens, alpha)
        return self._scatter(p_knn, index, batch, seq)

    def knn_distribution(self, hidden: torch.Tensor, vocab_size: int, mask: torch.Tensor | None = None):
        """kNN-LM: p_kNN [batch, seq, vocab] from the neighbours' tokens, alpha = softmax(-d/T + log w)
        computed here (so T gets its gradient locally). Padding positions get all zeros."""
        queries, index = self._selected(hidden, mask)
        batch, seq = hidden.shape[:2]
        started = time.perf_counter()
        reader = self.decoding if self.decoding is not None and not torch.is_grad_enabled() else self.client
        found = reader.search(self.namespace, queries.detach().float(), self.k, return_weights=True, as_tensors=True)
        self.timer.record("search", time.perf_counter() - started, queries.shape[0])
        self._record_features(found.distances, found.ids, found.tokens, index, batch, seq, hidden.device)
        return self._distribution(found.ids, found.distances, found.weights, found.tokens, vocab_size, index, batch,
                                  seq, hidden.device)

    def mix_log_probs(self, logits: torch.Tensor, p_knn: torch.Tensor) -> torch.Tensor:
        """log(lambda * p_kNN + (1 - lambda) * p_LM) [batch, seq, vocab]; positions without
        neighbours keep p_LM. The result serves as logits (its softmax is the mixture)."""
        p_lm = torch.softmax(logits.float(), dim=-1)
        lam = self.lambda_at(logits) * (p_knn.sum(-1, keepdim=True) > 0)
        return torch.log((lam * p_knn + (1 - lam) * p_lm).clamp_min(1e-30)).to(logits.dtype)
