"""Search throughput and latency: the in-process store vs. the same search through the service.

On ONE random data set (``--rows`` float32 keys of width ``--dim``, fixed seed;
queries are stored keys plus small noise) this measures, for every batch size
B in ``--batches`` and every k in ``--ks``:

  in-process  datastore.NeighborStore.search (faiss on CPU, torch matmul+top-k
              with ``--device cuda``), called directly;
  service     MemoryClient(address).search -> gRPC -> router -> ``--shards``
              Ray shard actors -> per-shard top-k -> merge -> gRPC reply, with
              everything started in this process by workers.embedded.EmbeddedStore.

Each cell gets one warm-up call (its answer is also compared: the two paths must
return the same ids for the first query, ties aside), then up to ``--repeats``
timed calls, stopping early once ``--budget-s`` seconds have gone (at least one
call). Reported: queries/s (B * calls / time), the service/in-process ratio, and
the median (p50) latency of one call. Both stores are loaded first and each cell
is run on both back to back, so a noisy machine disturbs both paths alike.

    python -m bench.search_bench [--rows N] [--shards S] [--batches 1,64,4096] [--ks 32,1024]
                                 [--dim 768] [--repeats R] [--budget-s 10] [--device cpu|cuda]
                                 [--no-service] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import sys
import time

import numpy as np
import torch
from monim.datastore import NamespaceConfig, NeighborStore

NAMESPACE = "bench-search"
SEED = 1234
QUERY_NOISE = 0.1


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.search_bench", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=100_000, help="stored entries (default 100000)")
    p.add_argument("--dim", type=int, default=768, help="key width (default 768)")
    p.add_argument("--shards", type=int, default=2, help="shard actors of the service (default 2)")
    p.add_argument("--batches", type=int_list, default=[1, 64, 4096], help="query batch sizes B, comma-separated")
    p.add_argument("--ks", type=int_list, default=[32, 1024], help="k values, comma-separated")
    p.add_argument("--repeats", type=int, default=20, help="most timed calls per cell (default 20)")
    p.add_argument("--budget-s", type=float, default=10.0, help="stop timing a cell after this many seconds (default 10)")
    p.add_argument("--device", default="cpu", help="device of the in-process store: cpu or cuda")
    p.add_argument("--no-service", action="store_true", help="skip the gRPC/Ray part")
    p.add_argument("--json", metavar="PATH", help="also write every number to this JSON file")
    return p.parse_args(argv)


def make_data(rows: int, dim: int, queries: int):
    """keys float32 [rows, dim] ~ N(0, 1); queries float32 [queries, dim] = random keys + noise."""
    rng = np.random.default_rng(SEED)
    keys = rng.standard_normal((rows, dim), dtype=np.float32)
    picks = rng.integers(0, rows, queries)
    noise = QUERY_NOISE * rng.standard_normal((queries, dim), dtype=np.float32)
    return keys, keys[picks] + noise


def time_cell(search, queries: np.ndarray, k: int, repeats: int, budget_s: float):
    """One warm-up call, then timed calls -> (first query's (ids, distances), [seconds per call])."""
    warm = search(queries, k)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max(1, repeats) and (not times or time.perf_counter() - started < budget_s):
        t0 = time.perf_counter()
        search(queries, k)
        times.append(time.perf_counter() - t0)
    return (warm.ids[0].copy(), warm.distances[0].copy()), times


def summarize(batch: int, times: list[float]) -> dict:
    return {"calls": len(times), "qps": batch * len(times) / sum(times),
            "p50_ms": 1000 * float(np.median(times)), "mean_ms": 1000 * float(np.mean(times))}


def same_neighbours(a, b) -> bool:
    """Same top-k for one query, ties aside: the distance lists agree slot by slot, an id in both
    lists has the same distance in each, and an id in only one list lies at the k-th distance."""
    (a_ids, a_d), (b_ids, b_d) = a, b
    if np.array_equal(a_ids, b_ids):
        return True
    tol = 1e-2 + 1e-5 * float(np.abs(a_d).max())
    if not np.allclose(a_d, b_d, rtol=0, atol=tol):
        return False
    da, db = dict(zip(a_ids.tolist(), a_d.tolist())), dict(zip(b_ids.tolist(), b_d.tolist()))
    common = da.keys() & db.keys()
    boundary = min(a_d[-1], b_d[-1]) - tol
    return (all(abs(da[i] - db[i]) <= tol for i in common)
            and all(d >= boundary for i, d in [*da.items(), *db.items()] if i not in common))


def open_in_process(keys, args):
    """-> (search function, info) of a NeighborStore holding the keys."""
    config = NamespaceConfig(NAMESPACE, args.dim, metric="l2", max_k=max(args.ks))
    store = NeighborStore(config, device=args.device)
    t0 = time.perf_counter()
    store.add(keys, np.arange(len(keys), dtype=np.int64))
    info = {"load_s": time.perf_counter() - t0, "backend": store.backend, "device": str(store.device)}
    print(f"in-process: {len(store)} rows on {store.device} ({store.backend}), loaded in {info['load_s']:.1f} s")
    return store.search, info


def open_service(stack: contextlib.ExitStack, keys, args):
    """-> (search function, info) of an EmbeddedStore + MemoryClient holding the keys; closed by ``stack``."""
    from monim.model_client.client import MemoryClient
    from monim.workers.embedded import EmbeddedStore

    t0 = time.perf_counter()
    service = stack.enter_context(EmbeddedStore(shards=args.shards, num_cpus=max(2, args.shards)))
    client = stack.enter_context(MemoryClient(service.address, timeout_s=600))
    start_s = time.perf_counter() - t0
    client.create_namespace(NAMESPACE, dim=args.dim, metric="l2", max_k=max(args.ks))
    t0 = time.perf_counter()
    ids = client.add(NAMESPACE, keys, np.arange(len(keys), dtype=np.int64))
    load_s = time.perf_counter() - t0
    if not np.array_equal(ids, np.arange(len(keys))):
        print("WARNING: the service numbered the entries differently; the id checks will fail")
    shards = [{f: s[f] for f in ("shard", "rows", "device", "backend")}
              for s in client.describe_namespace(NAMESPACE).shards]
    layout = ", ".join(f"shard {s['shard']}: {s['rows']} rows on {s['device']} ({s['backend']})" for s in shards)
    print(f"service at {service.address}: started in {start_s:.1f} s, loaded in {load_s:.1f} s ({layout})")
    info = {"start_s": start_s, "load_s": load_s, "address": service.address, "shards": shards}
    return (lambda q, k: client.search(NAMESPACE, q, k)), info


def measure(label: str, search, queries: np.ndarray, batch: int, k: int, args) -> dict:
    first, times = time_cell(search, queries[:batch], k, args.repeats, args.budget_s)
    cell = dict(summarize(batch, times), first=first)
    print(f"  {label:<10} B={batch:<5} k={k:<5} {cell['qps']:>10.1f} q/s  p50 {cell['p50_ms']:9.2f} ms"
          f"  ({len(times)} calls)", flush=True)
    return cell


def machine(args) -> dict:
    try:
        import faiss
    except ImportError:  # a GPU machine may have no faiss; the torch backend does without
        faiss = None
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    info = {"cpus": os.cpu_count(), "cpu_model": model, "torch_threads": torch.get_num_threads(),
            "faiss_threads": faiss and faiss.omp_get_max_threads(), "device": args.device,
            "python": platform.python_version(), "torch": torch.__version__, "faiss": faiss and faiss.__version__}
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    return info


def table(local: dict, remote: dict | None) -> str:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    head = (f"{'B':>5} {'k':>5} | {'in-proc q/s':>12} {'service q/s':>12} {'svc/in':>7} | "
            f"{'in-proc p50 ms':>14} {'service p50 ms':>14} | {'calls in/svc':>12}")
    lines = [head, "-" * len(head)]
    for cell, a in local.items():
        b = remote.get(cell) if remote else None
        lines.append(
            f"{cell[0]:>5} {cell[1]:>5} | {a['qps']:>12.1f} {fmt(b and b['qps'], '12.1f'):>12} "
            f"{fmt(b and b['qps'] / a['qps'], '7.2f'):>7} | {a['p50_ms']:>14.2f} {fmt(b and b['p50_ms'], '14.2f'):>14} | "
            f"{a['calls']:>5} / {fmt(b and b['calls'], 'd')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python -m bench.search_bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    began = time.perf_counter()
    info = machine(args)
    print(f"command: {command}")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    keys, queries = make_data(args.rows, args.dim, max(args.batches))
    local, remote, mismatches = {}, None if args.no_service else {}, []
    with contextlib.ExitStack() as stack:
        local_search, local_info = open_in_process(keys, args)
        remote_search, remote_info = (None, None) if args.no_service else open_service(stack, keys, args)
        # Both paths run each cell back to back, so a noisy machine disturbs both alike.
        for cell in [(batch, k) for batch in args.batches for k in args.ks]:
            local[cell] = measure("in-process", local_search, queries, *cell, args)
            if remote_search is None:
                continue
            remote[cell] = measure("service", remote_search, queries, *cell, args)
            if not same_neighbours(local[cell]["first"], remote[cell]["first"]):
                mismatches.append(cell)
                print(f"WARNING: B={cell[0]} k={cell[1]}: service and in-process ids differ for the first query")
    total_s = time.perf_counter() - began
    service = "no service" if args.no_service else f"service: {args.shards} shard(s)"
    print(f"\n{args.rows} rows x dim {args.dim}, l2; in-process on {args.device}; {service}; total {total_s:.0f} s\n")
    print(table(local, remote))
    if remote is not None:
        print(f"\nfirst-query ids agree (ties aside) in {len(local) - len(mismatches)} of {len(local)} cells")
    if args.json:
        def cells(result):
            return None if result is None else [
                dict({k: v for k, v in r.items() if k != "first"}, batch=c[0], k=c[1]) for c, r in result.items()]
        report = {"command": command, "args": {k: v for k, v in vars(args).items() if k != "json"},
                  "machine": info, "in_process": {**local_info, "cells": cells(local)},
                  "service": None if remote is None else {**remote_info, "cells": cells(remote)},
                  "id_mismatches": [list(c) for c in mismatches], "total_s": total_s}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
