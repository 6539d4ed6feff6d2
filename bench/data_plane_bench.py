"""The data plane: the in-process store against the service, every row of issue 12's table in one run.

On ONE random data set (``--rows`` float32 keys of width ``--dim``, values of width ``--value-dim``,
fixed seed; queries are stored keys plus noise), loaded into two stores:

  in-process  MemoryClient(":memory:", device=--device): the router over one shard in this process
              (the same validation and arithmetic as a shard of the service, no network);
  service     MemoryClient(address) -> gRPC -> router -> ``--shards`` Ray shard actors (a GPU each
              where the machine has as many), all started in this process by EmbeddedStore; its
              reads and training steps (Search, Retrieve, decode streams, RetrieveBackward) go to a
              shard's read endpoint, as a client's do by default (docs/API.md, "Read endpoints";
              ``--front-end-reads``: to the front end), its writes to the front end,

it measures, each cell on both back to back:

  add         rows/s of Add with values (the load itself) and of keys only (--keys-only-rows)
  search      q/s at B in --batches and k in --ks (B over the median call, after SEARCH_WARM_UPS untimed ones)
  decode      one generated token's read, B=1 k=32: Search and Retrieve p50 / p99, as calls and
              (service) as steps of one Decode stream (to a shard's own endpoint, by default)
  learn       Retrieve(keep_state) + RetrieveBackward against Search at B=4096 (the training step): the
              layer's (memory_only: m alone comes back), and with the neighbours' columns in the answer
  apply       ApplyGradients (Adam) rows/s at --apply-rows, and one ApplyGradients larger than a
              gRPC message (--big-apply-rows x value_dim, split by the client)
  lm          greedy decoding of a GPT-2-size LM (random init, 124M, built here: nothing is
              downloaded) bare and with attach_monim in MoNIM and kNN-LM mode, ms per token

    python -m bench.data_plane_bench --device cuda --rows 1000000 --shards 1
    python -m bench.data_plane_bench --rows 20000 --lm-size tiny     # a quick check on a CPU

--compare-one-message adds the service's largest Searches with their answers in one message (the
client before SearchParts), interleaved with the same Searches answered in parts.
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
from monim.model_client import client as client_module

from bench.grpc_floor import GrpcFloor
from bench.lm_floor import BareRead, ReadInAnotherProcess, reading
from bench.one_process_service import OneProcessService
from bench.search_bench import int_list, same_neighbours

NAMESPACE = "bench-plane"
SEED = 2024


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.data_plane_bench", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--value-dim", type=int, default=768)
    p.add_argument("--shards", type=int, default=1, help="service shard actors (default 1)")
    p.add_argument("--service", choices=("ray", "one-process"), default="ray",
                   help="ray: EmbeddedStore (Ray shard actors, their read endpoints); one-process: one shard and "
                        "its router in a server process of their own, without Ray (bench/one_process_service.py)")
    p.add_argument("--shard-cpus", type=int, default=1,
                   help="CPUs each shard actor holds (monim serve --shard-cpus; its torch and faiss threads)")
    p.add_argument("--device", default="cpu", help="the in-process store's device: cpu or cuda")
    p.add_argument("--batches", type=int_list, default=[1, 64, 4096])
    p.add_argument("--ks", type=int_list, default=[32, 1024])
    p.add_argument("--learn-batch", type=int, default=4096, help="B of the training-step cells")
    p.add_argument("--front-end-reads", action="store_true",
                   help="the service's reads go to the front end, not to a shard's read endpoint")
    p.add_argument("--decode-steps", type=int, default=300, help="tokens of the B=1 decode cells")
    p.add_argument("--decode-block", type=int, default=1,
                   help="steps each way of the decode cells takes in turn (1: the ways alternate step by step; "
                        "a larger block is what one model's generation looks like to a GPU that the in-process "
                        "store and the shard's process share: it switches between their contexts once a block)")
    p.add_argument("--apply-rows", type=int, default=65_536, help="rows per ApplyGradients in the rate cell")
    p.add_argument("--big-apply-rows", type=int, default=131_072, help="one ApplyGradients past the message limit")
    p.add_argument("--keys-only-rows", type=int, default=100_000)
    p.add_argument("--lm-size", choices=("gpt2", "tiny", "none"), default="gpt2")
    p.add_argument("--lm-tokens", type=int, default=64, help="tokens generated per decode")
    p.add_argument("--repeats", type=int, default=10, help="fewest timed calls per cell")
    p.add_argument("--budget-s", type=float, default=4.0,
                   help="time a cell's calls for this long (past --repeats; at most MOST_TIMED_CALLS)")
    p.add_argument("--compare-one-message", action="store_true",
                   help="also time the service's largest Searches with their answers in one message (before parts)")
    p.add_argument("--json", metavar="PATH")
    return p.parse_args(argv)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


STEP_WARM_UPS = 32
# A search cell's untimed calls: more than a store's CAPTURE_AFTER (datastore/search_graphs.py).
SEARCH_WARM_UPS = 4
# Turns of the two ways in a search cell.
SEARCH_ROUNDS = 3


# A cell's timed calls at most (a call of one query takes ~1 ms: its p50 over hundreds of calls, not three).
MOST_TIMED_CALLS = 2000


def timed(call, repeats: int, budget_s: float, warm_ups: int = 1) -> list[float]:
    """warm_ups calls, then seconds per call: ``repeats`` calls, and more while ``budget_s`` lasts (at
    most MOST_TIMED_CALLS), so that a fast call's p50 is not one of a handful."""
    for _ in range(warm_ups):
        call()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max(1, repeats) or (time.perf_counter() - started < budget_s and len(times) < MOST_TIMED_CALLS):
        t0 = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def p50(times) -> float:
    return float(np.median(times))


def make_data(args):
    rng = np.random.default_rng(SEED)
    keys = rng.standard_normal((args.rows, args.dim), dtype=np.float32)
    values = 0.02 * rng.standard_normal((args.rows, args.value_dim), dtype=np.float32)
    tokens = rng.integers(0, 50_257, args.rows)
    picks = rng.integers(0, args.rows, max(*args.batches, args.learn_batch, args.decode_steps))
    queries = keys[picks] + 0.1 * rng.standard_normal((len(picks), args.dim), dtype=np.float32)
    return rng, keys, values, tokens, queries


def create(client, name, args):
    client.create_namespace(name, dim=args.dim, value_dim=args.value_dim, max_k=max(args.ks), optimizer="adam",
                            lr=1e-3)


def warm_up(client, args) -> None:
    """One Add and one search on a scratch namespace, untimed: the service's first calls start its
    read endpoint (the client asks for it at its first memory-layer call) and the shard's torch."""
    client.create_namespace("warm-up", dim=args.dim, value_dim=args.value_dim)
    client.add("warm-up", np.zeros((1, args.dim), np.float32), np.zeros(1, np.int64),
               values=np.zeros((1, args.value_dim), np.float32))
    client.search("warm-up", np.zeros((1, args.dim), np.float32), 1)
    client.drop_namespace("warm-up")


def load(client, name, keys, tokens, values, chunk: int = 65_536) -> tuple[float, np.ndarray]:
    """Adds every row in chunks; returns (rows/s, each id's row: an Add the client splits numbers its
    rows in the order its parts land, so ids need not follow the rows)."""
    sync()
    t0 = time.perf_counter()
    ids = []
    for start in range(0, len(keys), chunk):
        part = slice(start, start + chunk)
        ids.append(client.add(name, keys[part], tokens[part], values=None if values is None else values[part]))
    sync()
    rate = len(keys) / (time.perf_counter() - t0)
    ids = np.concatenate(ids)
    row_of = np.full(int(ids.max()) + 1, -1, np.int64)
    row_of[ids] = np.arange(ids.size)
    return rate, row_of


class Table:
    """Rows of (what, in-process, service, service/in-process, goal, floor), printed as they come and at the end.
    floor: in-process plus a bare gRPC call of the same bytes (bench/grpc_floor.py), and the service against it."""

    def __init__(self):
        self.rows: list[dict] = []

    def add(self, what: str, local: str, service: str, ratio: str = "", goal: str = "", floor: str = "", **numbers):
        row = dict(what=what, local=local, service=service, ratio=ratio, goal=goal, floor=floor, numbers=numbers)
        self.rows.append(row)
        print(f"  {what}: in-process {local} | service {service} {ratio} (goal {goal or '-'})"
              + (f" | in-process + bare gRPC {floor}" if floor else ""), flush=True)

    def render(self) -> str:
        head = ("what", "in-process", "through the service", "svc/in", "goal (service)", "in-process + bare gRPC (svc/it)")
        cells = [head] + [(r["what"], r["local"], r["service"], r["ratio"], r["goal"], r["floor"]) for r in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
        lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
        lines.insert(1, "-+-".join("-" * w for w in widths))
        return "\n".join(lines)


def search_cells(table, local, remote, queries, args, floor):
    for k in args.ks:
        qps, ratios = {}, []
        for batch in args.batches:
            q = queries[:batch]
            times = {"in": [], "svc": []}
            # The two ways in turns (SEARCH_ROUNDS of each), so that the GPU's and the host's drift over
            # the cell (clocks, other work) weighs on both alike; p50 of all a way's calls.
            for round_ in range(SEARCH_ROUNDS):
                for name, client in (("in", local), ("svc", remote)):
                    # Past the store's graph capture of a small search's shape (CAPTURE_AFTER searches:
                    # the one capture took 3-4x a search, and was one of the three timed ones before).
                    times[name] += timed(lambda: client.search(NAMESPACE, q, k), -(-args.repeats // SEARCH_ROUNDS),
                                         args.budget_s / SEARCH_ROUNDS, warm_ups=SEARCH_WARM_UPS if round_ == 0 else 1)
            for name in times:
                qps[name, batch] = batch / p50(times[name])
            # The answer: ids int64, distances float32, tokens int32 per neighbour.
            qps["floor", batch] = batch / (batch / qps["in", batch] + floor.read(q.nbytes, batch * k * 16))
            a, b = client_first(local, q, k, args.row_of["in"]), client_first(remote, q, k, args.row_of["svc"])
            if not same_neighbours(a, b):
                print(f"WARNING: B={batch} k={k}: the first query's neighbours differ")
            ratios.append(qps["svc", batch] / qps["in", batch])
        fmt = " / ".join
        table.add(f"Search q/s, B={'/'.join(map(str, args.batches))}, k={k}",
                  fmt(f"{qps['in', b]:,.0f}" for b in args.batches), fmt(f"{qps['svc', b]:,.0f}" for b in args.batches),
                  "(" + fmt(f"{r:.2f}" for r in ratios) + "x)", ">= 0.8x in every cell",
                  fmt(f"{qps['floor', b]:,.0f}" for b in args.batches)
                  + " (" + fmt(f"{qps['svc', b] / qps['floor', b]:.2f}" for b in args.batches) + ")",
                  qps={f"{n}_B{b}": v for (n, b), v in qps.items()})


def one_message_cells(table, remote, queries, args):
    """The service's reads at the largest batch with every answer in one message (the client before
    SearchParts / RetrieveParts), against the same reads answered in parts, interleaved call by call."""
    q = queries[:max(args.batches)]
    for k in args.ks:
        answer = len(q) * k * 16
        if answer <= client_module.CHUNK_BYTES:
            continue
        times = {"parts": [], "one": []}
        saved = client_module.CHUNK_BYTES
        try:
            for i in range(2 * args.repeats + 2):
                way = ("parts", "one")[i % 2]
                client_module.CHUNK_BYTES = saved if way == "parts" else 1 << 62
                t0 = time.perf_counter()
                remote.search(NAMESPACE, q, k)
                if i >= 2:
                    times[way].append(time.perf_counter() - t0)
        finally:
            client_module.CHUNK_BYTES = saved
        parts, one = 1e3 * p50(times["parts"]), 1e3 * p50(times["one"])
        table.add(f"Search through the service, B={len(q)}, k={k} ({answer / 1e6:.0f} MB answer): in parts / one message",
                  "", f"{parts:.1f} / {one:.1f} ms", f"({one / parts:.2f}x faster in parts)", "", "",
                  parts_ms=parts, one_message_ms=one)


def client_first(client, q, k, row_of):
    """The first query's neighbours as (rows of the loaded data, distances)."""
    found = client.search(NAMESPACE, q[:1], k)
    return row_of[found.ids[0]], found.distances[0]


def decode_cells(table, local, remote, queries, args, floor):
    """B=1, k=32, one read per token, round by round (--decode-block steps of each way a round) so that
    all ways see the same load."""
    steps = [queries[i:i + 1] for i in range(args.decode_steps)]
    # A bare stream's step with the same bytes: the query up; neighbours (16 bytes each) down, and for
    # a Retrieve the memory output (value_dim float32) and alpha too.
    floor_s = {"search": floor.stream_step(steps[0].nbytes, 32 * 16),
               "retrieve": floor.stream_step(steps[0].nbytes, 32 * 20 + 4 * args.value_dim)}
    on_device = [torch.from_numpy(q).to(args.device) for q in steps]
    tensor_of = {id(q): t for q, t in zip(steps, on_device)}

    def tensors_in(q):  # the layer's way (as_tensors): the query on the device, the memory ready there
        found = local.retrieve(NAMESPACE, tensor_of[id(q)], 32, 1.0, as_tensors=True)
        sync()
        return found

    with remote.decode() as stream:
        ways = {("search", "in"): lambda q: local.search(NAMESPACE, q, 32),
                ("search", "calls"): lambda q: remote.search(NAMESPACE, q, 32),
                ("search", "stream"): lambda q: stream.search(NAMESPACE, q, 32),
                ("retrieve", "in"): lambda q: local.retrieve(NAMESPACE, q, 32, 1.0),
                ("retrieve", "in tensors"): tensors_in,
                ("retrieve", "calls"): lambda q: remote.retrieve(NAMESPACE, q, 32, 1.0),
                ("retrieve", "stream"): lambda q: stream.retrieve(NAMESPACE, q, 32, 1.0)}
        for call in ways.values():
            for q in steps[:10]:
                call(q)
        where = "front end" if stream.target == remote.target else "a shard's endpoint"
        times = {way: [] for way in ways}
        block = max(1, args.decode_block)
        for first in range(0, len(steps), block):
            for way, call in ways.items():
                for q in steps[first:first + block]:
                    t0 = time.perf_counter()
                    call(q)
                    times[way].append(time.perf_counter() - t0)

    def pct(way):
        return 1e3 * np.percentile(times[way], 50), 1e3 * np.percentile(times[way], 99)

    for read, goal in (("search", "<= 1.0 / 2.0 ms"), ("retrieve", "<= 1.5 / 3.0 ms")):
        local_p = pct((read, "in"))
        call_p, stream_p = pct((read, "calls")), pct((read, "stream"))
        best_ms = local_p[0] + 1e3 * floor_s[read]
        tensors = "" if read == "search" else " (tensors on the device %.2f / %.2f)" % pct((read, "in tensors"))
        table.add(f"decode: {read.capitalize()} B=1 k=32, p50 / p99", f"{local_p[0]:.2f} / {local_p[1]:.2f} ms{tensors}",
                  f"stream {stream_p[0]:.2f} / {stream_p[1]:.2f} ms to {where} (calls {call_p[0]:.2f} / {call_p[1]:.2f})",
                  "", goal, f"p50 {best_ms:.2f} ms ({stream_p[0] / best_ms:.2f})",
                  in_process_ms=local_p, calls_ms=call_p, stream_ms=stream_p, bare_stream_step_ms=1e3 * floor_s[read])


def learn_cells(table, local, remote, queries, rng, args, floor):
    q = queries[:args.learn_batch]
    grad = rng.standard_normal((len(q), args.value_dim), dtype=np.float32)
    for k, goal in zip(args.ks, ("<= 1.3x (in-process too)", "<= 1.5x (in-process too)")):
        # The layer's step (MoNIMLayer: memory_only): the queries up, the memory output down; then
        # grad_memory up and grad_queries down. (The forward's answer in parts past CHUNK_BYTES; the
        # backward whole up to half the message limit.) "with neighbours": the forward's answer also
        # carries ids int64, alpha, distances, weights float32 and tokens int32 [B, k].
        wire_s = (floor.read(q.nbytes, len(q) * 4 * args.value_dim)
                  + floor.transfer(grad.nbytes, q.nbytes, whole_up_to=remote.max_message_bytes))
        ratio = {}
        for name, client in (("in", local), ("svc", remote)):
            search = p50(timed(lambda: client.search(NAMESPACE, q, k), args.repeats, args.budget_s))
            for memory_only in (True, False):
                def step():
                    r = client.retrieve(NAMESPACE, q, k, 1.0, keep_state=True, memory_only=memory_only)
                    client.retrieve_backward(NAMESPACE, r, grad)
                # A training loop's steady state: torch caches the pinned host buffers of a step's copies
                # once the arrays of the steps before (the user's results, the forward states kept for their
                # backward) are freed; the first ~26 steps at k=1024 allocate theirs (cudaHostAlloc, ~11 ms each).
                both = p50(timed(step, args.repeats, args.budget_s, warm_ups=STEP_WARM_UPS))
                ratio[name, memory_only] = (both / search, both, search)
        q_on, grad_on = torch.from_numpy(q).to(args.device), torch.from_numpy(grad).to(args.device)

        def tensor_step():  # the layer's way in-process: tensors in and out, on the store's device
            r = local.retrieve(NAMESPACE, q_on, k, 1.0, keep_state=True, as_tensors=True, memory_only=True)
            local.retrieve_backward(NAMESPACE, r, grad_on)
            sync()
        on_device = p50(timed(tensor_step, args.repeats, args.budget_s, warm_ups=STEP_WARM_UPS))

        def cell(name):
            ratio_, both, search = ratio[name, True]
            return (f"{ratio_:.2f}x ({1e3 * both:.1f} / {1e3 * search:.1f} ms); with neighbours "
                    f"{ratio[name, False][0]:.2f}x")
        table.add(f"Retrieve+backward / Search, B={len(q)}, k={k}",
                  f"{cell('in')}; tensors {on_device / ratio['in', True][2]:.2f}x", cell("svc"), "", goal,
                  f"step {1e3 * (ratio['in', True][1] + wire_s):.1f} ms "
                  f"({ratio['svc', True][1] / (ratio['in', True][1] + wire_s):.2f})",
                  in_process=ratio["in", True], through_service=ratio["svc", True],
                  in_process_with_neighbours=ratio["in", False], through_service_with_neighbours=ratio["svc", False],
                  bare_transfers_s=wire_s, in_process_tensors_s=on_device)


def apply_cells(table, local, remote, rng, args, floor):
    n = min(args.apply_rows, args.rows)
    ids = rng.choice(args.rows, n, replace=False).astype(np.int64)
    grads = rng.standard_normal((n, args.value_dim), dtype=np.float32)
    rate = {}
    for name, client in (("in", local), ("svc", remote)):
        rate[name] = n / p50(timed(lambda: client.apply_gradients(NAMESPACE, ids, grads), args.repeats,
                                   args.budget_s))
    rate["floor"] = n / (n / rate["in"] + floor.transfer(ids.nbytes + grads.nbytes, 64))
    table.add(f"ApplyGradients (Adam) of {n:,} rows, rows/s", f"{rate['in']:,.0f}", f"{rate['svc']:,.0f}",
              f"({rate['svc'] / rate['in']:.2f}x)", ">= 0.5x in-process",
              f"{rate['floor']:,.0f} ({rate['svc'] / rate['floor']:.2f})", rows_per_s=rate)
    big = min(args.big_apply_rows, args.rows)
    ids = rng.choice(args.rows, big, replace=False).astype(np.int64)
    grads = rng.standard_normal((big, args.value_dim), dtype=np.float32)
    t0 = time.perf_counter()
    try:
        remote.apply_gradients(NAMESPACE, ids, grads)
        outcome = f"ok, {time.perf_counter() - t0:.2f} s ({grads.nbytes / 1e6:,.0f} MB)"
    except Exception as e:  # the cell reports what a user would see
        outcome = f"fails: {type(e).__name__} {str(e)[:80]}"
    table.add(f"ApplyGradients of {big:,} x {args.value_dim} through the client", "ok", outcome, "",
              "any size works (split)")


def lm_cells(table, local, remote, args, stack):
    from monim.model_client.hf import attach_monim
    from transformers import GPT2Config, GPT2LMHeadModel

    sizes = {"gpt2": dict(n_layer=12, n_head=12, n_embd=768), "tiny": dict(n_layer=2, n_head=4, n_embd=args.dim)}
    torch.manual_seed(SEED)
    model = GPT2LMHeadModel(GPT2Config(**sizes[args.lm_size], vocab_size=50_257)).to(args.device).eval()
    if model.config.n_embd != args.dim or args.value_dim != args.dim:
        print(f"lm: skipped (the LM's width {model.config.n_embd} must equal --dim and --value-dim)")
        return
    params = sum(p.numel() for p in model.parameters()) / 1e6
    prompt = torch.randint(0, 50_257, (1, 32), device=args.device)

    def run():
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=args.lm_tokens, min_new_tokens=args.lm_tokens, do_sample=False,
                           pad_token_id=0)

    def per_token(mode=None, client=None, read=None) -> float:
        handle = None if mode is None else attach_monim(model, client, NAMESPACE, k=32, mode=mode)
        try:
            with reading(model, read) if read is not None else contextlib.nullcontext():
                run()  # warm-up (a Decode stream opens here)
                sync()
                t0 = time.perf_counter()
                run()
                sync()
            return (time.perf_counter() - t0) / args.lm_tokens
        finally:
            if handle is not None:
                handle.detach()

    # The floors (bench/lm_floor.py): the bare read's kernels over keys and values of the same shapes, in
    # this process, and in another process over a pipe (what any memory outside the LM's process costs).
    floors = {"here": BareRead(args.rows, args.dim, args.value_dim, device=args.device),
              "there": stack.enter_context(ReadInAnotherProcess(args.rows, args.dim, args.value_dim,
                                                                device=args.device))}
    # Round by round (bare, then each memory way), so that the GPU's clocks and a noisy host weigh on all
    # alike; the median of the rounds.
    ways = [(None, None, None)] + [(mode, name, client) for mode in ("monim", "knnlm")
                                   for name, client in (("in", local), ("svc", remote))]
    times = {(mode, name): [] for mode, name, _ in ways} | {("floor", where): [] for where in floors}
    for _ in range(5):
        for mode, name, client in ways:
            times[mode, name].append(per_token(mode, client))
        for where, read in floors.items():
            times["floor", where].append(per_token(read=read))
    bare = float(np.median(times[None, None]))
    costs = {key: float(np.median(value)) for key, value in times.items() if key[0]}
    label = "GPT-2-size" if args.lm_size == "gpt2" else "tiny GPT-2"
    table.add(f"{label} ({params:.0f}M, random init) greedy decode, vs bare {1e3 * bare:.2f} ms/token",
              " / ".join(f"{m} {costs[m, 'in'] / bare:.2f}x" for m in ("monim", "knnlm")),
              " / ".join(f"{m} {costs[m, 'svc'] / bare:.2f}x" for m in ("monim", "knnlm")), "", "<= 1.25x",
              f"bare read here {costs['floor', 'here'] / bare:.2f}x, in another process "
              f"{costs['floor', 'there'] / bare:.2f}x ({costs['monim', 'svc'] / costs['floor', 'there']:.2f})",
              bare_s=bare, **{f"{m}_{n}_s": v for (m, n), v in costs.items()})


def main(argv=None) -> int:
    args = parse_args(argv)
    from monim.model_client.client import MemoryClient

    command = "python -m bench.data_plane_bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "no GPU"
    print(f"# {command}")
    service = (f"{args.shards} Ray shard actor(s) of {args.shard_cpus} CPU(s)" if args.service == "ray"
               else "one shard and its router in a server process (no Ray)")
    print(f"# {args.rows:,} x {args.dim} keys, value_dim {args.value_dim}; in-process on {args.device} ({gpu}); "
          f"service: {service}; {os.cpu_count()} CPUs, {platform.machine()}, torch {torch.__version__}")
    began = time.perf_counter()
    rng, keys, values, tokens, queries = make_data(args)
    table = Table()
    with contextlib.ExitStack() as stack:
        local = stack.enter_context(MemoryClient(":memory:", device=args.device))
        if args.service == "ray":
            from monim.workers.embedded import EmbeddedStore

            service = stack.enter_context(EmbeddedStore(shards=args.shards, shard_cpus=args.shard_cpus,
                                                        num_cpus=max(4, args.shards * (args.shard_cpus + 1))))
        else:
            service = stack.enter_context(OneProcessService(args.device, args.shard_cpus))
        floor = stack.enter_context(GrpcFloor(repeats=args.repeats, budget_s=args.budget_s))
        remote = stack.enter_context(MemoryClient(service.address, timeout_s=600,
                                                  read_endpoints=not args.front_end_reads))
        rate, args.row_of = {}, {}
        for name, client in (("in", local), ("svc", remote)):
            warm_up(client, args)
            create(client, NAMESPACE, args)
            rate[name], args.row_of[name] = load(client, NAMESPACE, keys, tokens, values)
            only = min(args.keys_only_rows, args.rows)
            client.create_namespace("keys-only", dim=args.dim)
            rate[name, "keys"] = load(client, "keys-only", keys[:only], tokens[:only], None)[0]
            client.drop_namespace("keys-only")
        shards = remote.describe_namespace(NAMESPACE).shards
        print(f"service reads go to {remote._store.read_routing.target() or 'the front end'} "
              f"(front end {service.address})")
        print("service shards: " + ", ".join(f"{s['shard']}: {s['rows']:,} rows on {s['device']} ({s['backend']})"
                                             for s in shards))
        # load() adds 65,536 rows a call: keys, values, tokens (int64) up; ids (int64) and flags down.
        calls = -(-args.rows // 65_536)
        per_call = min(args.rows, 65_536)
        rate["floor"] = args.rows / (args.rows / rate["in"] + calls * floor.transfer(
            per_call * (4 * (args.dim + args.value_dim) + 8), per_call * 10, whole_up_to=remote.max_message_bytes))
        table.add(f"Add of {args.dim}-d rows with values, rows/s (keys only)",
                  f"{rate['in']:,.0f} ({rate['in', 'keys']:,.0f})", f"{rate['svc']:,.0f} ({rate['svc', 'keys']:,.0f})",
                  f"({rate['svc'] / rate['in']:.2f}x)", ">= 200k",
                  f"{rate['floor']:,.0f} ({rate['svc'] / rate['floor']:.2f})",
                  rates={str(k): v for k, v in rate.items()})
        search_cells(table, local, remote, queries, args, floor)
        if args.compare_one_message:
            one_message_cells(table, remote, queries, args)
        decode_cells(table, local, remote, queries, args, floor)
        learn_cells(table, local, remote, queries, rng, args, floor)
        apply_cells(table, local, remote, rng, args, floor)
        if args.lm_size != "none":
            lm_cells(table, local, remote, args, stack)
    print(f"\n# total {time.perf_counter() - began:.0f} s\n")
    print(table.render())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "rows": table.rows}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
