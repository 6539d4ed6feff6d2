"""The IVF table: recall@10, queries/s against flat, memory per row and train time, in one run.

On ONE clustered data set (``--rows`` float32 keys of width ``--dim``: a mixture of
``--clusters`` Gaussians, centres standard normal, spread ``--spread``; queries drawn from the
same mixture; fixed seed) this loads one in-process ``NeighborStore`` per index:

  flat              exact search (faiss brute force on CPU, torch on ``--device cuda``): the oracle
  ivf_flat          nlist lists, full keys in faiss's lists
  ivf_pq            nlist lists, pq_m-byte codes, for every ``--pq-m`` given

Each ivf store is loaded in batches of ``--batch-rows`` through ``add``, as a shard is: it answers
exactly until it holds ``train_min_rows`` (``--train-min-rows``, default all rows, so the whole
set is indexed by the first build), then trains in the background and swaps the index in.
Reported per index and each (nprobe, rerank) in ``--probes`` x ``--reranks``:

  recall@10    |ids in the index's top-10 and the exact top-10| / 10, averaged over the queries
  q/s          queries/s of ``--queries`` queries as one batch at k=10 (best of ``--repeats``),
               and its ratio to flat's q/s measured in the same run
  bytes/row    what a row costs the shard: the row store's columns (keys, token, weight, ...)
               plus the index entry (code + int64 id), the unit the budget counts
  index B/row  the index entry alone
  train s      the build: sample, k-means (+ PQ), add of every row, swap (index_train_seconds)
  compact s    after the searches, 15% of the rows are deleted (tombstones, then the background
               compaction): the remove_ids pass, during which the store's searches wait

    python -m bench.ivf_bench [--rows 200000] [--dim 64] [--nlist 1024] [--pq-m 32,64]
                              [--probes 32] [--reranks 0,100] [--queries 1000] [--repeats 5] [--device cpu|cuda]
                              [--train-min-rows N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time

import numpy as np
import torch
from monim.datastore import NamespaceConfig, NeighborStore
from monim.datastore.ivf_index import code_bytes

from bench.search_bench import int_list

SEED = 1234
K = 10


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ivf_bench", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=200_000, help="stored entries (default 200000)")
    p.add_argument("--dim", type=int, default=64, help="key width (default 64)")
    p.add_argument("--clusters", type=int, default=256, help="Gaussians in the mixture (default 256)")
    p.add_argument("--spread", type=float, default=0.5, help="standard deviation around a centre (default 0.5)")
    p.add_argument("--intrinsic-dim", type=int, default=0,
                   help="each cluster's noise in a random subspace of this many dimensions (default 0: isotropic)")
    p.add_argument("--nlist", type=int, default=1024, help="inverted lists (default 1024)")
    p.add_argument("--pq-m", type=int_list, default=None, help="ivf_pq code bytes, comma-separated "
                   "(default: the namespace default, and dim when dim <= 128)")
    p.add_argument("--probes", type=int_list, default=[32], help="nprobe values (default 32)")
    p.add_argument("--reranks", type=int_list, default=[0, 100], help="rerank values (default 0,100)")
    p.add_argument("--queries", type=int, default=1000, help="queries, searched as one batch (default 1000)")
    p.add_argument("--repeats", type=int, default=5, help="timed searches per cell, best kept (default 5)")
    p.add_argument("--batch-rows", type=int, default=50_000, help="rows per add (default 50000)")
    p.add_argument("--train-min-rows", type=int, default=0, help="rows before training (default: all)")
    p.add_argument("--no-ivf-flat", action="store_true", help="skip ivf_flat")
    p.add_argument("--device", default="cpu", help="device of the stores: cpu or cuda")
    p.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    return p.parse_args(argv)


def mixture(rows: int, dim: int, clusters: int, spread: float, rng: np.random.Generator, centers=None,
            intrinsic_dim: int = 0):
    """float32 [rows, dim] from the mixture; centers: (centres float32 [clusters, dim], each cluster's
    basis float32 [clusters, intrinsic_dim, dim] or None), made when None. intrinsic_dim 0: isotropic
    noise in every dimension; else each cluster's noise lies in its own random intrinsic_dim-dimensional
    subspace (per-dimension variance spread^2 as before), plus isotropic noise 1/20 as wide: points
    with a few degrees of freedom around each centre, as LM hidden states have."""
    if centers is None:
        bases = None
        if intrinsic_dim:
            bases = (rng.standard_normal((clusters, intrinsic_dim, dim)) / np.sqrt(intrinsic_dim)).astype(np.float32)
        centers = (rng.standard_normal((clusters, dim)).astype(np.float32), bases)
    means, bases = centers
    labels = rng.integers(0, clusters, rows)
    points = np.empty((rows, dim), np.float32)
    if bases is None:
        for start in range(0, rows, 1 << 16):  # bounded float64 temporaries
            stop = min(rows, start + (1 << 16))
            points[start:stop] = means[labels[start:stop]] + spread * rng.standard_normal((stop - start, dim))
        return points, centers
    for cluster in range(clusters):
        members = np.flatnonzero(labels == cluster)
        local = rng.standard_normal((members.size, bases.shape[1]), dtype=np.float32) @ bases[cluster]
        local += 0.05 * rng.standard_normal((members.size, dim), dtype=np.float32)
        points[members] = means[cluster] + spread * local
    return points, centers


def load(config: NamespaceConfig, keys: np.ndarray, device: str, batch_rows: int) -> tuple[NeighborStore, float]:
    """The store with every row, its index trained and swapped in; (store, seconds of the adds)."""
    store = NeighborStore(config, device=device)
    tokens = np.zeros(batch_rows, np.int32)
    started = time.perf_counter()
    for start in range(0, len(keys), batch_rows):
        part = keys[start:start + batch_rows]
        store.add(part, tokens[: len(part)])
    added = time.perf_counter() - started
    if not store.wait_for_index(3600):
        raise RuntimeError(f"{config.index} did not finish training within an hour")
    return store, added


def timed_search(store: NeighborStore, queries: np.ndarray, repeats: int, **options):
    """(best queries/s over repeats, the last answer's ids)."""
    best, ids = 0.0, None
    for _ in range(repeats):
        started = time.perf_counter()
        found = store.search(queries, K, **options)
        best = max(best, len(queries) / (time.perf_counter() - started))
        ids = found.ids
    return best, ids


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth)]))


def main(argv=None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(SEED)
    keys, centers = mixture(args.rows, args.dim, args.clusters, args.spread, rng, intrinsic_dim=args.intrinsic_dim)
    queries, _ = mixture(args.queries, args.dim, args.clusters, args.spread, rng, centers)
    train_min_rows = args.train_min_rows or args.rows
    pq_ms = args.pq_m or sorted({NamespaceConfig("p", dim=args.dim, index="ivf_pq").pq_m}
                                | ({args.dim} if args.dim <= 128 else set()))
    print(f"# python -m bench.ivf_bench {shlex.join(argv if argv is not None else sys.argv[1:])}")
    print(f"# {args.rows:,} x {args.dim} keys, {args.clusters} Gaussians (spread {args.spread}, "
          f"{'noise in every dimension' if not args.intrinsic_dim else f'noise in {args.intrinsic_dim} dimensions'}), "
          f"{args.queries} queries at k={K}; nlist {args.nlist}; device {args.device}; "
          f"torch threads {torch.get_num_threads()}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    flat, flat_add_s = load(NamespaceConfig("flat", dim=args.dim), keys, args.device, args.batch_rows)
    flat_qps, truth = timed_search(flat, queries, args.repeats)
    flat_bytes = flat.rows.row_bytes
    rows = [dict(index="flat", nprobe="-", rerank="-", recall=1.0, qps=flat_qps, ratio=1.0, row_bytes=flat_bytes,
                 index_bytes=0, train_s=0.0, add_s=flat_add_s, compact_s=0.0)]
    configs = [] if args.no_ivf_flat else [NamespaceConfig("ivf_flat", dim=args.dim, index="ivf_flat",
                                                           nlist=args.nlist, train_min_rows=train_min_rows)]
    configs += [NamespaceConfig(f"ivf_pq{m}", dim=args.dim, index="ivf_pq", nlist=args.nlist, pq_m=m,
                                train_min_rows=train_min_rows) for m in pq_ms]
    del flat
    for config in configs:
        store, add_s = load(config, keys, args.device, args.batch_rows)
        stats = store.stats()
        label = config.index if config.index == "ivf_flat" else f"ivf_pq (pq_m {config.pq_m})"
        for nprobe in args.probes:
            for rerank in args.reranks:
                qps, ids = timed_search(store, queries, args.repeats, nprobe=nprobe, rerank=rerank)
                rows.append(dict(index=label, nprobe=nprobe, rerank=rerank, recall=recall(ids, truth), qps=qps,
                                 ratio=qps / flat_qps, row_bytes=store.rows.row_bytes + code_bytes(config),
                                 index_bytes=code_bytes(config), train_s=stats["index_train_seconds"], add_s=add_s))
        store.delete(ids=np.arange(0, args.rows, 7))  # ~15% of the rows: past the compaction threshold
        store.wait_for_index(3600)
        compact_s = store.stats()["index_compaction_seconds"]
        for r in rows[-len(args.probes) * len(args.reranks):]:
            r["compact_s"] = compact_s
        store.close()
        del store
    print()
    print("| index | nprobe | rerank | recall@10 | q/s | vs flat | bytes/row | index B/row | train s | compact s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['index']} | {r['nprobe']} | {r['rerank']} | {r['recall']:.4f} | {r['qps']:,.0f} | "
              f"{r['ratio']:.2f}x | {r['row_bytes']} | {r['index_bytes']} | {r['train_s']:.1f} | "
              f"{r['compact_s']:.2f} |")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"args": vars(args), "rows": rows}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
