"""Decoding reads on a GPU store, eager against replayed CUDA graphs (datastore/search_graphs.py).

One store (``--rows`` keys of width ``--dim``, float16 on the GPU, values of width ``--value-dim``),
searched through ``MemoryClient(":memory:")`` (the router over one shard, in this process) with the
store's graphs off and on, alternately, ``--rounds`` rounds of ``--calls`` searches each; and, as the
floor, the bare float16 matrix-vector product + top-k of the same keys. Printed per cell: p50 / p99
ms of each way and eager / graph.

    python -m bench.search_graphs_bench [--rows 1000000] [--dim 768] [--value-dim 768]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import numpy as np
import torch
from monim.datastore import search_graphs

from monim import MemoryClient

SEED = 7
CELLS = [(1, 32, False), (1, 32, True), (4, 32, False), (16, 32, False), (1, 1024, False)]


def _times(call, calls: int) -> list[float]:
    out = []
    for i in range(calls):
        torch.cuda.synchronize()
        started = time.perf_counter()
        call(i)
        torch.cuda.synchronize()
        out.append(time.perf_counter() - started)
    return out


def _ms(times: list[float]) -> str:
    return f"{1e3 * np.percentile(times, 50):.3f} / {1e3 * np.percentile(times, 99):.3f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--value-dim", type=int, default=768)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--calls", type=int, default=150)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    rng = np.random.default_rng(SEED)
    keys = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    print(f"# python -m bench.search_graphs_bench {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"# {args.rows:,} x {args.dim} float16 keys, values {args.value_dim}; {torch.cuda.get_device_name()}; "
          f"torch {torch.__version__}; {platform.machine()}; p50 / p99 ms of {args.rounds} x {args.calls} calls")
    with MemoryClient(":memory:", device="cuda") as client:
        client.create_namespace("bench", dim=args.dim, value_dim=args.value_dim, max_k=1024)
        for start in range(0, args.rows, 65536):
            end = min(args.rows, start + 65536)
            client.add("bench", keys[start:end], np.arange(start, end) % 50000, values=keys[start:end, :args.value_dim])
        store = client._store.runtime.shards[0].stores["bench"]
        stored = store.rows.keys[: args.rows]
        queries = {b: [keys[rng.integers(0, args.rows, b)] + 0.1 for _ in range(64)] for b in {c[0] for c in CELLS}}
        print(f"{'B':>3} {'k':>5} {'values':>6} | {'bare matvec+top-k':>17} | {'eager':>15} | {'graph':>15} | eager/graph")
        for batch, k, values in CELLS:
            on_gpu = [torch.from_numpy(q).cuda().half() for q in queries[batch]]
            keep = min(2 * k + 16, args.rows)
            bare = _times(lambda i: torch.topk((on_gpu[i % 64] @ stored.T).float(), keep, dim=1), args.calls)
            ways = {False: [], True: []}
            for _ in range(args.rounds):
                for enabled in (False, True):
                    search_graphs.ENABLED = enabled
                    ways[enabled] += _times(lambda i: client.search("bench", queries[batch][i % 64], k,
                                                                    return_values=values), args.calls)
            ratio = np.percentile(ways[False], 50) / np.percentile(ways[True], 50)
            print(f"{batch:>3} {k:>5} {str(values):>6} | {_ms(bare):>17} | {_ms(ways[False]):>15} | "
                  f"{_ms(ways[True]):>15} | {ratio:.2f}x")
        print(f"# graphs captured {store.graphs.captures}, replayed {store.graphs.replays}, "
              f"failure {store.graphs.failure}")


if __name__ == "__main__":
    main()
