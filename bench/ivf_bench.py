"""The IVF and HNSW table: recall@10, queries/s against flat, one query's latency, memory per row and build time, in one run.

On ONE clustered data set (``--rows`` float32 keys of width ``--dim``: a mixture of
``--clusters`` Gaussians, centres standard normal, spread ``--spread``; queries drawn from the
same mixture; fixed seed) this loads one in-process ``NeighborStore`` per index:

  flat              exact search (faiss brute force on CPU, torch on ``--device cuda``): the oracle
  ivf_flat          nlist lists, full keys in faiss's lists
  ivf_pq            nlist lists, pq_m-byte codes, for every ``--pq-m`` given
  hnsw              a faiss HNSW graph (IndexHNSWFlat: full keys), hnsw_m links per node, for every
                    ``--hnsw-m`` given, built with ``--ef-construction`` candidates per insertion

Each ivf and hnsw store is loaded in batches of ``--batch-rows`` through ``add``, as a shard is: it
answers exactly until it holds ``train_min_rows`` (``--train-min-rows``, default all rows, so the
whole set is indexed by the first build), then trains (ivf) or builds its graph (hnsw) in the
background and swaps the index in. Reported per index and each (nprobe, rerank) in ``--probes`` x
``--reranks`` (ivf) or each ef in ``--efs`` (hnsw):

  nprobe/rerank or ef
               the search's options: ivf's lists probed / candidates ranked again by exact
               distance (0: off); hnsw's beam width ef
  recall@10    |ids in the index's top-10 and the exact top-10| / 10, averaged over the queries
  q/s          queries/s of ``--queries`` queries as one batch at k=10 (best of ``--repeats``),
               and its ratio to flat's q/s measured in the same run
  B=1 ms       the median milliseconds of one-query searches (queries[i:i+1], k=10, the row's
               options) over the first 200 queries: the latency a decoding step sees
  bytes/row    what a row costs the shard: the row store's columns (keys, token, weight, ...)
               plus the index entry, the unit the budget counts
  index B/row  the index entry alone: ivf's code + int64 id; hnsw's ``entry_bytes`` (float32 key,
               id, level, links)
  train s      the build (index_train_seconds). ivf: sample, k-means (+ PQ), add of every row,
               swap; hnsw: the insertion of every row into a new graph, swap
  compact s    after the searches, 1 row in 7 (~15%) is deleted: tombstones, then the background
               compaction. ivf: the remove_ids pass, during which the store's searches wait. hnsw:
               faiss removes no node from a graph, so the tombstones are cleared by a FULL
               REBUILD of the graph from the rows stored then (the ingest's included), reported as
               that rebuild's index_train_seconds; searches meanwhile use the old graph. "-": the
               deletes stayed tombstones (fewer than COMPACT_MIN_TOMBSTONES, 1024: small sets)

After the table, one line per hnsw M: the ingest into a built graph. After the searches (before the
deletes), ``--ingest-rows`` more rows from the same mixture (another random stream) are added in
batches of 1000 through ``add``:

  add returns     rows/s of the adds alone: an add returns once its rows wait in the tail (searched
                  exactly); past MAX_TAIL_ROWS waiting rows an add inserts the excess itself
  into the graph  rows/s from the first add until ``wait_for_index`` returns (the worker moved the
                  tail into the graph), less the time of the recall search below
  recall@10       of a search at ef 64 made right after the last add (graph and tail merged; the
                  rows still in the tail then are shown), against exact search over every row
                  stored then (a flat store of the whole set)

    python -m bench.ivf_bench [--rows 200000] [--dim 64] [--nlist 1024] [--pq-m 32,64]
                              [--probes 32] [--reranks 0,100] [--hnsw-m 16,32] [--ef-construction 64]
                              [--efs 64,256] [--ingest-rows 20000] [--queries 1000] [--repeats 5]
                              [--device cpu|cuda] [--train-min-rows N] [--json PATH]
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
from monim.datastore.hnsw_index import entry_bytes
from monim.datastore.ivf_index import code_bytes

from bench.search_bench import int_list

SEED = 1234
K = 10
LATENCY_QUERIES = 200     # one-query searches timed per row (B=1 ms)
INGEST_BATCH_ROWS = 1000  # rows per add of the hnsw ingest
INGEST_EF = 64            # the beam of the search right after the ingest's last add


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
    p.add_argument("--hnsw-m", type=int_list, default=[16, 32],
                   help="hnsw graph degrees M, comma-separated (default 16,32; 0 or empty: no hnsw)")
    p.add_argument("--ef-construction", type=int, default=64, help="hnsw build beam width (default 64)")
    p.add_argument("--efs", type=int_list, default=[64, 256], help="hnsw search beam widths ef (default 64,256)")
    p.add_argument("--ingest-rows", type=int, default=20_000,
                   help="rows added to each built hnsw graph (default 20000; 0: no ingest)")
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


def single_query_ms(store: NeighborStore, queries: np.ndarray, **options) -> float:
    """The median milliseconds of one-query searches (queries[i:i+1], k=10) over the first LATENCY_QUERIES."""
    store.search(queries[:1], K, **options)  # warm-up
    times = []
    for i in range(min(LATENCY_QUERIES, len(queries))):
        started = time.perf_counter()
        store.search(queries[i:i + 1], K, **options)
        times.append(time.perf_counter() - started)
    return 1e3 * float(np.median(times))


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth)]))


def exact_ids(keys: np.ndarray, queries: np.ndarray, device: str, batch_rows: int) -> np.ndarray:
    """The exact top-10 ids int64 [Q, 10] of queries over keys stored in order (ids 0..N-1), by a flat store."""
    store, _ = load(NamespaceConfig("truth", dim=keys.shape[1]), keys, device, batch_rows)
    return store.search(queries, K).ids


def measured_row(store: NeighborStore, label: str, queries: np.ndarray, truth: np.ndarray, flat_qps: float,
                 repeats: int, index_bytes: int, **options) -> dict:
    """One row of the table for a search of store with options (nprobe/rerank or ef)."""
    qps, ids = timed_search(store, queries, repeats, **options)
    shown = f"ef {options['ef']}" if "ef" in options else f"{options['nprobe']}/{options['rerank']}"
    return dict(index=label, options=shown, nprobe=options.get("nprobe", "-"), rerank=options.get("rerank", "-"),
                ef=options.get("ef", "-"), recall=recall(ids, truth), qps=qps, ratio=qps / flat_qps,
                single_ms=single_query_ms(store, queries, **options), row_bytes=store.rows.row_bytes + index_bytes,
                index_bytes=index_bytes, train_s=store.stats()["index_train_seconds"])


def deleted_and_compacted(store: NeighborStore) -> dict | None:
    """Deletes 1 stored row in 7 and waits for the compaction: the store's stats then, or None when the
    tombstones stayed (fewer than COMPACT_MIN_TOMBSTONES: a small set is not compacted)."""
    store.delete(ids=np.arange(0, store.next_id, 7))
    store.wait_for_index(3600)
    stats = store.stats()
    return None if stats["index_tombstones"] else stats


def measure_flat(args, keys: np.ndarray, queries: np.ndarray) -> tuple[dict, np.ndarray]:
    """(flat's row, the exact top-10 ids of the queries)."""
    flat, add_s = load(NamespaceConfig("flat", dim=args.dim), keys, args.device, args.batch_rows)
    qps, truth = timed_search(flat, queries, args.repeats)
    row = dict(index="flat", options="-", nprobe="-", rerank="-", ef="-", recall=1.0, qps=qps, ratio=1.0,
               single_ms=single_query_ms(flat, queries), row_bytes=flat.rows.row_bytes, index_bytes=0,
               train_s=0.0, add_s=add_s, compact_s=0.0)
    return row, truth


def measure_ivf(args, config: NamespaceConfig, keys, queries, truth, flat_qps: float) -> list[dict]:
    """The rows of one ivf store, per (nprobe, rerank)."""
    store, add_s = load(config, keys, args.device, args.batch_rows)
    label = config.index if config.index == "ivf_flat" else f"ivf_pq (pq_m {config.pq_m})"
    rows = [measured_row(store, label, queries, truth, flat_qps, args.repeats, code_bytes(config),
                         nprobe=nprobe, rerank=rerank) | {"add_s": add_s}
            for nprobe in args.probes for rerank in args.reranks]
    compacted = deleted_and_compacted(store)
    compact_s = None if compacted is None else compacted["index_compaction_seconds"]
    for row in rows:
        row["compact_s"] = compact_s
    store.close()
    return rows


def ingest(store: NeighborStore, new_keys: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> dict:
    """Adds new_keys to the built graph in batches of INGEST_BATCH_ROWS; searches at ef INGEST_EF right
    after the last add (truth: the exact top-10 over every row stored then); waits for the tail to drain."""
    tokens = np.zeros(INGEST_BATCH_ROWS, np.int32)
    started = time.perf_counter()
    for start in range(0, len(new_keys), INGEST_BATCH_ROWS):
        part = new_keys[start:start + INGEST_BATCH_ROWS]
        store.add(part, tokens[: len(part)])
    add_s = time.perf_counter() - started
    tail_rows = store.stats()["index_unindexed"]
    searched = time.perf_counter()
    found = store.search(queries, K, ef=INGEST_EF)
    search_s = time.perf_counter() - searched
    if not store.wait_for_index(3600):
        raise RuntimeError("the hnsw tail did not drain within an hour")
    drained_s = time.perf_counter() - started - search_s
    return dict(rows=len(new_keys), add_s=add_s, add_rows_per_s=len(new_keys) / add_s, into_graph_s=drained_s,
                into_graph_rows_per_s=len(new_keys) / drained_s, tail_rows_at_search=tail_rows,
                recall=recall(found.ids, truth))


def measure_hnsw(args, config: NamespaceConfig, keys, queries, truth, flat_qps: float,
                 new_keys: np.ndarray | None, truth_after_ingest: np.ndarray | None) -> tuple[list[dict], dict | None]:
    """(the rows of one hnsw store, per ef; its ingest's figures or None)."""
    store, add_s = load(config, keys, args.device, args.batch_rows)
    label = f"hnsw (M {config.hnsw_m})"
    rows = [measured_row(store, label, queries, truth, flat_qps, args.repeats, entry_bytes(config), ef=ef)
            | {"add_s": add_s} for ef in args.efs]
    ingested = None if new_keys is None else {"index": label} | ingest(store, new_keys, queries, truth_after_ingest)
    rebuilt = deleted_and_compacted(store)
    for row in rows:
        row["compact_s"] = None if rebuilt is None else rebuilt["index_train_seconds"]  # the rebuild's
    store.close()
    return rows, ingested


def print_table(rows: list[dict]) -> None:
    print("| index | nprobe/rerank or ef | recall@10 | q/s | vs flat | B=1 ms | bytes/row | index B/row | train s "
          "| compact s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['index']} | {r['options']} | {r['recall']:.4f} | {r['qps']:,.0f} | {r['ratio']:.2f}x | "
              f"{r['single_ms']:.3f} | {r['row_bytes']} | {r['index_bytes']} | {r['train_s']:.1f} | "
              f"{'-' if r['compact_s'] is None else format(r['compact_s'], '.2f')} |")


def print_ingests(ingests: list[dict]) -> None:
    for i in ingests:
        print(f"- {i['index']}, ingest of {i['rows']:,} rows into the built graph (adds of {INGEST_BATCH_ROWS}): "
              f"add returns: {i['add_rows_per_s']:,.0f} rows/s; into the graph: {i['into_graph_rows_per_s']:,.0f} "
              f"rows/s; recall@10 at ef {INGEST_EF} right after the last add ({i['tail_rows_at_search']:,} rows "
              f"in the tail): {i['recall']:.4f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    rng = np.random.default_rng(SEED)
    keys, centers = mixture(args.rows, args.dim, args.clusters, args.spread, rng, intrinsic_dim=args.intrinsic_dim)
    queries, _ = mixture(args.queries, args.dim, args.clusters, args.spread, rng, centers)
    train_min_rows = args.train_min_rows or args.rows
    pq_ms = args.pq_m or sorted({NamespaceConfig("p", dim=args.dim, index="ivf_pq").pq_m}
                                | ({args.dim} if args.dim <= 128 else set()))
    hnsw_ms = [m for m in args.hnsw_m if m]
    print(f"# python -m bench.ivf_bench {shlex.join(argv if argv is not None else sys.argv[1:])}")
    print(f"# {args.rows:,} x {args.dim} keys, {args.clusters} Gaussians (spread {args.spread}, "
          f"{'noise in every dimension' if not args.intrinsic_dim else f'noise in {args.intrinsic_dim} dimensions'}), "
          f"{args.queries} queries at k={K}; nlist {args.nlist}; "
          f"{f'hnsw ef_construction {args.ef_construction}; ' if hnsw_ms else ''}device {args.device}; "
          f"torch threads {torch.get_num_threads()}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    flat_row, truth = measure_flat(args, keys, queries)
    rows = [flat_row]
    configs = [] if args.no_ivf_flat else [NamespaceConfig("ivf_flat", dim=args.dim, index="ivf_flat",
                                                           nlist=args.nlist, train_min_rows=train_min_rows)]
    configs += [NamespaceConfig(f"ivf_pq{m}", dim=args.dim, index="ivf_pq", nlist=args.nlist, pq_m=m,
                                train_min_rows=train_min_rows) for m in pq_ms]
    for config in configs:
        rows += measure_ivf(args, config, keys, queries, truth, flat_row["qps"])
    new_keys = truth_after_ingest = None
    if hnsw_ms and args.ingest_rows:
        new_keys, _ = mixture(args.ingest_rows, args.dim, args.clusters, args.spread,
                              np.random.default_rng(SEED + 1), centers)
        truth_after_ingest = exact_ids(np.concatenate([keys, new_keys]), queries, args.device, args.batch_rows)
    ingests = []
    for m in hnsw_ms:
        config = NamespaceConfig(f"hnsw{m}", dim=args.dim, index="hnsw", hnsw_m=m,
                                 ef_construction=args.ef_construction, train_min_rows=train_min_rows)
        hnsw_rows, ingested = measure_hnsw(args, config, keys, queries, truth, flat_row["qps"], new_keys,
                                           truth_after_ingest)
        rows += hnsw_rows
        ingests += [ingested] if ingested else []
    print()
    print_table(rows)
    if ingests:
        print()
        print_ingests(ingests)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"args": vars(args), "rows": rows, "hnsw_ingest": ingests}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
