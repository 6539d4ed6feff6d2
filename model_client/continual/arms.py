"""How each arm learns: the LM's own training (day 0, finetune), perplexity, and the memory arms.

Lockstep of the memory arms
---------------------------
The memory arms read a day together, batch by batch, in one order (seeded by config.seed + epoch).
At each batch, in the order of MEMORY_ARMS:
  1. knnlm steps with admission on (first pass only; it reads each day once);
  2. monim_fixed_values steps with admission off: it memorizes nothing by itself;
  3. monim steps with admission on (first pass): its hard tokens go to its namespace and, through
     ``MirroredAdds``, to monim_fixed_values's, with the same keys, tokens and initial values;
  4. each admitting arm flushes its sender: the batch's rows are stored before the next batch.
So at every step the two monim arms search the same entries (same keys, tokens and weights; only
the ids may differ) with the same model, on the same batch, and train the same parameters (log T
and the gate) with the same optimizer; the values differ only because monim's take optimizer steps
on the store and monim_fixed_values's are read, never stepped (its layer has train_values=False: the
backward gives T and the gate their gradients and steps no value row).
Each arm's admission alone could not give this: an arm admits the tokens its own output finds
hard (log p < admit_below with the memory in), so two arms with different values admit different
tokens. The knnlm arm does admit by its own mixture's log p; its entries are not the monim arms'.
The flush after every step also makes a run reproducible: without it, whether batch i's rows were
searchable at batch i + 1 depended on the background sender's timing.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from monim.model_client.continual.config import ContinualConfig
from monim.model_client.corpus import Day
from monim.model_client.hf import attach_monim
from monim.model_client.text_data import random_batches, windows
from tqdm import tqdm


def _progress(iterable, total, desc, enabled):
    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False, disable=not enabled)


def train_lm(model, tokens, steps, batch, length, lr, seed, desc, progress, observe=None) -> None:
    """AdamW steps of the whole LM on random windows of tokens; observe(inputs) sees every batch."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    device = next(model.parameters()).device
    for inputs in _progress(random_batches(tokens, batch, length, steps, seed), steps, desc, progress):
        if observe is not None:
            observe(inputs)
        inputs = inputs.to(device)
        loss = model(inputs, labels=inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, length: int, batch: int, observe=None) -> float:
    """exp(mean next-token loss) over the consecutive windows of tokens (the tail shorter than a
    window is not scored); observe(inputs) sees every batch scored."""
    model.eval()
    device = next(model.parameters()).device
    data = windows(tokens, length)
    total = count = 0.0
    for start in range(0, data.shape[0], batch):
        chunk = data[start:start + batch]
        if observe is not None:
            observe(chunk)
        chunk = chunk.to(device)
        n = chunk.shape[0] * (chunk.shape[1] - 1)
        total += float(model(chunk, labels=chunk).loss) * n
        count += n
    return float(np.exp(total / count))


class MirroredAdds:
    """A MemoryClient whose ``add`` also stores the same rows in other namespaces (a follower arm's);
    every other call goes to the client unchanged. mirrors: {namespace: [namespaces that copy it]}.
    A mirrored Add carries its own request id derived from the original's, so a retried batch lands
    once in every namespace."""

    def __init__(self, client, mirrors: dict[str, list[str]]):
        self._client, self._mirrors = client, mirrors

    def __getattr__(self, name):
        return getattr(self._client, name)

    def add(self, namespace, keys, tokens, values=None, *, request_id=None, **options):
        result = self._client.add(namespace, keys, tokens, values=values, request_id=request_id, **options)
        for number, mirror in enumerate(self._mirrors.get(namespace, ())):
            self._client.add(mirror, keys, tokens, values=values,
                             request_id=f"{request_id}-mirror{number}" if request_id else None, **options)
        return result


class MemoryArm:
    """A frozen copy of the LM with a memory attached (knnlm or monim mode), in namespace
    ``demo-<name>``. fixed_values: the value rows keep their initialization (train_values=False);
    mirror_to: namespaces that receive this arm's admitted rows too. An arm that follows another
    (``follow``) admits nothing itself: its rows are the leader's."""

    def __init__(self, name: str, base, client, mode: str, config: ContinualConfig, hidden: int, *,
                 fixed_values: bool = False, mirror_to: tuple[str, ...] = ()):
        self.name, self.mode, self.config = name, mode, config
        self.client = client
        self.namespace = "demo-" + name.replace("_", "-")
        self.epochs = config.epochs if mode == "monim" else 1
        self.leader: MemoryArm | None = None
        if self.namespace in {c.name for c in client.list_namespaces()}:
            client.drop_namespace(self.namespace)
        value_dim = hidden if mode == "monim" else 0
        client.create_namespace(self.namespace, dim=hidden, value_dim=value_dim, max_k=max(config.k, 32),
                                optimizer="adam", lr=config.monim_value_lr)
        self.model = copy.deepcopy(base)
        for param in self.model.parameters():
            param.requires_grad_(False)
        temperature = config.temperature or hidden / 8
        admit_below = config.admit_below
        if mode == "knnlm" and config.knnlm_admit_below is not None:
            admit_below = config.knnlm_admit_below
        layer_client = MirroredAdds(client, {self.namespace: list(mirror_to)}) if mirror_to else client
        self.handle = attach_monim(self.model, layer_client, self.namespace, k=config.k, mode=mode,
                                   admit_below=admit_below, knn_lambda=config.knn_lambda, learn_lambda=True,
                                   temperature=temperature, gate=config.monim_gate, source="demo",
                                   mix_knn=config.mix_knn and mode == "monim",
                                   combiner=config.monim_combiner if mode == "monim" else config.knnlm_combiner,
                                   train_values=not fixed_values)
        # log T; the gate (monim) or lambda (knnlm, and monim with mix_knn); the adaptive combiner's MLP.
        # A parameter the arm's mode leaves out of the loss gets no gradient, and Adam leaves it alone.
        trained = [p for p in self.model.monim.parameters() if p.requires_grad]
        self.layer_optimizer = torch.optim.Adam(trained, lr=config.monim_layer_lr)
        self.steps = 0

    def follow(self, leader: "MemoryArm") -> None:
        """Takes its entries from leader's admission (the leader must mirror its adds to this arm)."""
        self.leader = leader

    @property
    def admits(self) -> bool:
        return self.leader is None

    def step(self, inputs: torch.Tensor, admitting: bool) -> None:
        """One training step on inputs int64 [batch, length]; with admitting (and no leader) the hard
        tokens go to the store, and are stored when this returns."""
        self.handle.admission(admitting and self.admits)
        # Dropout (a pretrained --model may have some) draws the same masks in every arm at a step.
        torch.manual_seed(self.config.seed * 1_000_003 + self.steps)
        self.model.train()
        loss = self.model(inputs.to(next(self.model.parameters()).device), labels=inputs).loss
        self.layer_optimizer.zero_grad()
        loss.backward()  # monim mode: the store updates the value rows here
        self.layer_optimizer.step()
        self.steps += 1
        if self.handle.admitting:
            self.handle.flush()

    def counters(self) -> dict:
        return {"seen": self.handle.tokens_seen, "admitted": self.handle.tokens_admitted, "store_s": self.store_seconds(),
                "steps": self.steps}

    def figures(self, before: dict, admission_before: dict) -> dict:
        """The day's figures: admission (the leader's, for a follower), store time per step, memory
        rows, and the learned T, lambda and gate."""
        source = self.leader or self
        seen = source.handle.tokens_seen - admission_before["seen"]
        admitted = source.handle.tokens_admitted - admission_before["admitted"]
        layer = self.model.monim
        return {
            "tokens_seen": seen,
            "tokens_admitted": admitted,
            "admission_rate": admitted / max(1, seen),
            "store_ms_per_step": 1e3 * (self.store_seconds() - before["store_s"]) / max(1, self.steps - before["steps"]),
            "memory_rows": self.client.describe_namespace(self.namespace).rows,
            "temperature": float(layer.temperature.detach()),
            # With the adaptive combiner: the mean over the last step's positions of its lambda / gate.
            "lambda": (layer.last_mean_output if layer.combiner is not None and self.mode == "knnlm"
                       else float(layer.knn_lambda.detach())),
            "gate": (layer.last_mean_output if layer.combiner is not None and self.mode == "monim"
                     else float(layer.gate.detach())),
        }

    def store_seconds(self) -> float:
        return sum(s["total_s"] for s in self.handle.layer.timer.summary().values())

    def close(self) -> None:
        self.handle.detach()


def learn_day(arms: list[MemoryArm], day_index: int, day: Day, tokens: torch.Tensor, progress: bool,
              observe=None) -> dict[str, dict]:
    """The memory arms read one day in lockstep (see the module's docstring); arms in MEMORY_ARMS order.
    tokens: int64 [N], the day's text they read. observe(arm, purpose, day_index, inputs) sees every
    batch an arm steps on, purpose "memorize" (admission on) or "train". Returns {arm: figures}."""
    config = arms[0].config
    data = windows(tokens, config.length)
    before = {arm.name: arm.counters() for arm in arms}
    for epoch in range(max(arm.epochs for arm in arms)):
        taking_part = [arm for arm in arms if epoch < arm.epochs]
        order = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(config.seed + epoch))
        batches = [data[order[i:i + config.batch]] for i in range(0, data.shape[0], config.batch)]
        names = ", ".join(arm.name for arm in taking_part)
        for inputs in _progress(batches, len(batches), f"{names} on {day.name}, pass {epoch + 1}", progress):
            for arm in taking_part:
                admitting = epoch == 0 and arm.admits
                if observe is not None:
                    observe(arm.name, "memorize" if admitting else "train", day_index, inputs)
                arm.step(inputs, admitting=epoch == 0)
    figures = {}
    for arm in arms:
        arm.handle.admission(False)
        arm.model.eval()
        figures[arm.name] = arm.figures(before[arm.name], before[(arm.leader or arm).name])
    return figures
