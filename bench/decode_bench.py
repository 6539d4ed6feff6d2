"""Decoding: one generated token's memory read, as calls and on a Decode stream, in one run.

On one random data set (``--rows`` keys of width ``--dim`` with ``--value-dim`` values) served by
an embedded deployment (``--shards`` Ray shard actors behind a gRPC front end, all in this
process), a model that generates reads its memory once per token with a batch of ``--batch``
queries. Measured, interleaved round by round (in a new order each round) so that a noisy machine disturbs
all alike:

  in-process  MemoryClient(":memory:"): the same store in this process, called directly
  calls       MemoryClient(read_endpoints=False).search / .retrieve: one gRPC call per token to the
              front end, which calls the shard actors through Ray
  stream      the same through that client's decode(): one step of one open Decode stream per token
  ep calls    MemoryClient.search / .retrieve as they are by default: to a shard's own read endpoint
              (workers/read_endpoint.py), which calls its own shard directly
  ep stream   that client's decode(): the stream to the same endpoint

Printed: p50 and p99 latency per token step (ms) of Search and Retrieve, and each against calls.

    python -m bench.decode_bench [--rows 100000] [--dim 768] [--value-dim 768] [--k 32] [--batch 1]
                                 [--steps 300] [--shards 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time

import numpy as np
import torch

from monim import MemoryClient

SEED = 7


def _percentiles(times: list[float]) -> tuple[float, float]:
    return float(np.percentile(times, 50)) * 1e3, float(np.percentile(times, 99)) * 1e3


def run(args) -> None:
    from monim.workers.embedded import EmbeddedStore

    print(f"# {shlex.join(['python', '-m', 'bench.decode_bench', *sys.argv[1:]])}")
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; {args.rows:,} x {args.dim} keys, value_dim {args.value_dim}, "
          f"k {args.k}, batch {args.batch}, {args.shards} shards, in-process device {args.device}")
    rng = np.random.default_rng(SEED)
    keys = rng.standard_normal((args.rows, args.dim)).astype(np.float32)
    values = rng.standard_normal((args.rows, args.value_dim)).astype(np.float32)
    tokens = np.arange(args.rows) % 50_000
    local = MemoryClient(":memory:", device=args.device)
    local.create_namespace("decode", dim=args.dim, value_dim=args.value_dim)
    local.add("decode", keys, tokens, values=values)
    queries = [keys[rng.integers(0, args.rows, args.batch)] + 0.1 * rng.standard_normal((args.batch, args.dim))
               .astype(np.float32) for _ in range(args.steps)]
    with EmbeddedStore(shards=args.shards, num_cpus=max(2, args.shards)) as store, \
            MemoryClient(store.address) as client, \
            MemoryClient(store.address, read_endpoints=False) as front_end_only:
        client.create_namespace("decode", dim=args.dim, value_dim=args.value_dim)
        for start in range(0, args.rows, 20_000):
            client.add("decode", keys[start:start + 20_000], tokens[start:start + 20_000],
                       values=values[start:start + 20_000])
        ways = {
            ("search", "in-process"): lambda q: local.search("decode", q, args.k),
            ("search", "calls"): lambda q: front_end_only.search("decode", q, args.k),
            ("retrieve", "in-process"): lambda q: local.retrieve("decode", q, args.k, 1.0),
            ("retrieve", "calls"): lambda q: front_end_only.retrieve("decode", q, args.k, 1.0),
            ("search", "ep calls"): lambda q: client.search("decode", q, args.k),
            ("retrieve", "ep calls"): lambda q: client.retrieve("decode", q, args.k, 1.0),
        }
        with front_end_only.decode() as stream, client.decode() as direct:
            ways[("search", "stream")] = lambda q: stream.search("decode", q, args.k)
            ways[("retrieve", "stream")] = lambda q: stream.retrieve("decode", q, args.k, 1.0)
            ways[("search", "ep stream")] = lambda q: direct.search("decode", q, args.k)
            ways[("retrieve", "ep stream")] = lambda q: direct.retrieve("decode", q, args.k, 1.0)
            for call in ways.values():  # warm-up
                for q in queries[:10]:
                    call(q)
            print(f"# front end {store.address}; the endpoint calls and stream went to {direct.target}")
            times = {way: [] for way in ways}
            order = list(ways)
            for q in queries:  # round by round: every way reads the same token's queries
                rng.shuffle(order)  # in a new order each round: what one way leaves behind (an in-process
                for way in order:   # call's spinning threads on a small machine) falls on all alike
                    call = ways[way]
                    started = time.perf_counter()
                    call(q)
                    times[way].append(time.perf_counter() - started)
    print(f"{'read':>8} {'how':>10} | {'p50 ms':>7} {'p99 ms':>7} | {'p50 vs calls':>12}")
    for (read, how), measured in times.items():
        p50, p99 = _percentiles(measured)
        calls_p50, _ = _percentiles(times[(read, "calls")])
        print(f"{read:>8} {how:>10} | {p50:>7.2f} {p99:>7.2f} | {p50 / calls_p50:>11.2f}x")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--value-dim", type=int, default=768)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
