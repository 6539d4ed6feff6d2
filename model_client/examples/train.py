"""Train a small GPT-2 with a MoNIM memory in the loop.

    python -m monim.model_client.examples.train --text README.md docs/ --steps 300
    python -m monim.model_client.examples.train --address 127.0.0.1:50051 --text corpus/ --steps 1000

Byte-level tokens, a GPT-2 from a config (no download). Each step: forward (Retrieve
on the store), backward (the store updates the value rows), an AdamW step on the model,
and admission of the tokens with log p < -1.5 (sent in the background). Prints loss,
memory rows and store time per step, with a progress bar.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch
from monim.model_client.client import MemoryClient
from monim.model_client.hf import attach_monim
from monim.model_client.text_data import encode, random_batches, read_texts, tiny_gpt2
from tqdm import tqdm


@dataclasses.dataclass
class TrainResult:
    losses: list
    memory_rows: list
    store_seconds: list
    stats: dict


def train(model, client: MemoryClient, namespace: str, tokens: torch.Tensor, steps: int = 300, batch: int = 8,
          length: int = 64, lr: float = 3e-3, k: int = 16, mode: str = "monim", admit_below: float = -1.5,
          progress: bool = True, log_every: int = 25, seed: int = 0) -> TrainResult:
    """Trains model and memory together; returns per-step losses, memory sizes and store seconds."""
    handle = attach_monim(model, client, namespace, k=k, mode=mode, admit_below=admit_below, source="train")
    handle.admission(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses, rows, store_seconds = [], [], []
    bar = tqdm(random_batches(tokens, batch, length, steps, seed), total=steps, disable=not progress,
               desc="train", unit="step")
    try:
        for step, inputs in enumerate(bar):
            model.train()
            before = sum(s["total_s"] for s in handle.layer.timer.summary().values())
            loss = model(inputs, labels=inputs).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            after = sum(s["total_s"] for s in handle.layer.timer.summary().values())
            losses.append(float(loss.detach()))
            store_seconds.append(after - before)
            if step % log_every == 0 or step == steps - 1:
                handle.flush()
                rows.append((step, client.describe_namespace(namespace).rows))
                bar.set_postfix(loss=f"{losses[-1]:.3f}", memory=rows[-1][1], store_ms=f"{1e3 * (after - before):.0f}")
        handle.flush()
        stats = handle.stats()
    finally:
        handle.detach()
    return TrainResult(losses, rows, store_seconds, stats)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", nargs="+", default=["README.md", "docs"], help="text files or folders")
    parser.add_argument("--address", default=":memory:", help="host:port of a monim server (default in-process)")
    parser.add_argument("--namespace", default="train-example")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--mode", choices=["monim", "knnlm"], default="monim")
    args = parser.parse_args(argv)
    text = read_texts(args.text)
    tokens = encode(text)
    model = tiny_gpt2()
    client = MemoryClient(args.address)
    names = {c.name for c in client.list_namespaces()}
    if args.namespace in names:
        client.drop_namespace(args.namespace)
    client.create_namespace(args.namespace, dim=model.config.n_embd, value_dim=model.config.n_embd,
                            optimizer="adam", lr=1e-3)
    started = time.perf_counter()
    result = train(model, client, args.namespace, tokens, steps=args.steps, batch=args.batch, length=args.length,
                   k=args.k, mode=args.mode)
    print(f"{len(tokens)} byte tokens; {args.steps} steps in {time.perf_counter() - started:.0f} s")
    print(f"loss {result.losses[0]:.3f} -> {sum(result.losses[-20:]) / len(result.losses[-20:]):.3f} (mean of last 20)")
    print(f"memory rows {result.memory_rows[0][1]} -> {result.memory_rows[-1][1]}, "
          f"admission rate {result.stats['admission_rate']:.0%}")
    for operation, s in result.stats["store"].items():
        print(f"store {operation}: {s['calls']} calls, p50 {s['p50_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
