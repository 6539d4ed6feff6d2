"""The in-process learning step with this tree's datastore/memory_ops.py against another version of it,
interleaved round by round on one store: search, Retrieve, Retrieve+backward (Adam) at B=4096 for each k.

    git show REV:datastore/memory_ops.py > /tmp/old_memory_ops.py
    python -m bench.memory_ops_ab /tmp/old_memory_ops.py --rows 1000000 --dim 768 --device cuda

The other version's value_sum and slot_partials replace this tree's for its cells (the store calls them
through the module), so both run on the same rows, queries and gradients.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import numpy as np
import torch
from monim.datastore import NamespaceConfig, memory_ops
from monim.model_client.local_store import LocalMemory

SWAPPED = ("value_sum", "slot_partials")


def _load(path: str):
    spec = importlib.util.spec_from_file_location("other_memory_ops", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _packing(slot_partials):
    """A version of slot_partials from before df314f1 (it answered BackwardPartials of numpy arrays,
    without alpha's total) as this tree's store calls it: its sums packed in one float64 tensor on the
    device, with alpha's total over the held slots appended."""
    def packed(keys, values, rows, alpha, distances, grad_memory):
        partials, unique_rows, grads = slot_partials(keys, values, rows, alpha, distances, grad_memory)
        if torch.is_tensor(partials):
            return partials, unique_rows, grads  # a version that packs already
        columns = [torch.as_tensor(np.asarray(getattr(partials, name), np.float64)).reshape(rows.shape[0], -1)
                   for name in ("weighted_keys", "alpha_keys", "grad_dot", "grad_dot_dist", "alpha_dist")]
        alpha_total = torch.where(rows >= 0, alpha, 0).double().sum(1, keepdim=True).cpu()
        return torch.cat([*columns, alpha_total], dim=1).to(values.device), unique_rows, grads
    return packed


def _timed(call, device: str, repeats: int) -> float:
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    call()
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory_ops_ab", description=__doc__.splitlines()[0])
    parser.add_argument("other", help="path of the other memory_ops.py")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--ks", default="32,1024")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    other = {name: getattr(_load(args.other), name) for name in SWAPPED}
    other["slot_partials"] = _packing(other["slot_partials"])
    versions = {"other": other, "this tree": {name: getattr(memory_ops, name) for name in SWAPPED}}
    store = LocalMemory(args.device)
    store.create_namespace(NamespaceConfig("ab", dim=args.dim, value_dim=args.dim, max_k=max(ks),
                                           optimizer={"name": "adam", "lr": 1e-3}))
    generator = torch.Generator().manual_seed(0)
    for start in range(0, args.rows, 200_000):
        n = min(200_000, args.rows - start)
        keys = torch.randn(n, args.dim, generator=generator).numpy()
        store.add("ab", keys, np.arange(n) % 50_000, (0.02 * torch.randn(n, args.dim, generator=generator)).numpy())
        if start == 0:
            queries = (torch.from_numpy(keys[: args.batch]) + 0.1 * torch.randn(args.batch, args.dim)).numpy()
    grad = torch.randn(args.batch, args.dim, generator=generator).numpy()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} CPU threads"
    print(f"# {args.rows:,} x {args.dim} keys, values {args.dim} (Adam), B={args.batch}, device {args.device} ({name}), "
          f"torch {torch.__version__}")

    def step(k):
        found = store.retrieve("ab", queries, k, 1.0)
        store.retrieve_backward("ab", found.queries, found.ids, found.alpha, found.distances, grad, found.temperature)

    for k in ks:
        for round_ in range(args.rounds):
            for label, functions in versions.items():
                for function, implementation in functions.items():
                    setattr(memory_ops, function, implementation)
                search = _timed(lambda: store.search("ab", queries, k), args.device, args.repeats)
                forward = _timed(lambda: store.retrieve("ab", queries, k, 1.0), args.device, args.repeats)
                both = _timed(lambda: step(k), args.device, args.repeats)
                print(f"round {round_} k={k:<5} {label:<10} search {search:8.1f} ms | retrieve {forward:8.1f} ms "
                      f"({forward / search:4.2f}x) | retrieve+backward {both:8.1f} ms ({both / search:4.2f}x)", flush=True)
    for function, implementation in versions["this tree"].items():
        setattr(memory_ops, function, implementation)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
