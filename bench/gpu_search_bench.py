"""Exact GPU search against what the hardware allows: our kernel vs the bare GEMM vs a copy.

For each key count in ``--rows`` and key dtype in ``--dtypes`` (keys: standard normal, ``--dim``
wide, made on the GPU; queries: stored keys plus noise), and every batch B in ``--batches`` and k in
``--ks``, one run measures:

  ours       datastore.flat_index.torch_search (the search a GPU shard runs: chunked matmul, a
             top-k of the first chunk, threshold filtering of the others; for float16 keys a
             float16 screen of 2k + 16 candidates, then an exact float32 re-rank), answers on
             the host as the shard returns them;
  GEMM       the bare matmul of the same shapes (queries in the keys' dtype times every key,
             chunked over the rows as ours is, output in the keys' dtype), no selection at all;
  copy       a device-to-device copy of the keys (bytes read + written / time): the memory
             bandwidth a search that only reads the keys could reach.

``--compare-unscreened`` adds the same search with the float16 screen's later chunks as a cuBLAS
matmul writing a score block and a Triton filter pass over it (the kernel before
gpu_select.screen_below), in the same run; ``--screen-tiles Q:R:D:W:S,...`` times our search once per
tile of the screen kernel (queries, rows, dims, warps, stages per program) for each batch it serves;
``--compare-setting [MODULE.]NAME=VALUE`` adds the same search with a setting of gpu_select (the
default) or flat_index set to VALUE (a Python literal), in the same run (an A/B of a setting:
SCREEN_MAX_BATCH=128, flat_index.SAMPLE_MIN_STEP=1000000000).

Printed per cell: ms per call (median of ``--repeats`` after a warm-up), ours / GEMM as a rate
(GEMM time / our time: 1.0 = as fast as the bare matmul), and the rate at which ours reads the
keys against the copy bandwidth (what bounds B=1 and B=64).

    python -m bench.gpu_search_bench [--rows 1000000,10000000] [--dim 1024] [--dtypes float16,float32]
                                     [--batches 1,64,4096] [--ks 32,1024,4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import ast
import platform
import shlex
import statistics
import sys
import time
from unittest import mock

import torch
from monim.datastore import flat_index, gpu_select
from monim.datastore.flat_index import _score_blocks, torch_search

SEED = 1234


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


_SETTING_MODULES = {"gpu_select": gpu_select, "flat_index": flat_index}


def _setting(text: str) -> tuple[object, str, object, str]:
    """[MODULE.]NAME=VALUE -> (the module, NAME, the value, the text): a module-level setting of
    gpu_select (MODULE left out) or flat_index."""
    target, _, value = text.partition("=")
    module_name, _, name = target.rpartition(".")
    module = _SETTING_MODULES.get(module_name or "gpu_select")
    if module is None or not hasattr(module, name) or not name.isupper():
        raise argparse.ArgumentTypeError(f"{module_name or 'gpu_select'} has no setting {name!r}")
    try:
        return module, name, ast.literal_eval(value), text
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"{value!r} is not a Python literal") from None


def _timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up, the GPU synchronized around each."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _bare_gemm(queries: torch.Tensor, keys: torch.Tensor, chunk: int) -> None:
    for start in range(0, keys.shape[0], chunk):
        torch.mm(queries, keys[start : start + chunk].T)


def _search_with(module, setting: str, value, queries, keys, norms, k):
    """Our search with module.<setting> set to value for the call."""
    with mock.patch.object(module, setting, value):
        return torch_search(queries, keys, norms, k, "l2")


def _keys(rows: int, dim: int, dtype: torch.dtype, generator: torch.Generator):
    """Standard normal keys and their squared norms, made in parts (a float32 copy of 10M x 1024 is 41 GB)."""
    keys = torch.empty(rows, dim, device=generator.device, dtype=dtype)
    norms = torch.empty(rows, device=generator.device)
    for start in range(0, rows, 1 << 20):
        part = keys[start : start + (1 << 20)]
        part.copy_(torch.randn(part.shape, generator=generator, device=generator.device))
        norms[start : start + part.shape[0]] = (part.float() ** 2).sum(dim=1)
    return keys, norms


def _table(args, keys: torch.Tensor, norms: torch.Tensor, generator: torch.Generator) -> None:
    rows = keys.shape[0]
    key_bytes = keys.numel() * keys.element_size()
    part = keys[: max(1, (4 << 30) // (args.dim * keys.element_size()))]  # 4 GiB at most: room
    copy = _timed(lambda: part.clone(), args.repeats)
    copy_rate = 2 * part.numel() * part.element_size() / copy
    print(f"\n{rows:,} x {args.dim} {str(keys.dtype).removeprefix('torch.')} keys ({key_bytes / 1e9:.1f} GB): "
          f"a copy of {part.shape[0]:,} rows reads+writes {copy_rate / 1e12:.2f} TB/s")
    # Each extra column: (header, gpu_select setting, value) timed beside ours. Unscreened: SCREEN_MIN_BATCH
    # past every batch (the screen's later chunks as matmul + filter pass, the previous kernel).
    compared = [("unscreened ms", gpu_select, "SCREEN_MIN_BATCH", 1 << 62)] if args.compare_unscreened and \
        keys.dtype == torch.float16 else []
    if args.compare_setting:
        module, name, value, text = args.compare_setting
        compared.append((text, module, name, value))
    print(f"{'B':>5} {'k':>5} | {'ours ms':>9} {'GEMM ms':>9} {'vs GEMM':>8} | {'keys read':>10} {'vs copy':>8}"
          + "".join(f" | {header:>13} {'vs ours':>7}" for header, *_ in compared))
    for batch in args.batches:
        picks = torch.randint(0, rows, (batch,), generator=generator, device=keys.device)
        queries = keys[picks].float() + 0.1 * torch.randn(batch, args.dim, generator=generator, device=keys.device)
        chunk = _score_blocks(keys.device, batch, rows)[1]
        gemm_queries = queries.to(keys.dtype)
        gemm = _timed(lambda: _bare_gemm(gemm_queries, keys, chunk), args.repeats)
        for k in args.ks:
            ours = _timed(lambda k=k: torch_search(queries, keys, norms, k, "l2"), args.repeats)
            read_rate = key_bytes / ours
            line = (f"{batch:>5} {k:>5} | {ours * 1e3:>9.2f} {gemm * 1e3:>9.2f} {gemm / ours:>8.2f} | "
                    f"{read_rate / 1e12:>7.2f} TB/s {read_rate / copy_rate:>8.2f}")
            for _, module, name, value in compared:
                other = _timed(lambda k=k, module=module, name=name, value=value:
                               _search_with(module, name, value, queries, keys, norms, k), args.repeats)
                line += f" | {other * 1e3:>13.2f} {other / ours:>6.2f}x"
            print(line, flush=True)
            if args.screen_tiles and gpu_select.screens(keys, batch):
                for tile in args.screen_tiles:
                    took = _timed(lambda k=k, tile=tile: _search_with(gpu_select, "SCREEN_TILES", [(None, tile)],
                                                                      queries, keys, norms, k), args.repeats)
                    print(f"{'':>11} screen tile {':'.join(map(str, tile))}: {took * 1e3:.2f} ms", flush=True)


def run(args: argparse.Namespace) -> None:
    device = torch.device("cuda")
    print(f"# {shlex.join(['python', '-m', 'bench.gpu_search_bench', *sys.argv[1:]])}")
    print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}, {platform.platform()}")
    print(f"# dim {args.dim}; ms per call (median of {args.repeats}); 'vs GEMM' = GEMM time / ours; "
          "'keys read' = key bytes / our time, against the copy's read+write rate")
    generator = torch.Generator(device=device).manual_seed(SEED)
    for rows in args.rows:
        for dtype_name in args.dtypes:
            keys, norms = _keys(rows, args.dim, getattr(torch, dtype_name), generator)
            _table(args, keys, norms, generator)
            del keys, norms
            torch.cuda.empty_cache()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_search_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=_ints, default=[1_000_000, 10_000_000])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--dtypes", default="float16,float32", type=lambda text: text.split(","))
    parser.add_argument("--batches", type=_ints, default=[1, 64, 4096])
    parser.add_argument("--ks", type=_ints, default=[32, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare-unscreened", action="store_true")
    parser.add_argument("--screen-tiles", default=[], type=lambda text: [tuple(map(int, t.split(":")))
                                                                          for t in text.split(",") if t])
    parser.add_argument("--compare-setting", default=None, type=_setting, metavar="[MODULE.]NAME=VALUE",
                        help="also time each cell with gpu_select.NAME (or flat_index.NAME) = VALUE (a Python literal)")
    parser.add_argument("--first-chunk-rows", type=int, default=None,
                        help="flat_index.FIRST_CHUNK_ROWS for this run (default: the module's)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    if args.first_chunk_rows is not None:
        flat_index.FIRST_CHUNK_ROWS = args.first_chunk_rows
    run(args)


if __name__ == "__main__":
    main()
