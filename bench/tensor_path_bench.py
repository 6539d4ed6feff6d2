"""The device path (as_tensors) against the host's way, in-process on one GPU, in one run.

    python -m bench.tensor_path_bench [--rows 1000000] [--batch 4096] [--tokens 64]

Prints: a decoding step's Retrieve and Search (B=1, k=32) with numpy arrays, with tensors on the
device (the answer ready there), and the host path (tensors in and out, but the store read the host's
way: what MoNIMLayer did before as_tensors); a training step (Retrieve + backward, B=--batch) at k=32
and 1024 with numpy and with tensors, against a Search; and a GPT-2-size (124M, random init) greedy
decode with attach_monim: bare, MoNIM on the device path, MoNIM on the host path, kNN-LM. Ways are
interleaved round by round; medians. For a CUDA device (docs/BENCHMARKS.md, "The device path");
--device cpu runs it on the host (the host's way both).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from monim.model_client.hf import attach_monim

from monim import MemoryClient

DIM = 768


class HostPath(MemoryClient):
    """Another client of the same store that reads it the host's way (queries to numpy and back)."""

    def _retrieve_tensors(self, namespace, queries, k, temperature, **options):
        found = super()._retrieve_tensors(namespace, queries.cpu(), k, temperature, **options)
        return found.to_tensors(queries.device, queries)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.tensor_path_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=4096, help="the training step's queries")
    parser.add_argument("--tokens", type=int, default=64, help="generated per timed decode")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cells", default="decode,train,lm", help="which of decode, train, lm to run")
    parser.add_argument("--profile", default="", metavar="DIR",
                        help="also trace the training step at k=1024 (the search, the numpy step, the tensors "
                             "step; torch.profiler, 3 calls each after warm-ups) into DIR/<way>.json and print "
                             "each trace's summary")
    parser.add_argument("--profile-stack", action="store_true",
                        help="with --profile: also one numpy step traced with Python's calls (with_stack), and "
                             "its Python calls of 200 us or more printed in order")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    rng = np.random.default_rng(0)
    client = MemoryClient(":memory:", device=args.device)
    client.create_namespace("m", dim=DIM, value_dim=DIM, max_k=1024, optimizer="adam", lr=1e-3)
    for start in range(0, args.rows, 65_536):
        n = min(65_536, args.rows - start)
        client.add("m", rng.standard_normal((n, DIM), dtype=np.float32), rng.integers(0, 50_000, n),
                   values=0.02 * rng.standard_normal((n, DIM), dtype=np.float32))
    host = HostPath(":memory:", device=args.device)
    host._store = client._store  # the same store, read the other way
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "no GPU"
    print(f"# python -m bench.tensor_path_bench --rows {args.rows} --batch {args.batch} --tokens {args.tokens} "
          f"--device {args.device}: {gpu}, torch {torch.__version__}", flush=True)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(call, n: int, warm_ups: int) -> tuple[float, float]:
        for _ in range(warm_ups):
            call()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        return 1e3 * float(np.median(times)), 1e3 * float(np.percentile(times, 99))

    cells = set(args.cells.split(","))
    if "decode" in cells:
        decode_cells(client, host, rng, args, timed, sync)
    if "train" in cells:
        train_cells(client, rng, args, timed, sync)
    if args.profile:
        profile_step(client, rng, args, sync)
    if "lm" in cells:
        lm_cells(client, host, args, sync)


def decode_cells(client, host, rng, args, timed, sync) -> None:
    steps = [rng.standard_normal((1, DIM), dtype=np.float32) for _ in range(64)]
    on_device = [torch.from_numpy(q).to(args.device) for q in steps]
    turn = [0]

    def step() -> int:
        turn[0] = (turn[0] + 1) % len(steps)
        return turn[0]

    def waited(call):
        def run():
            call(step())
            sync()
        return run

    ways = {
        "Retrieve, numpy": waited(lambda i: client.retrieve("m", steps[i], 32, 1.0)),
        "Retrieve, tensors": waited(lambda i: client.retrieve("m", on_device[i], 32, 1.0, as_tensors=True)),
        "Retrieve, tensors the host's way": waited(lambda i: host.retrieve("m", on_device[i], 32, 1.0,
                                                                           as_tensors=True)),
        "Search, numpy": waited(lambda i: client.search("m", steps[i], 32, return_weights=True)),
        "Search, tensors": waited(lambda i: client.search("m", on_device[i], 32, return_weights=True,
                                                          as_tensors=True)),
    }
    results = {way: [] for way in ways}
    for round_ in range(args.rounds):
        for way, call in ways.items():
            results[way].append(timed(call, 100, 10 if round_ == 0 else 2))
    for way, times in results.items():
        print(f"decode B=1 k=32 {way}: p50 {np.median([t[0] for t in times]):.3f} ms, "
              f"p99 {np.median([t[1] for t in times]):.3f} ms", flush=True)


def train_cells(client, rng, args, timed, sync) -> None:
    for k in (32, 1024):
        queries = rng.standard_normal((args.batch, DIM), dtype=np.float32)
        grad = rng.standard_normal((args.batch, DIM), dtype=np.float32)
        ways = step_ways(client, queries, grad, k, args.device)

        def on_tensors():
            ways["tensors"]()
            sync()

        search = timed(ways["search"], 12, 4)[0]
        numpy_step, tensor_step = timed(ways["numpy"], 12, 30)[0], timed(on_tensors, 12, 30)[0]
        print(f"train B={args.batch} k={k}: search {search:.1f} ms; Retrieve + backward numpy {numpy_step:.1f} ms "
              f"({numpy_step / search:.2f}x), tensors {tensor_step:.1f} ms ({tensor_step / search:.2f}x)", flush=True)


# The device's events in a torch.profiler trace.
DEVICE_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")


def traced_events(prof, path: str) -> list[dict]:
    """The complete events ("X") of prof's chrome trace, written to path."""
    prof.export_chrome_trace(path)
    with open(path) as trace:
        return [e for e in json.load(trace)["traceEvents"] if e.get("ph") == "X"]


def step_ways(client, queries, grad, k, device, memory_only: bool = False) -> dict:
    """The training step's ways at k: the search it is measured against, Retrieve + backward with numpy
    arrays in and out, and with tensors on the store's device (memory_only: the forward answers the
    memory alone, as MoNIMLayer asks and issue 12's cell measures)."""
    queries_on, grad_on = torch.from_numpy(queries).to(device), torch.from_numpy(grad).to(device)

    def on_numpy():
        found = client.retrieve("m", queries, k, 1.0, keep_state=True, memory_only=memory_only)
        client.retrieve_backward("m", found, grad)

    def on_tensors():
        found = client.retrieve("m", queries_on, k, 1.0, keep_state=True, as_tensors=True, memory_only=memory_only)
        client.retrieve_backward("m", found, grad_on)

    return {"search": lambda: client.search("m", queries, k), "numpy": on_numpy, "tensors": on_tensors}


def profile_step(client, rng, args, sync, k: int = 1024, calls: int = 3) -> None:
    """Each way of the step at k (memory_only) traced by torch.profiler (host and device), into args.profile/<way>.json,
    and summed here: the wall time a call, the device's kernels, copies by direction, and the time the
    device sat idle in gaps over 50 us (the host's share of the step)."""
    import os

    from torch.profiler import ProfilerActivity, profile

    os.makedirs(args.profile, exist_ok=True)
    queries = rng.standard_normal((args.batch, DIM), dtype=np.float32)
    grad = rng.standard_normal((args.batch, DIM), dtype=np.float32)
    for way, call in step_ways(client, queries, grad, k, args.device, memory_only=True).items():
        for _ in range(30):
            call()
        sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(calls):
                call()
                sync()
            wall = (time.perf_counter() - t0) / calls
        events = traced_events(prof, os.path.join(args.profile, f"{way}.json"))
        device = sorted((e for e in events if e.get("cat") in DEVICE_EVENTS), key=lambda e: e["ts"])
        sums: dict[str, float] = {}
        for e in device:
            kind = e["name"] if e["cat"] == "gpu_memcpy" else e["cat"]  # "Memcpy HtoD (Pageable -> Device)"
            sums[kind] = sums.get(kind, 0.0) + e["dur"] / 1e3 / calls
        idle, end = 0.0, None
        for e in device:
            if end is not None and e["ts"] - end > 50:
                idle += (e["ts"] - end) / 1e3 / calls
            end = e["ts"] + e["dur"] if end is None else max(end, e["ts"] + e["dur"])
        kernels: dict[str, float] = {}
        for e in device:
            if e["cat"] == "kernel":
                kernels[e["name"][:70]] = kernels.get(e["name"][:70], 0.0) + e["dur"] / 1e3 / calls
        top = sorted(kernels.items(), key=lambda item: -item[1])[:8]
        print(f"profile k={k} {way}: {1e3 * wall:.1f} ms a call (traced); device: "
              + ", ".join(f"{kind} {ms:.2f}" for kind, ms in sorted(sums.items())) + f" ms; idle in gaps {idle:.2f} ms",
              flush=True)
        for name, ms in top:
            print(f"    {ms:7.2f} ms  {name}", flush=True)
        if args.profile_stack and way == "numpy":
            python_calls(call, activities, sync)


def python_calls(call, activities, sync, least_us: float = 200.0) -> None:
    """One call traced with Python's own calls: those of least_us or more, in order of their start (ms
    from the first), with the device's busy time under each (what the host did while the device waited)."""
    import tempfile

    from torch.profiler import profile

    with profile(activities=activities, with_stack=True) as prof:
        call()
        sync()
    with tempfile.NamedTemporaryFile(suffix=".json") as trace_file:
        events = traced_events(prof, trace_file.name)
    device = [e for e in events if e.get("cat") in DEVICE_EVENTS]
    calls = sorted((e for e in events if e.get("cat") == "python_function" and e["dur"] >= least_us),
                   key=lambda e: e["ts"])
    if not calls:
        print("    (no Python calls traced)", flush=True)
        return
    start = calls[0]["ts"]
    for e in calls:
        busy = sum(max(0.0, min(e["ts"] + e["dur"], d["ts"] + d["dur"]) - max(e["ts"], d["ts"])) for d in device)
        print(f"    py {(e['ts'] - start) / 1e3:8.2f} ms  {e['dur'] / 1e3:7.2f} ms (device busy {busy / 1e3:6.2f})  "
              f"{e['name'][:110]}", flush=True)


def lm_cells(client, host, args, sync) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_head=12, n_embd=DIM, vocab_size=50_257)).to(args.device).eval()
    prompt = torch.randint(0, 50_257, (1, 32), device=args.device)

    def run():
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                           pad_token_id=0)

    def per_token(mode, reader) -> float:
        handle = None if mode is None else attach_monim(model, reader, "m", k=32, mode=mode)
        try:
            run()
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            return (time.perf_counter() - t0) / args.tokens
        finally:
            if handle is not None:
                handle.detach()

    ways = {"bare": (None, None), "MoNIM": ("monim", client), "MoNIM the host's way": ("monim", host),
            "kNN-LM": ("knnlm", client)}
    times = {way: [] for way in ways}
    for _ in range(args.rounds):
        for way, (mode, reader) in ways.items():
            times[way].append(per_token(mode, reader))
    bare = float(np.median(times["bare"]))
    print(f"GPT-2-size greedy decode, bare {1e3 * bare:.2f} ms/token: " + ", ".join(
        f"{way} {np.median(times[way]) / bare:.2f}x ({1e3 * np.median(times[way]):.2f} ms)"
        for way in list(ways)[1:]), flush=True)
    store = client._store.runtime.shards[0].stores["m"]
    if store.graphs is not None:
        print(f"graphs: {store.graphs.captures} captured, {store.graphs.replays} replays, "
              f"failure {store.graphs.failure}")


if __name__ == "__main__":
    main()
