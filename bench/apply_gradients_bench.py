"""ApplyGradients through the one-process service against the in-process store, by rows a call.

A training loop's value update is one ApplyGradients call of N x value_dim gradients; through the
service its fixed costs (the request's copies, the socket, the router's two rounds) weigh against a
step of a few milliseconds. The cells of issue 12's table (bench/data_plane_bench.py) and of
bench/call_split_bench.py take one p50 of 20-30 calls; this bench takes many more of the one call
it times, for an A/B of a change to that path (run it from two installs, one process after the
other, as docs/BENCHMARKS.md does).

    python -m bench.apply_gradients_bench --device cuda --rows 50000 --sizes 1024,8192
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from bench.call_split_bench import p50_ms
from bench.search_bench import int_list


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.apply_gradients_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=50_000, help="rows stored")
    parser.add_argument("--dim", type=int, default=768, help="key and value width")
    parser.add_argument("--sizes", type=int_list, default=[1024, 8192], help="rows a call")
    parser.add_argument("--calls", type=int, default=150, help="timed calls of the smallest size (fewer, larger)")
    args = parser.parse_args(argv)
    from bench.one_process_service import OneProcessService
    from monim import MemoryClient

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    values = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    print(f"# python -m bench.apply_gradients_bench {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"# {args.rows:,} x {args.dim} rows with values (adam) on {args.device}; p50 ms")
    print(f"{'rows a call':>12} | {'in-process':>10} {'service':>9} | in/service")
    with OneProcessService(args.device) as service, MemoryClient(service.address) as remote, \
            MemoryClient(":memory:", device=args.device) as local:
        for client in (local, remote):
            client.create_namespace("apply", dim=args.dim, value_dim=args.dim, optimizer="adam", lr=0.01)
            client.add("apply", keys, np.arange(args.rows), values=values)
        for size in args.sizes:
            ids = rng.choice(args.rows, min(size, args.rows), replace=False)
            grads = rng.standard_normal((ids.size, args.dim), dtype=np.float32)
            calls = max(10, args.calls * min(args.sizes) // size)
            ms = [p50_ms(lambda c=client: c.apply_gradients("apply", ids, grads), calls, warm_ups=10)
                  for client in (local, remote)]
            print(f"{ids.size:>12,} | {ms[0]:>10.3f} {ms[1]:>9.3f} | {ms[0] / ms[1]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
