"""What durability costs, in one run on the same data: Add throughput with the write-ahead log
(fsync per record, and flush only) against an ephemeral store; a shard's snapshot write rate;
its recovery time (snapshot load + log replay).

In-process shards (LocalRuntime): the router, shards, log and snapshots are the service's own,
without Ray and gRPC around them, so the ratios are the log's cost alone.

    python -m bench.durability_bench                         # 4096-row adds of 768-d rows, 1 and 4 writers
    python -m bench.durability_bench --service --recovery-rows 0   # also through the service
    python -m bench.durability_bench --recovery-rows 1000000 # the issue's recovery figure
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time

import numpy as np
import torch
from monim.datastore import NamespaceConfig
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime


def concurrent_add_rate(add, batches: int, rows_per_add: int, writers: int) -> float:
    """Rows per second of ``batches`` calls of add() shared among ``writers`` threads running at once."""
    def write(count):
        for _ in range(count):
            add()

    shares = [batches // writers + (i < batches % writers) for i in range(writers)]
    threads = [threading.Thread(target=write, args=(share,)) for share in shares]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return batches * rows_per_add / (time.perf_counter() - started)


def add_rate(data_dir, fsync, batches, keys, tokens, writers: int = 1) -> tuple[float, tuple | None]:
    """(rows per second, group commit) of Adds of len(keys) rows into a fresh 1-shard deployment,
    from ``writers`` threads at once (batches in all). group commit: (records per sync, ms per
    sync) of the log, None without syncs."""
    router = Router(LocalRuntime(1, data_dir=data_dir, fsync=fsync, snapshot_every=0))
    router.create_namespace(NamespaceConfig("bench", dim=keys.shape[1]))
    router.add("bench", keys, tokens)  # warm-up

    rate = concurrent_add_rate(lambda: router.add("bench", keys, tokens), batches, keys.shape[0], writers)
    wal, syncs = router.runtime.shards[0].wal, None
    if wal is not None and wal.sync_stats["syncs"]:
        stats = wal.sync_stats
        syncs = (stats["records"] / stats["syncs"], stats["seconds"] / stats["syncs"] * 1e3)
    router.runtime.shutdown()
    return rate, syncs


def disk_write_rates(folder, total_bytes=1 << 30, block_bytes=16 << 20) -> dict:
    """The disk under folder, measured here: MB/s of sequential 16 MiB writes then one fdatasync,
    with direct I/O (what the log does with fsync always / batch_ms) and through the page cache
    (what the snapshot's Parquet writer does), so the figures below can be read against the
    hardware's own rate."""
    import mmap

    block = mmap.mmap(-1, block_bytes)
    block.write(np.random.default_rng(0).bytes(block_bytes))
    rates = {}
    for name, extra in (("direct", getattr(os, "O_DIRECT", 0)), ("buffered", 0)):
        path = os.path.join(folder, f"disk-probe-{name}")
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | extra, 0o644)
        except OSError:
            continue  # no direct I/O on this filesystem
        started = time.perf_counter()
        for offset in range(0, total_bytes, block_bytes):
            os.pwrite(descriptor, block, offset)
        os.fsync(descriptor)
        rates[name] = total_bytes / (time.perf_counter() - started) / 1e6
        os.close(descriptor)
        os.unlink(path)
    return rates


def service_add_rate(data_dir, fsync, batches, keys, tokens, shards: int, writers: int = 1,
                     deployment: str = "bench") -> float:
    """Rows per second of Adds through MemoryClient -> gRPC -> router -> shard actors (Ray), from
    ``writers`` client threads at once (batches in all), into a fresh deployment started in this
    process on the Ray instance already running here (data_dir None: --ephemeral); the deployment's
    actors are destroyed afterwards."""
    from monim.model_client import MemoryClient
    from monim.workers.embedded import EmbeddedStore

    store = EmbeddedStore(shards=shards, data_dir=data_dir, fsync=fsync, snapshot_every=0, deployment=deployment)
    try:
        with MemoryClient(store.address, timeout_s=600) as client:
            client.create_namespace("bench", dim=keys.shape[1])
            client.add("bench", keys, tokens)  # warm-up
            return concurrent_add_rate(lambda: client.add("bench", keys, tokens), batches, keys.shape[0], writers)
    finally:
        store.stop()
        store.runtime.destroy()


def recovery(data_dir, rows, dim, tail_batches) -> dict:
    """Fills one shard with ``rows`` rows, snapshots it (timed), adds tail_batches more to the log,
    then starts a new shard on the folder (timed: snapshot load + replay)."""
    router = Router(LocalRuntime(1, data_dir=data_dir, fsync="never", snapshot_every=0))
    router.create_namespace(NamespaceConfig("bench", dim=dim))
    rng = np.random.default_rng(0)
    block = 50_000
    for start in range(0, rows, block):
        n = min(block, rows - start)
        router.add("bench", rng.standard_normal((n, dim)).astype(np.float32), np.arange(n))
    shard = router.runtime.shards[0]
    started = time.perf_counter()
    manifest = shard.snapshot()
    snapshot_s = time.perf_counter() - started
    snapshot_bytes = sum(entry["bytes"] for entry in manifest["namespaces"].values())
    for _ in range(tail_batches):
        router.add("bench", rng.standard_normal((4096, dim)).astype(np.float32), np.arange(4096))
    router.runtime.shutdown()
    del router, shard
    started = time.perf_counter()
    again = Router(LocalRuntime(1, data_dir=data_dir, fsync="never", snapshot_every=0))
    recovery_s = time.perf_counter() - started
    recovered = again.runtime.shards[0].recovery
    assert recovered["rows"] == rows + tail_batches * 4096, recovered
    return {"rows": rows + tail_batches * 4096, "snapshot_s": snapshot_s, "snapshot_bytes": snapshot_bytes,
            "snapshot_mb_per_s": snapshot_bytes / snapshot_s / 1e6, "recovery_s": recovery_s,
            "records_replayed": recovered["records_replayed"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows-per-add", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--recovery-rows", type=int, default=200_000)
    parser.add_argument("--tail-batches", type=int, default=10, help="4096-row adds in the log after the snapshot")
    parser.add_argument("--dir", default=None, help="where the data dirs go (default: a temporary folder)")
    parser.add_argument("--writers", type=lambda text: [int(n) for n in text.split(",")], default=[1, 4],
                        help="writer threads of the in-process Add figures, comma-separated (default 1,4)")
    parser.add_argument("--policies", type=lambda text: text.split(","), default=["always", "batch_ms=2", "never"],
                        help="--fsync policies of the Add figures (default always,batch_ms=2,never)")
    parser.add_argument("--repeats", type=int, default=3, help="in-process Add measurements per setting (median)")
    parser.add_argument("--service", action="store_true", help="also Add through gRPC and Ray shard actors "
                        "(the same writer counts, as client threads, and fsync policies)")
    parser.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=True,
                        help="the in-process Add figures (--no-in-process: only the service's)")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="monim-bench-", dir=args.dir)
    print(f"# python -m bench.durability_bench {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"data dirs under {root}")
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((args.rows_per_add, args.dim)).astype(np.float32)
    tokens = np.arange(args.rows_per_add)
    results = {}
    row_bytes = keys[0].nbytes + 8 + 8  # key, token, id: what a log record of an Add holds per row
    try:
        results["disk_mb_per_s"] = disk = disk_write_rates(root)
        print("disk under the data dirs, sequential 16 MiB writes + fsync: " +
              ", ".join(f"{name} {rate:,.0f} MB/s" for name, rate in disk.items()))
        for writers in args.writers if args.in_process else []:
            # Each setting is measured --repeats times, interleaved with the others (this VM's disk and
            # CPUs drift), and its median is compared with the ephemeral store's median.
            rates = {fsync: [] for fsync in ("ephemeral", *args.policies)}
            syncs = {fsync: [] for fsync in rates}
            for _ in range(args.repeats):
                for fsync in rates:
                    folder = None if fsync == "ephemeral" else os.path.join(root, f"add-{fsync.replace('=', '-')}")
                    rate, synced = add_rate(folder, "always" if folder is None else fsync, args.batches, keys,
                                            tokens, writers)
                    rates[fsync].append(rate)
                    if synced:
                        syncs[fsync].append(synced)
                    if folder:
                        shutil.rmtree(folder, ignore_errors=True)
            ephemeral = results[f"add_ephemeral_{writers}w"] = float(np.median(rates.pop("ephemeral")))
            for fsync, measured in rates.items():
                results[f"add_{fsync}_{writers}w"] = rate = float(np.median(measured))
                print(f"Add {args.rows_per_add} x {args.dim}, {writers} writer(s), log fsync={fsync:10s}: "
                      f"{rate:10,.0f} rows/s = {rate / ephemeral:.2f}x ephemeral ({ephemeral:,.0f} rows/s); "
                      f"log {rate * row_bytes / 1e6:,.0f} MB/s" +
                      (f"; {np.mean([n for n, _ in syncs[fsync]]):.1f} records per sync of "
                       f"{np.mean([ms for _, ms in syncs[fsync]]):.1f} ms" if syncs[fsync] else ""))
        if args.service:
            # One Ray instance for every deployment (each its own actors, destroyed after it); the
            # settings interleaved and repeated as above.
            import ray

            ray.init(num_cpus=max(2, args.shards), include_dashboard=False, logging_level="ERROR")
            try:
                for writers in args.writers:
                    rates = {fsync: [] for fsync in ("ephemeral", *args.policies)}
                    for repeat in range(args.repeats):
                        for fsync in rates:
                            folder = None if fsync == "ephemeral" else os.path.join(
                                root, f"service-{fsync.replace('=', '-')}")
                            rates[fsync].append(service_add_rate(
                                folder, "always" if folder is None else fsync, args.batches, keys, tokens,
                                args.shards, writers, deployment=f"bench-{writers}w-{repeat}-{fsync.replace('=', '-')}"))
                            if folder:
                                shutil.rmtree(folder, ignore_errors=True)
                    ephemeral = results[f"service_add_ephemeral_{writers}w"] = float(np.median(rates.pop("ephemeral")))
                    for fsync, measured in rates.items():
                        results[f"service_add_{fsync}_{writers}w"] = rate = float(np.median(measured))
                        print(f"service ({args.shards} shard actors), Add {args.rows_per_add} x {args.dim}, "
                              f"{writers} client thread(s), fsync={fsync:10s}: {rate:10,.0f} rows/s = "
                              f"{rate / ephemeral:.2f}x --ephemeral ({ephemeral:,.0f} rows/s)")
            finally:
                ray.shutdown()
        if not args.recovery_rows:
            return 0
        results["recovery"] = found = recovery(os.path.join(root, "recovery"), args.recovery_rows, args.dim,
                                               args.tail_batches)
        print(f"snapshot of {args.recovery_rows:,} x {args.dim}: {found['snapshot_bytes'] / 1e9:.2f} GB in "
              f"{found['snapshot_s']:.2f} s = {found['snapshot_mb_per_s']:,.0f} MB/s = "
              f"{found['snapshot_mb_per_s'] / disk['buffered']:.2f}x the disk's buffered rate")
        print(f"recovery of {found['rows']:,} rows (snapshot load + {found['records_replayed']} log records): "
              f"{found['recovery_s']:.2f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
