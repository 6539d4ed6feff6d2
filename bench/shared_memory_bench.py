"""Large calls through the service with their tensors in messages against through shared memory, in one run.

One embedded deployment (one Ray shard actor, its read endpoint, a gRPC front end, all on this host)
holds ``--rows`` keys of width ``--dim`` with values of ``--value-dim`` (Adam); the same rows are in an
in-process store (``MemoryClient(":memory:")``). Two clients of the deployment call it: one with
``shared_memory=False`` (every tensor in gRPC messages) and one with shared memory on
(protos/shared_memory.py: the large tensors through regions of /dev/shm). Round by round, each cell
on the three (medians, ms): Search of ``--batch`` queries at each k, the training step (Retrieve with
keep_state + RetrieveBackward) at each k, ApplyGradients and Add of ``--write-rows`` rows.

    python -m bench.shared_memory_bench [--rows 200000] [--dim 768] [--value-dim 768] [--batch 4096]
                                        [--ks 32,1024] [--write-rows 65536] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time

import numpy as np
import torch

from monim import MemoryClient


def _timed(call, repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return 1e3 * float(np.median(times))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.shared_memory_bench", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--value-dim", type=int, default=768)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--ks", type=lambda text: [int(k) for k in text.split(",")], default=[32, 1024])
    p.add_argument("--write-rows", type=int, default=65_536)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cpu", help="the in-process store's device")
    args = p.parse_args(argv)
    from monim.workers.embedded import EmbeddedStore

    print(f"# {shlex.join(['python', '-m', 'bench.shared_memory_bench', *sys.argv[1:]])}")
    print(f"# {args.rows:,} x {args.dim} keys, values {args.value_dim}; B={args.batch}; {os.cpu_count()} CPUs, "
          f"{platform.machine()}, torch {torch.__version__}, in-process device {args.device}")
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    values = 0.02 * rng.standard_normal((args.rows, args.value_dim), dtype=np.float32)
    tokens = rng.integers(0, 50_000, args.rows).astype(np.int32)
    queries = keys[rng.integers(0, args.rows, args.batch)] + 0.01 * rng.standard_normal((args.batch, args.dim),
                                                                                        dtype=np.float32)
    grad = rng.standard_normal((args.batch, args.value_dim), dtype=np.float32)
    write = min(args.write_rows, args.rows)
    ids = np.arange(write)
    grads = 1e-3 * rng.standard_normal((write, args.value_dim), dtype=np.float32)
    with EmbeddedStore(shards=1, num_cpus=max(2, os.cpu_count() or 2)) as store, \
            MemoryClient(store.address, timeout_s=600) as shared, \
            MemoryClient(store.address, timeout_s=600, shared_memory=False) as messages, \
            MemoryClient(":memory:", device=args.device) as local:
        for client in (shared, local):
            client.create_namespace("bench", dim=args.dim, value_dim=args.value_dim, max_k=max(args.ks),
                                    optimizer="adam", lr=1e-3)
            for start in range(0, args.rows, 65_536):
                client.add("bench", keys[start:start + 65_536], tokens[start:start + 65_536],
                           values=values[start:start + 65_536])
        ways = {"in-process": local, "messages": messages, "shared memory": shared}

        def step(client, k):
            def call():
                result = client.retrieve("bench", queries, k, 1.0, keep_state=True)
                client.retrieve_backward("bench", result, grad)
            return call

        cells = {}
        for k in args.ks:
            cells[f"Search B={args.batch}, k={k}"] = lambda c, k=k: lambda: c.search("bench", queries, k)
            cells[f"Retrieve+backward B={args.batch}, k={k}"] = lambda c, k=k: step(c, k)
        cells[f"ApplyGradients of {write:,} rows"] = lambda c: lambda: c.apply_gradients("bench", ids, grads)
        cells[f"Add of {write:,} rows with values"] = lambda c: lambda: c.add(  # to a namespace of their own
            "adds", keys[:write], tokens[:write], values=values[:write])
        results = {cell: {way: [] for way in ways} for cell in cells}
        for _ in range(args.rounds):
            for cell, make in cells.items():
                for way, client in ways.items():
                    if cell.startswith("Add"):  # the searched rows stay as they are
                        for each in (local, shared):
                            if "adds" in [c.name for c in each.list_namespaces()]:
                                each.drop_namespace("adds")
                            each.create_namespace("adds", dim=args.dim, value_dim=args.value_dim)
                    results[cell][way].append(_timed(make(client), args.repeats))
        usable = shared._store.shared._usable
        print(f"# shared memory used with: {usable} ({shared._store.shared.bytes_placed / 1e9:.1f} GB of answers "
              "read from regions)")
        width = max(len(cell) for cell in cells)
        print(f"{'ms (median of each round)':{width}s} | {'in-process':>16s} | {'messages':>16s} | {'shared memory':>16s}"
              " | messages / shared")
        for cell, by_way in results.items():
            best = {way: min(times) for way, times in by_way.items()}
            print(f"{cell:{width}s} | " + " | ".join(" / ".join(f"{t:7.1f}" for t in by_way[way]).rjust(16)
                                                     for way in ways)
                  + f" | {best['messages'] / best['shared memory']:.2f}x")


if __name__ == "__main__":
    main()
