"""Attaching a MoNIM layer to a Hugging Face causal LM.

    h = attach_monim(model, client, "gpt2", k=32, mode="monim", admit_below=-1.5)
    h.admission(True); loss = model(input_ids, labels=input_ids).loss; loss.backward(); h.flush()
    h.stats(); h.detach()

The chosen block's FFN (``mlp``; the last block by default) is wrapped so that its
output becomes FFN(x) + g * m(x), with x the FFN's input (MoNIM mode); in kNN-LM
mode the FFN is unchanged and the LM head's output becomes log(lambda p_kNN +
(1 - lambda) p_LM). Works in training steps and in ``model.generate`` with the KV
cache (then only the new positions query the store: one query per sequence per step).

Admission (when on): after a forward with labels, every position whose next token
has log p < admit_below is sent to the store with its FFN input as key and the
output-embedding row of the token as value; while generating, each generated token
is judged by the log p the model gave it. Rows go through a background sender.
"""

from __future__ import annotations

import numpy as np
import torch
from monim.model_client.admission import AdmissionSender
from monim.model_client.layer import MoNIMLayer
from monim.protos.config import DEFAULT_ADMIT_BELOW
from monim.protos.errors import InvalidArgument
from torch import nn

_BLOCK_PATHS = ("transformer.h", "model.layers", "gpt_neox.layers", "model.decoder.layers", "transformer.layers")
# The norm a block applies before its FFN, and the model's final norm (GPT-2, LLaMA-style, GPT-NeoX, OPT):
# the adaptive combiner in MoNIM mode reads the LM's distribution without the memory through them.
_FFN_NORMS = ("ln_2", "post_attention_layernorm", "final_layer_norm")
_FINAL_NORM_PATHS = ("transformer.ln_f", "model.norm", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm")


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (GPT-2, LLaMA-style, GPT-NeoX, OPT)."""
    for path in _BLOCK_PATHS:
        module = model
        for name in path.split("."):
            module = getattr(module, name, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList) and len(module) and hasattr(module[0], "mlp"):
            return module
    raise InvalidArgument(f"{type(model).__name__} has no decoder blocks with an `mlp` at any of {_BLOCK_PATHS}; "
                          "attach_monim supports GPT-2 and LLaMA-style causal LMs")


def _module_at(model: nn.Module, path: str):
    module = model
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def lm_readout(model: nn.Module, block: nn.Module):
    """(the block's pre-FFN norm, the model's final norm): through them, the LM's logits without the
    memory at the block are head(final_norm(residual + FFN(x))), exact at the last block (the logit
    lens of that block elsewhere). InvalidArgument if the model has neither."""
    norm = next((getattr(block, name) for name in _FFN_NORMS if isinstance(getattr(block, name, None), nn.Module)), None)
    final = next((m for m in map(lambda path: _module_at(model, path), _FINAL_NORM_PATHS) if m is not None), None)
    if norm is None or final is None:
        raise InvalidArgument(f"combiner='adaptive' in MoNIM mode reads the LM's distribution at the memory's block, "
                              f"but {type(model).__name__} has no pre-FFN norm ({_FFN_NORMS}) or final norm "
                              f"({_FINAL_NORM_PATHS})")
    return norm, final


def hidden_size(model: nn.Module) -> int:
    config = model.config
    return int(getattr(config, "hidden_size", None) or config.n_embd)


class _MemoryFFN(nn.Module):
    """Wraps a block's FFN: returns FFN(x) + g * m(x) and shows x to the handle."""

    def __init__(self, ffn: nn.Module, handle: "MonimHandle"):
        super().__init__()
        self.ffn = ffn
        self.handle = handle

    def forward(self, x, *args, **kwargs):
        return self.handle._on_ffn(x, self.ffn(x, *args, **kwargs))


class MonimHandle:
    """What attach_monim returns: switches, statistics, flush and detach."""

    def __init__(self, model, layer: MoNIMLayer, block: nn.Module, admit_below: float, sender: AdmissionSender):
        self.model, self.layer, self.block = model, layer, block
        self.admit_below = admit_below
        self.sender = sender
        self.admitting = False
        self.tokens_seen = 0
        self.tokens_admitted = 0
        self._original_ffn = block.mlp
        self._mask = None
        self._queries = None
        self._p_knn = None
        self._labels = None
        self._input_ids = None
        self._pending = None  # decoding: (FFN input, log-probs) of the last position, judged at the next step
        self._residual = None  # the block's residual stream before its FFN (adaptive gate's LM features)
        block.mlp = _MemoryFFN(self._original_ffn, self)
        head = model.get_output_embeddings()
        self._hooks = [
            model.register_forward_pre_hook(self._before_model, with_kwargs=True),
            head.register_forward_hook(self._after_head),
            model.register_forward_hook(self._after_model),
        ]
        self._final_norm = None
        if layer.mode == "monim" and layer.combiner is not None:
            ffn_norm, self._final_norm = lm_readout(model, block)
            self._hooks.append(ffn_norm.register_forward_pre_hook(self._before_ffn_norm))

    # ----- switches -----------------------------------------------------------------
    def admission(self, on: bool = True) -> None:
        self.admitting = bool(on)
        self._pending = None

    def flush(self) -> None:
        """Waits until every admitted row is stored (raises a send error if one happened)."""
        self.sender.flush()

    def stats(self) -> dict:
        return {
            "mode": self.layer.mode,
            "temperature": float(self.layer.temperature.detach()),
            "gate": float(self.layer.gate.detach()),
            "tokens_seen": self.tokens_seen,
            "tokens_admitted": self.tokens_admitted,
            "admission_rate": self.tokens_admitted / max(1, self.tokens_seen),
            "rows_sent": self.sender.rows_sent,
            "rows_merged": self.sender.rows_merged,
            "rows_queued": self.sender.pending,
            "admission": self.sender.stats(),  # failed batches and rows, retries, the last error
            "store": self.layer.timer.summary(),
        }

    def detach(self) -> None:
        """Restores the model as it was; flushes and closes the sender."""
        for hook in self._hooks:
            hook.remove()
        self.block.mlp = self._original_ffn
        self.sender.close()
        if self.layer.decoding is not None:
            self.layer.decoding.close()
            self.layer.decoding = None

    # ----- hooks ----------------------------------------------------------------------
    def _before_model(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._labels = kwargs.get("labels")
        self._mask = kwargs.get("attention_mask")
        self._p_knn = None
        if self.admitting and self._labels is None and self._pending is not None and input_ids is not None:
            if input_ids.shape[1] == 1:  # a KV-cache decoding step: input_ids holds the token just generated
                queries, log_probs = self._pending
                tokens = input_ids[:, -1]
                self._admit(queries, tokens, log_probs.gather(1, tokens[:, None])[:, 0])
        self._pending = None
        self._input_ids = input_ids
        decoding_step = input_ids is not None and input_ids.shape[1] == 1 and not torch.is_grad_enabled()
        if decoding_step and self.layer.decoding is None and getattr(self.layer.client, "remote", False):
            self.layer.decoding = self.layer.client.decode()  # generate(): the memory reads go on one stream

    def _before_ffn_norm(self, module, args):
        self._residual = args[0]

    def _on_ffn(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        mask = None if self._mask is None else self._mask[:, -x.shape[1]:]
        self._queries = x
        vocab_size = self.model.get_output_embeddings().out_features
        if self.layer.mode == "knnlm":
            self._p_knn = self.layer.knn_distribution(x, vocab_size, mask)
            return out
        memory = self.layer(x, mask)
        if self.layer.last_result is None:  # no query (all padding)
            return out
        if self.layer.mix_knn:
            self._p_knn = self.layer.neighbour_distribution(vocab_size, x.device)
        lm_logits = None
        if self.layer.combiner is not None:
            with torch.no_grad():  # the LM's own distribution here: a feature of the gate, not trained through
                lm_logits = self.model.get_output_embeddings()(self._final_norm(self._residual + out))
        return out + self.layer.gate_at(lm_logits) * memory

    def _after_head(self, module, args, logits):
        if self._p_knn is not None and self._p_knn.shape[:2] == logits.shape[:2]:
            return self.layer.mix_log_probs(logits, self._p_knn)
        return logits

    def _after_model(self, module, args, output):
        logits = getattr(output, "logits", None)
        queries, self._queries = self._queries, None
        if not self.admitting or logits is None or queries is None:
            return
        with torch.no_grad():
            if self._labels is not None:
                targets = self._labels[:, 1:]
                valid = targets != -100
                if self._mask is not None:
                    valid &= self._mask[:, 1:].bool()
                log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                logp = log_probs.gather(2, targets.clamp_min(0).unsqueeze(2)).squeeze(2)
                self._admit(queries[:, :-1][valid], targets[valid], logp[valid])
            else:
                self._pending = (queries[:, -1].detach(), torch.log_softmax(logits[:, -1].float(), dim=-1))

    def _admit(self, queries: torch.Tensor, tokens: torch.Tensor, logp: torch.Tensor) -> None:
        """Sends the rows whose log p < admit_below: keys = FFN inputs, values = output-embedding rows."""
        hard = logp < self.admit_below
        self.tokens_seen += int(tokens.numel())
        self.tokens_admitted += int(hard.sum())
        if not hard.any():
            return
        tokens = tokens[hard]
        keys = queries[hard].detach().float().cpu().numpy()
        values = None
        if self.layer.value_dim:
            values = self.model.get_output_embeddings().weight[tokens].detach().float().cpu().numpy()
        self.sender.submit(keys, tokens.cpu().numpy().astype(np.int64), values)


def attach_monim(model: nn.Module, client, namespace: str, k: int = 32, mode: str = "monim",
                 admit_below: float = DEFAULT_ADMIT_BELOW, layer_index: int = -1, temperature: float = 1.0,
                 gate: float = 0.05, knn_lambda: float = 0.25, learn_lambda: bool = False, source: str = "",
                 merge_eps: float = 0.0, max_queue: int = 64, mix_knn: bool = False, combiner: str = "fixed",
                 train_values: bool = True) -> MonimHandle:
    """Puts a MoNIM layer on a Hugging Face causal LM; checks everything before any step runs.

    layer_index: which block's FFN (default the last). The namespace's dim must be the
    model's hidden size; in MoNIM mode its value_dim too (m is added to the FFN's output).
    The layer's parameters (log T, gate, lambda, the adaptive combiner's) are registered on the model
    as ``model.monim``, so an optimizer over model.parameters() trains them.
    mix_knn (MoNIM mode): also mix p_kNN of the same neighbours into the output distribution.
    combiner: "fixed" (a learned scalar lambda / gate) or "adaptive" (meta-k: an MLP gives lambda in
    kNN-LM mode, the gate in MoNIM mode, per position; see layer.AdaptiveCombiner).
    train_values=False: the value rows are read, never stepped (see MoNIMLayer).
    """
    blocks = find_blocks(model)
    if not -len(blocks) <= layer_index < len(blocks):
        raise InvalidArgument(f"layer_index {layer_index} is out of range for a model with {len(blocks)} blocks")
    layer = MoNIMLayer(client, namespace, k=k, temperature=temperature, gate=gate, mode=mode,
                       knn_lambda=knn_lambda, learn_lambda=learn_lambda, mix_knn=mix_knn, combiner=combiner,
                       train_values=train_values)
    if mode == "monim" and combiner == "adaptive":
        lm_readout(model, blocks[layer_index])  # fails here, before the model is touched
    size = hidden_size(model)
    if layer.dim != size:
        raise InvalidArgument(f"the model's hidden size is {size} but namespace {namespace!r} has dim {layer.dim}")
    if mode == "monim" and layer.value_dim != size:
        raise InvalidArgument(f"MoNIM mode adds m to the FFN output of width {size}, but namespace {namespace!r} has "
                              f"value_dim {layer.value_dim}")
    device = next(model.parameters()).device
    model.monim = layer.to(device)
    sender = AdmissionSender(client, namespace, source=source, max_queue=max_queue, merge_eps=merge_eps)
    return MonimHandle(model, layer, blocks[layer_index], admit_below, sender)
