"""Continual learning, day by day, the way the MoNIM paper runs it (the demo's experiment).

A small LM is trained on day 0 (or a local Hugging Face LM is taken as it is). Then each
day's training text arrives and four arms learn from it:
  frozen    the LM as it was after day 0, no memory
  knnlm     the frozen LM + a kNN-LM memory: reads the day with admission (log p < -1.5);
            values are not used, p = lambda p_kNN + (1 - lambda) p_LM
  monim     the frozen LM + a MoNIM layer: reads the day with admission and trains the
            memory (value rows on the store, temperature and gate here) on it
  finetune  the LM itself fine-tuned on the day's text (the forgetting baseline)
After each day every arm is evaluated on the held-out text of every day seen so far.
Day 0 is read by the memory arms too, so the memory holds what the model found hard there.
"""

from __future__ import annotations

import copy
import dataclasses
import time

import numpy as np
import torch
from monim.model_client.corpus import Day
from monim.model_client.hf import attach_monim
from monim.model_client.text_data import random_batches, windows
from tqdm import tqdm

ARMS = ("frozen", "knnlm", "monim", "finetune")


@dataclasses.dataclass
class ContinualConfig:
    length: int = 128          # tokens per training / evaluation window
    batch: int = 16
    day0_steps: int = 2000     # LM training on day 0 (0 for a pretrained --model)
    day0_lr: float = 3e-3
    finetune_lr: float = 3e-3
    finetune_epochs: int = 4   # passes of the finetune arm over each new day's text
    epochs: int = 2            # passes of the monim arm over each day's text (admission in the first)
    k: int = 16
    admit_below: float = -1.5
    temperature: float = 0.0   # initial T of both memory arms; 0: hidden size / 8 (distances are squared L2)
    knn_lambda: float = 0.25   # initial lambda of the kNN-LM mixture (learned while reading)
    monim_gate: float = 1.0
    monim_value_lr: float = 3e-3
    monim_layer_lr: float = 3e-2
    memory_day_tokens: int = 48_000  # the memory arms read at most this much of a day (day 0's is larger)
    eval_batch: int = 16
    seed: int = 0


class ByteTokenizer:
    vocab_size = 257

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)


class HFTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer(text)["input_ids"], dtype=torch.int64)


def _progress(iterable, total, desc, enabled):
    return tqdm(iterable, total=total, desc=desc, unit="batch", leave=False, disable=not enabled)


def train_lm(model, tokens, steps, batch, length, lr, seed, desc, progress) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    device = next(model.parameters()).device
    for inputs in _progress(random_batches(tokens, batch, length, steps, seed), steps, desc, progress):
        inputs = inputs.to(device)
        loss = model(inputs, labels=inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, length: int, batch: int) -> float:
    model.eval()
    device = next(model.parameters()).device
    data = windows(tokens, length)
    total = count = 0.0
    for start in range(0, data.shape[0], batch):
        chunk = data[start:start + batch].to(device)
        n = chunk.shape[0] * (chunk.shape[1] - 1)
        total += float(model(chunk, labels=chunk).loss) * n
        count += n
    return float(np.exp(total / count))


class MemoryArm:
    """A frozen copy of the LM with a memory attached (knnlm or monim mode)."""

    def __init__(self, base, client, namespace, mode, config: ContinualConfig, hidden: int):
        self.client, self.namespace, self.mode, self.config = client, namespace, mode, config
        if namespace in {c.name for c in client.list_namespaces()}:
            client.drop_namespace(namespace)
        value_dim = hidden if mode == "monim" else 0
        client.create_namespace(namespace, dim=hidden, value_dim=value_dim, max_k=max(config.k, 32),
                                optimizer="adam", lr=config.monim_value_lr)
        self.model = copy.deepcopy(base)
        for param in self.model.parameters():
            param.requires_grad_(False)
        temperature = config.temperature or hidden / 8
        self.handle = attach_monim(self.model, client, namespace, k=config.k, mode=mode,
                                   admit_below=config.admit_below, knn_lambda=config.knn_lambda, learn_lambda=True,
                                   temperature=temperature, gate=config.monim_gate, source="demo")
        layer = self.model.monim
        trained = [layer.log_temperature, layer.gate] if mode == "monim" else [layer.log_temperature,
                                                                               layer.knn_lambda_logit]
        self.layer_optimizer = torch.optim.Adam(trained, lr=config.monim_layer_lr)
        self.store_seconds = []

    def learn(self, day: Day, tokens: torch.Tensor, progress: bool) -> dict:
        """Reads the day once with admission, learning T and lambda (knnlm) or T, the gate and the
        value rows on the store (monim); monim makes more passes without admission.
        Returns admission and timing figures for the day."""
        config = self.config
        seen, admitted = self.handle.tokens_seen, self.handle.tokens_admitted
        data = windows(tokens, config.length)
        device = next(self.model.parameters()).device
        epochs = config.epochs if self.mode == "monim" else 1
        steps = 0
        started_store = self._store_total()
        for epoch in range(epochs):
            self.handle.admission(epoch == 0)
            order = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(config.seed + epoch))
            batches = [data[order[i:i + config.batch]] for i in range(0, data.shape[0], config.batch)]
            for inputs in _progress(batches, len(batches), f"{self.mode} {day.name} pass {epoch + 1}", progress):
                inputs = inputs.to(device)
                self.model.train()
                loss = self.model(inputs, labels=inputs).loss
                self.layer_optimizer.zero_grad()
                loss.backward()  # monim: the store updates the value rows here
                self.layer_optimizer.step()
                steps += 1
            self.handle.flush()
        self.handle.admission(False)
        self.model.eval()
        return {
            "tokens_seen": self.handle.tokens_seen - seen,
            "tokens_admitted": self.handle.tokens_admitted - admitted,
            "store_ms_per_step": 1e3 * (self._store_total() - started_store) / max(1, steps),
            "memory_rows": self.client.describe_namespace(self.namespace).rows,
            "temperature": float(self.model.monim.temperature.detach()),
            "lambda": float(self.model.monim.knn_lambda.detach()),
            "gate": float(self.model.monim.gate.detach()),
        }

    def _store_total(self) -> float:
        return sum(s["total_s"] for s in self.handle.layer.timer.summary().values())

    def close(self) -> None:
        self.handle.detach()


def run_continual(client, days: list[Day], base_model, tokenizer, config: ContinualConfig, progress: bool = True,
                  on_day=None) -> dict:
    """Runs every arm over the days; returns the results dict (see model_client/demo.py)."""
    torch.manual_seed(config.seed)
    train_tokens = [tokenizer.encode(d.train) for d in days]
    held_out_tokens = [tokenizer.encode(d.held_out) for d in days]
    hidden = int(getattr(base_model.config, "hidden_size", None) or base_model.config.n_embd)
    started = time.perf_counter()
    if config.day0_steps:
        train_lm(base_model, train_tokens[0], config.day0_steps, config.batch, config.length, config.day0_lr,
                 config.seed, f"day 0: training the LM on {days[0].name}", progress)
    base_model.eval()
    for param in base_model.parameters():
        param.requires_grad_(False)
    finetuned = copy.deepcopy(base_model)
    for param in finetuned.parameters():
        param.requires_grad_(True)
    memory = {"knnlm": MemoryArm(base_model, client, "demo-knnlm", "knnlm", config, hidden),
              "monim": MemoryArm(base_model, client, "demo-monim", "monim", config, hidden)}
    models = {"frozen": base_model, "knnlm": memory["knnlm"].model, "monim": memory["monim"].model,
              "finetune": finetuned}
    results = {"days": [d.name for d in days], "config": dataclasses.asdict(config),
               "arms": {arm: {"new_day_ppl": [], "day0_ppl": [], "ppl_by_day": []} for arm in ARMS},
               "memory": {arm: {"rows": [], "admission_rate": [], "store_ms_per_step": [], "temperature": [],
                                "lambda": [], "gate": []} for arm in memory},
               "timing_s": []}
    for index, day in enumerate(days):
        for arm, learner in memory.items():
            figures = learner.learn(day, train_tokens[index][-config.memory_day_tokens:], progress)
            results["memory"][arm]["rows"].append(figures["memory_rows"])
            results["memory"][arm]["admission_rate"].append(figures["tokens_admitted"] / max(1, figures["tokens_seen"]))
            for name in ("store_ms_per_step", "temperature", "lambda", "gate"):
                results["memory"][arm][name].append(figures[name])
        if index > 0:
            steps = config.finetune_epochs * max(1, train_tokens[index].numel() // (config.batch * config.length))
            train_lm(finetuned, train_tokens[index], steps, config.batch, config.length, config.finetune_lr,
                     config.seed + index, f"finetune on {day.name}", progress)
        for arm, model in models.items():
            ppl = [perplexity(model, held_out_tokens[d], config.length, config.eval_batch) for d in range(index + 1)]
            record = results["arms"][arm]
            record["ppl_by_day"].append(ppl)
            record["day0_ppl"].append(ppl[0])
            record["new_day_ppl"].append(float(np.mean(ppl[1:])) if index else ppl[0])
        results["timing_s"].append(time.perf_counter() - started)
        if on_day is not None:
            on_day(index, results)
    for learner in memory.values():
        learner.close()
    return results
