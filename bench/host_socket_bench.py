"""A memory layer's small calls three ways, in one run: in-process, through the service on the server's
host socket (a client on its host, the default; workers/host_socket.py), and through the service over
gRPC (``MemoryClient(..., shared_memory=False)``: as a client on another host calls).

One embedded deployment (one Ray shard actor, its read endpoint, a gRPC front end, all on this host)
and an in-process store hold the same ``--rows`` keys of width ``--dim`` with values of
``--value-dim``. Each way times ``--calls`` calls of each kind (after a warm-up), round robin over the
ways so that a slow spell of the host falls on all three: Search B=1 and B=64, Retrieve B=1, a
training step at B=64 (Retrieve keeping state + RetrieveBackward), and a decoding step (B=1 on a
Decode stream); it prints each p50 and the ratios of the p50s.

    python -m bench.host_socket_bench [--rows 20000] [--dim 64] [--value-dim 64] [--k 32] [--calls 500]
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time

import numpy as np

from monim import MemoryClient


def _kinds(k: int, queries: np.ndarray, grads: np.ndarray) -> dict:
    """name -> f(client, decode stream, i): one call of that kind."""
    def step(client, _, i):
        forward = client.retrieve("m", queries[i:i + 64], k, keep_state=True)
        client.retrieve_backward("m", forward, grads)

    return {
        "Search B=1": lambda client, _, i: client.search("m", queries[i:i + 1], k),
        "Search B=64": lambda client, _, i: client.search("m", queries[i:i + 64], k),
        "Retrieve B=1": lambda client, _, i: client.retrieve("m", queries[i:i + 1], k),
        "train step B=64": step,
        "decode step B=1": lambda _, stream, i: stream.search("m", queries[i:i + 1], k),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.host_socket_bench", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--value-dim", type=int, default=64)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--calls", type=int, default=500)
    args = p.parse_args(argv)
    from monim.workers.embedded import EmbeddedStore

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((args.rows, args.dim)).astype(np.float32)
    values = 0.1 * rng.standard_normal((args.rows, args.value_dim)).astype(np.float32)
    queries = keys[rng.integers(0, args.rows, args.calls + 64)] + 0.01
    grads = rng.standard_normal((64, args.value_dim)).astype(np.float32)
    print(f"# python -m bench.host_socket_bench {shlex.join(sys.argv[1:] if argv is None else argv)}")
    print(f"# {args.rows:,} x {args.dim} keys, values {args.value_dim} (adam), k={args.k}, {args.calls} calls "
          f"of each kind a way; {platform.machine()}, one CPU shard actor")
    store = EmbeddedStore(shards=1, num_cpus=2, shard_cpus=1, use_gpus=False)
    try:
        with MemoryClient(":memory:") as local, MemoryClient(store.address) as on_socket, \
                MemoryClient(store.address, shared_memory=False) as over_grpc:
            for client in (local, on_socket):
                client.create_namespace("m", dim=args.dim, value_dim=args.value_dim, optimizer="adam", lr=1e-3)
                client.add("m", keys, np.zeros(args.rows, np.int32), values=values)
            ways = {"in-process": local, "socket": on_socket, "gRPC": over_grpc}
            streams = {name: client.decode() for name, client in ways.items()}
            kinds = _kinds(args.k, queries, grads)
            times = {(kind, name): [] for kind in kinds for name in ways}
            for kind, call in kinds.items():
                for name, client in ways.items():
                    for i in range(5):  # warm-up
                        call(client, streams[name], i)
                for i in range(args.calls):
                    for name, client in ways.items():
                        began = time.perf_counter()
                        call(client, streams[name], i)
                        times[(kind, name)].append(time.perf_counter() - began)
            transports = {name: stream.transport or "in-process" for name, stream in streams.items()}
            assert transports == {"in-process": "in-process", "socket": "socket", "gRPC": "grpc"}, transports
            for stream in streams.values():
                stream.close()
        print(f"{'p50 ms':16s} | {'in-process':>10s} | {'socket':>8s} | {'gRPC':>8s} | socket/in-process | gRPC/socket")
        for kind in kinds:
            p50 = {name: 1e3 * float(np.median(times[(kind, name)])) for name in ways}
            print(f"{kind:16s} | {p50['in-process']:10.3f} | {p50['socket']:8.3f} | {p50['gRPC']:8.3f} | "
                  f"{p50['socket'] / p50['in-process']:16.2f}x | {p50['gRPC'] / p50['socket']:10.2f}x")
    finally:
        store.stop()


if __name__ == "__main__":
    main()
