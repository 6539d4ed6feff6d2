"""The learning step's slot kernels (datastore/slot_kernels.py) against the torch sparse products they
replace, on the same rows in one run, and (--sweep) the tiles of each kernel.

The rows are shaped like a search's: distinct within a query, shared between queries (a power law over
the store's rows, so that a batch of B x k slots holds far fewer distinct rows, as run 28b's 491k of
4M did). Each line prints the kernel's time, the torch path's, and their ratio (torch / kernel):

    python -m bench.slot_kernels_bench --device cuda                 # B=4096, k=1024, 1M rows, 768 wide
    python -m bench.slot_kernels_bench --device cuda --sweep         # and every kernel's tiles
    python -m bench.slot_kernels_bench --device cuda --sweep --sweep-kernels sums

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported):
for checking the bench itself at small sizes, not for timing (tests/unit/test_bench_services.py).
"""

from __future__ import annotations

import argparse
import time

import torch
from monim.datastore import memory_ops, slot_kernels

# (SLOTS, DIMS, warps) per kernel, for --sweep
SWEEPS = {
    "value_sum": [(32, 128, 4), (32, 64, 4), (64, 64, 4), (64, 128, 4), (128, 64, 8)],
    "sums": [(32, 128, 4), (16, 128, 4), (32, 64, 4), (64, 64, 4), (16, 64, 4)],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="rows in the store")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--value-dim", type=int, default=768)
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--sweep", action="store_true", help="also time each kernel's tiles")
    p.add_argument("--sweep-kernels", default=",".join(SWEEPS), type=lambda text: text.split(","),
                   help=f"the kernels --sweep tiles (default: all of {', '.join(SWEEPS)})")
    args = p.parse_args(argv)
    unknown = sorted(set(args.sweep_kernels) - set(SWEEPS))
    if unknown:
        p.error(f"--sweep-kernels: no kernel {unknown}; choose among {', '.join(SWEEPS)}")
    return args


def search_shaped_rows(batch: int, k: int, rows: int, device, seed: int = 0) -> torch.Tensor:
    """int64 [batch, k]: each query's slots sorted and distinct (a repeat is an empty slot, -1), drawn
    with a power law over the rows (many queries share the low rows)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    drawn = (torch.rand(batch, k, generator=generator) ** 2.2 * rows).long().clamp_max(rows - 1)
    drawn = torch.sort(drawn, 1).values
    drawn[:, 1:][drawn[:, 1:] == drawn[:, :-1]] = -1
    return drawn.to(device)


def timed(call, repeats: int, sync) -> float:
    """The median of repeats calls, ms (after one untimed call: compilation, caches)."""
    call()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    generator = torch.Generator(device="cpu").manual_seed(1)
    keys = (torch.randn(args.rows, args.dim, generator=generator)).half().to(device)
    values = (0.02 * torch.randn(args.rows, args.value_dim, generator=generator)).to(device)
    rows = search_shaped_rows(args.batch, args.k, args.rows, device)
    alpha = torch.softmax(torch.randn(args.batch, args.k, generator=generator), 1).to(device)
    alpha = torch.where(rows >= 0, alpha, 0.0)
    grad = torch.randn(args.batch, args.value_dim, generator=generator).to(device)
    distinct = int(torch.unique(rows[rows >= 0]).numel())
    print(f"# {args.rows:,} rows, keys float16 {args.dim}, values {args.value_dim}; B={args.batch}, k={args.k}: "
          f"{distinct:,} distinct rows in {int((rows >= 0).sum()):,} slots; device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    slots = memory_ops._Slots(rows, args.rows)
    cells = [
        ("value_sum", lambda: slot_kernels.value_sum(values, rows, alpha),
         lambda: memory_ops._Slots(rows, args.rows).times(alpha, values)),
        ("slot_sums (dots + sums)", lambda: slot_kernels.slot_sums(keys, values, rows, alpha, grad),
         lambda: _torch_slot_sums(slots, keys, values, rows, alpha, grad)),
    ]
    results = []
    print(f"{'what':<26} | {'kernel ms':>9} | {'torch ms':>9} | torch / kernel")
    for name, kernel, reference in cells:
        ours, theirs = timed(kernel, args.repeats, sync), timed(reference, args.repeats, sync)
        results.append({"what": name, "kernel_ms": ours, "torch_ms": theirs})
        print(f"{name:<26} | {ours:9.2f} | {theirs:9.2f} | {theirs / ours:6.2f}x")
    if args.sweep:
        results += sweep(keys, values, rows, alpha, grad, args.repeats, sync, args.sweep_kernels)
    return results


def _torch_slot_sums(slots, keys, values, rows, alpha, grad):
    """slot_sums' three outputs the torch way (memory_ops.slot_partials without the kernels): the dots as a
    sampled product, the key sums gathered a block of queries at a time."""
    agv = alpha * slots.sampled_dots(grad, values)
    weighted = torch.empty(rows.shape[0], keys.shape[1], device=keys.device)
    alpha_keys = torch.empty_like(weighted)
    for part in memory_ops._chunks(rows.shape[0], rows.shape[1], keys.shape[1]):
        gathered = keys[rows[part].clamp_min(0)].float()
        weighted[part] = torch.bmm(agv[part].unsqueeze(1), gathered).squeeze(1)
        alpha_keys[part] = torch.bmm(alpha[part].unsqueeze(1), gathered).squeeze(1)
    return agv, weighted, alpha_keys


def sweep(keys, values, rows, alpha, grad, repeats, sync, kernels=tuple(SWEEPS)) -> list[dict]:
    """Each of the kernels named with each of its SWEEPS tiles, on the same inputs (the committed tiles
    are marked *)."""
    triton = slot_kernels.triton
    batch, k = rows.shape
    dim, value_dim = keys.shape[1], values.shape[1]
    agv, _, _ = slot_kernels.slot_sums(keys, values, rows, alpha, grad)
    m = torch.empty(batch, value_dim, device=rows.device)
    weighted, alpha_keys = torch.empty(batch, dim, device=rows.device), torch.empty(batch, dim, device=rows.device)
    launches = {
        "value_sum": lambda s, d, w: slot_kernels._value_sum_kernel[(batch, triton.cdiv(value_dim, d))](
            rows, alpha, values, m, k, value_dim, SLOTS=s, DIMS=d, num_warps=w),
        "sums": lambda s, d, w: slot_kernels._sums_kernel[(batch, triton.cdiv(dim, d))](
            rows, alpha, agv, keys, weighted, alpha_keys, k, dim, SLOTS=s, DIMS=d, num_warps=w),
    }
    committed = {"value_sum": (slot_kernels.VALUE_SLOTS, slot_kernels.VALUE_DIMS),
                 "sums": (slot_kernels.SLOTS, slot_kernels.SUM_DIMS)}
    results = []
    for name, tiles in ((name, SWEEPS[name]) for name in kernels):
        line = []
        for slots_, dims, warps in tiles:
            ms = timed(lambda: launches[name](slots_, dims, warps), repeats, sync)
            results.append({"what": f"{name} tiles", "tiles": [slots_, dims, warps], "kernel_ms": ms})
            mark = "*" if (slots_, dims) == committed[name] and warps == 4 else ""
            line.append(f"{slots_}x{dims}/{warps}w{mark} {ms:.2f}")
        print(f"{name} tiles (slots x dims / warps, ms): " + " | ".join(line))
    return results


if __name__ == "__main__":
    main()
