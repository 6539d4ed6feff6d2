"""Cost of the learnable memory next to the data, against plain search, in one run on the same data.

For each k, on the in-process store (the router over one shard; ``--service`` adds the
same through MemoryClient -> gRPC -> router -> shard actors):
  search            exact top-k (ids, distances, tokens)
  retrieve          search + attention + sum_i alpha_i v_i            (the forward)
  retrieve+backward the forward, then dL/dq, dL/dT and an Adam step on the value rows
and the ratios retrieve/search and (retrieve+backward)/search; then the rows/s
of ApplyGradients (Adam) at a few batch sizes.

    python -m bench.memory_bench                       # B 4096, k 32 and 1024, dim 768, value_dim 768
    python -m bench.memory_bench --device cuda         # on a GPU (torch backend)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch
from monim.datastore import NamespaceConfig


def timed(call, budget_s: float, max_repeats: int):
    """Warm-up once, then (median seconds per call, calls) over up to max_repeats calls or budget_s."""
    call()
    times = []
    started = time.perf_counter()
    while len(times) < max_repeats and (not times or time.perf_counter() - started < budget_s):
        t0 = time.perf_counter()
        call()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), len(times)


class InProcess:
    """The in-process store: the router over one shard (what MemoryClient(":memory:") runs)."""

    def __init__(self, config, device):
        from monim.model_client.local_store import LocalMemory

        self.store = LocalMemory(device)
        self.name = config.name
        self.store.create_namespace(config)

    def add(self, keys, tokens, values):
        for start in range(0, keys.shape[0], 50_000):
            self.store.add(self.name, keys[start:start + 50_000], tokens[start:start + 50_000],
                           values[start:start + 50_000])

    def search(self, q, k):
        return self.store.search(self.name, q, k)

    def retrieve(self, q, k):
        return self.store.retrieve(self.name, q, k, 1.0)

    def backward(self, r, grad):
        return self.store.retrieve_backward(self.name, r.queries, r.ids, r.alpha, r.distances, grad, r.temperature)

    def apply(self, ids, grads):
        return self.store.apply_gradients(self.name, ids, grads)


class Service:
    def __init__(self, config, shards, shard_cpus=1.0):
        from monim.model_client import MemoryClient
        from monim.workers.embedded import EmbeddedStore

        self.embedded = EmbeddedStore(shards=shards, num_cpus=max(2, int(shards * shard_cpus)), shard_cpus=shard_cpus)
        self.client = MemoryClient(self.embedded.address, timeout_s=600)
        self.name = config.name
        self.client.create_namespace(config.name, dim=config.dim, value_dim=config.value_dim, max_k=config.max_k,
                                     optimizer="adam", lr=1e-3)

    def add(self, keys, tokens, values):
        self.client.add(self.name, keys, tokens, values=values)

    def search(self, q, k):
        return self.client.search(self.name, q, k)

    def retrieve(self, q, k):
        return self.client.retrieve(self.name, q, k, 1.0)

    def backward(self, r, grad):
        return self.client.retrieve_backward(self.name, r, grad)

    def apply(self, ids, grads):
        return self.client.apply_gradients(self.name, ids, grads)

    def close(self):
        self.client.close()
        self.embedded.stop()


def run(args) -> dict:
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((args.rows, args.dim)).astype(np.float32)
    values = (0.02 * rng.standard_normal((args.rows, args.value_dim))).astype(np.float32)
    tokens = rng.integers(0, 50_000, args.rows)
    queries = (keys[rng.integers(0, args.rows, args.batch)] + 0.1 * rng.standard_normal((args.batch, args.dim))).astype(
        np.float32)
    grad = rng.standard_normal((args.batch, args.value_dim)).astype(np.float32)
    config = NamespaceConfig("bench", dim=args.dim, value_dim=args.value_dim, max_k=max(args.ks, default=32),
                             optimizer={"name": "adam", "lr": 1e-3})
    targets = {"in-process": InProcess(config, args.device)}
    if args.service:
        targets["service"] = Service(config, args.shards, args.shard_cpus)
    results = {"rows": args.rows, "batch": args.batch, "dim": args.dim, "value_dim": args.value_dim, "cells": []}
    for name, target in targets.items():
        target.add(keys, tokens, values)
        for k in args.ks:
            search_s, n1 = timed(lambda: target.search(queries, k), args.budget_s, args.repeats)
            retrieve_s, n2 = timed(lambda: target.retrieve(queries, k), args.budget_s, args.repeats)
            both_s, n3 = timed(lambda: target.backward(target.retrieve(queries, k), grad), args.budget_s, args.repeats)
            cell = {"target": name, "k": k, "search_s": search_s, "retrieve_s": retrieve_s,
                    "retrieve_backward_s": both_s, "calls": [n1, n2, n3]}
            results["cells"].append(cell)
            print(f"{name:>10} k={k:<5} search {search_s * 1e3:9.1f} ms | retrieve {retrieve_s * 1e3:9.1f} ms "
                  f"({retrieve_s / search_s:4.2f}x) | retrieve+backward {both_s * 1e3:9.1f} ms "
                  f"({both_s / search_s:4.2f}x)", flush=True)
        for n in args.apply_batches:
            ids = rng.integers(0, args.rows, n)
            grads = rng.standard_normal((n, args.value_dim)).astype(np.float32)
            apply_s, calls = timed(lambda: target.apply(ids, grads), args.budget_s, args.repeats)
            results["cells"].append({"target": name, "apply_rows": n, "apply_s": apply_s, "calls": [calls]})
            print(f"{name:>10} ApplyGradients (adam) {n:>7} rows: {apply_s * 1e3:8.1f} ms = {n / apply_s:12,.0f} rows/s",
                  flush=True)
        if hasattr(target, "close"):
            target.close()
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--ks", default="32,1024")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--value-dim", type=int, default=768)
    parser.add_argument("--apply-batches", default="1024,16384,131072")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--service", action="store_true", help="also measure through gRPC and 2 shard actors")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--shard-cpus", type=float, default=1.0,
                        help="CPUs (so torch and faiss threads) each shard actor holds; the in-process store uses all")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=10.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    args.ks = [int(k) for k in args.ks.split(",") if k]  # --ks "": ApplyGradients alone
    args.apply_batches = [int(n) for n in args.apply_batches.split(",")]
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"# {' '.join(['python -m bench.memory_bench', *sys.argv[1:]])}")
    print(f"# {args.rows} rows, B={args.batch}, dim={args.dim}, value_dim={args.value_dim}; device {args.device} "
          f"({device}); {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads")
    started = time.perf_counter()
    results = run(args)
    print(f"# total {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
