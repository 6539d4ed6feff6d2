"""Our exact search against faiss's IndexFlat on the same data, in one run.

    python -m bench.faiss_compare                         # CPU: NeighborStore (faiss kernel) vs IndexFlatL2
    python -m bench.faiss_compare --device cuda           # GPU: NeighborStore (torch kernel) vs IndexFlatL2 on all CPU cores

faiss-gpu cannot be loaded on our GPU machine (it links CUDA 12), so on a GPU host
the faiss column is faiss-cpu on that host's cores. Prints queries/s of both and the
ratio ours/faiss per (B, k), and checks that both return the same nearest ids.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from monim.datastore import NamespaceConfig, NeighborStore

from bench.memory_bench import timed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--batches", default="1,64,4096")
    parser.add_argument("--ks", default="32,1024")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=5.0)
    args = parser.parse_args(argv)
    import faiss

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    max_batch = max(int(b) for b in args.batches.split(","))
    queries = keys[rng.integers(0, args.rows, max_batch)] + 0.1 * rng.standard_normal((max_batch, args.dim),
                                                                                       dtype=np.float32)
    ks = [int(k) for k in args.ks.split(",")]
    store = NeighborStore(NamespaceConfig("bench", dim=args.dim, max_k=max(ks)), device=args.device)
    for start in range(0, args.rows, 100_000):
        store.add(keys[start:start + 100_000], np.zeros(min(100_000, args.rows - start), np.int32))
    index = faiss.IndexFlatL2(args.dim)
    index.add(keys)
    print(f"# python -m bench.faiss_compare {' '.join(sys.argv[1:])}")
    print(f"# {args.rows} rows x {args.dim}, l2; ours: NeighborStore on {args.device} ({store.backend} kernel); "
          f"faiss {faiss.__version__} IndexFlatL2 on {faiss.omp_get_max_threads()} CPU threads; {os.cpu_count()} CPUs")
    print(f"{'B':>6} {'k':>5} | {'ours q/s':>12} {'faiss q/s':>12} {'ours/faiss':>10} | same top-1")
    for batch in [int(b) for b in args.batches.split(",")]:
        q = np.ascontiguousarray(queries[:batch])
        for k in ks:
            ours = timed(lambda: store.search(q, k), args.budget_s, args.repeats)[0]
            theirs = timed(lambda: index.search(q, k), args.budget_s, args.repeats)[0]
            same = float((store.search(q, 1).ids[:, 0] == index.search(q, 1)[1][:, 0]).mean())
            print(f"{batch:>6} {k:>5} | {batch / ours:>12,.0f} {batch / theirs:>12,.0f} {theirs / ours:>10.2f} | "
                  f"{same:.0%}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
