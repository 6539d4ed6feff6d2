"""Decoding reads on CPU shards: one query per step (B=1), flat against hnsw, in-process against the service.

One embedded deployment (one Ray shard actor on the CPU, its read endpoint, a gRPC front end, all on
this host) and an in-process store (``MemoryClient(":memory:")``) hold the same ``--rows`` keys of
width ``--dim`` (a mixture of Gaussians, bench/ivf_bench.py's) in two namespaces: ``flat`` and
``hnsw`` (built once it holds half the rows; the bench waits until every row is in the graph).
Each path then runs ``--steps`` steps of a Decode stream (``client.decode()``: what ``attach_monim``
uses inside ``generate()``), one query near a stored key per step, k ``--k``: in-process, through the
service on the endpoint's Unix socket (a client on the shard's host; workers/host_socket.py) and
through the service on a gRPC stream (as a client on another host streams); it prints p50 / p99 per
namespace and path, and the ratios of the p50s, measured in the same run.

    python -m bench.cpu_decode_bench [--rows 100000] [--dim 768] [--k 32] [--steps 300]
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time

import numpy as np

from bench.ivf_bench import mixture
from monim import MemoryClient


def _wait_for_graph(client, namespace: str, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while any(s["index_state"] != "trained" or s["index_unindexed"] for s in client.describe_namespace(namespace).shards):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the hnsw graph of {namespace!r} was not built in {timeout_s:.0f} s")
        time.sleep(0.5)


def _steps(client, namespace: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, str]:
    """Seconds of each step of one Decode stream (after one warm-up step), and how it went."""
    with client.decode() as stream:
        stream.search(namespace, queries[:1], k)
        times = []
        for query in queries:
            began = time.perf_counter()
            stream.search(namespace, query[None], k)
            times.append(time.perf_counter() - began)
        return np.array(times), stream.transport or "in-process"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_decode_bench", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args(argv)
    from monim.workers.embedded import EmbeddedStore

    rng = np.random.default_rng(0)
    keys, _ = mixture(args.rows, args.dim, 256, 0.5, rng)
    picks = rng.choice(args.rows, args.steps)
    queries = keys[picks] + 0.05 * rng.standard_normal((args.steps, args.dim)).astype(np.float32)
    print(f"# python -m bench.cpu_decode_bench {shlex.join(sys.argv[1:] if argv is None else argv)}")
    print(f"# {args.rows:,} x {args.dim} keys, B=1, k={args.k}, {args.steps} steps a path; "
          f"{platform.machine()}, {platform.processor() or 'cpu'}; one CPU shard actor")
    store = EmbeddedStore(shards=1, num_cpus=2, shard_cpus=1, use_gpus=False)
    try:
        with MemoryClient(store.address) as service, MemoryClient(":memory:") as local, \
                MemoryClient(store.address, shared_memory=False) as over_grpc:
            for client in (service, local):
                client.create_namespace("flat", dim=args.dim)
                client.create_namespace("hnsw", dim=args.dim, index="hnsw", train_min_rows=args.rows // 2)
                for start in range(0, args.rows, 10_000):
                    for namespace in ("flat", "hnsw"):
                        client.add(namespace, keys[start:start + 10_000], np.zeros(min(10_000, args.rows - start),
                                                                                  np.int32))
                _wait_for_graph(client, "hnsw")
            # The service two ways: a stream on the endpoint's Unix socket (a client on its host, the
            # default) and a gRPC stream (MemoryClient(shared_memory=False): a client on another host).
            paths = {"in-process": local, "service, socket": service, "service, gRPC": over_grpc}
            print(f"{'namespace':9s} | " + " | ".join(f"{name + ' p50 / p99 ms':28s}" for name in paths)
                  + " | socket/in-process | gRPC/socket")
            for namespace in ("flat", "hnsw"):
                measured = {name: _steps(client, namespace, queries, args.k) for name, client in paths.items()}
                times = {name: t for name, (t, _) in measured.items()}
                assert [how for _, how in measured.values()] == ["in-process", "socket", "grpc"], measured
                p50 = {name: np.median(t) for name, t in times.items()}
                print(f"{namespace:9s} | " + " | ".join(
                    f"{1e3 * p50[name]:8.3f} / {1e3 * np.percentile(t, 99):8.3f}{'':9s}" for name, t in times.items())
                    + f" | {p50['service, socket'] / p50['in-process']:17.2f}x | "
                      f"{p50['service, gRPC'] / p50['service, socket']:.2f}x")
    finally:
        store.stop()


if __name__ == "__main__":
    main()
