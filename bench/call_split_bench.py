"""Where a call through the service spends its time, against the same call in-process, in one run.

Three ways over one data set of ``--rows`` keys (values and Adam state with them):
- in-process: ``MemoryClient(":memory:", device=...)``, the router over one shard in this process;
- the handler: the same router behind MemoryServicer's handler, called in this process with the
  request's bytes (as the server's socket thread calls it: deserialize, interceptors' chain, servicer,
  the answer's framing), and the client's read of those answer bytes (framing.parsed and the arrays);
- the service: the one-process service (bench/one_process_service.py: a server process with its own
  store, no Ray), called on its host socket as a client on its host calls.

So for each Search (B, k) and ApplyGradients of N rows it prints the p50 of each, and what is left of
the service's call once the handler and the client's read are taken out: the socket's round trip and
the two processes' hand-offs, the client's own call path, and the answer's bytes between them.
The service's calls are timed in both processes (one clock: the one-process service records each
call on its host socket) and cut into stages: the client's call until its request's send begins,
the socket to the server (the send, the server's wake-up and read), the server's parse (up to its
servicer's gate), the servicer, the server's answer until its send begins, the socket back, and the
client's read. The "servicer" column is that stage's p50 (the
handler's work less the request's parse, run in the server): beside "handler" it says whether the
server runs the same work slower than this process does; the stages' p50s (us) are printed under each
cell with --stages.

    python -m bench.call_split_bench --device cuda --rows 1000000            # the GPU machine
    python -m bench.call_split_bench --rows 20000                             # CPU (dim 64)
    python -m bench.call_split_bench --device cuda --py-spy /path/to/py-spy   # + the server's stacks

With --py-spy, the server's socket thread is sampled (py-spy record) during service calls of the
--py-spy-cells (default B=1 k=32 and B=64 k=1024), and the functions it was busy in are printed (its
waits for the next call left out); then the client's main thread during the same calls (all of it).
With --read-chunks, a Search of B=4096 through the service is timed at several client.SHARED_READ_CHUNK_BYTES
(the bench's client is on the server's host: its answers come in shared memory).
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.data_plane_bench import p50, timed

SEARCHES = ((1, 32), (64, 32), (4096, 32), (1, 1024), (64, 1024), (4096, 1024))
APPLY_ROWS = (1024, 8192)
READ_CHUNKS = (8 << 20, 20 << 20, 64 << 20, 1 << 30)
STAGES = ("client to send", "to server", "server parse", "servicer", "server answer", "to client", "client read")


def p50_ms(call, calls: int, warm_ups: int = 4) -> float:
    """The p50 of `calls` timed calls after `warm_ups` untimed ones, in ms (data_plane_bench's timing:
    each call waits for the device)."""
    return 1e3 * p50(timed(call, calls, 0.0, warm_ups))


def load(client, keys: np.ndarray, chunk: int = 65_536) -> None:
    rows, dim = keys.shape
    client.create_namespace("split", dim=dim, value_dim=dim, max_k=1024, optimizer="adam", lr=1e-3)
    for start in range(0, rows, chunk):
        part = keys[start:start + chunk]
        client.add("split", part, np.arange(start, start + len(part)), values=0.02 * part)


def service_calls(service, call, calls: int, warm_ups: int = 4) -> tuple[float, list[float] | None]:
    """(the p50 ms of `calls` calls through a OneProcessService started with its timeline, the p50 us
    of each of STAGES over them): the client's side timed here, this process's host socket frame
    functions wrapped for the while; the stages None if the server's calls do not pair with these (an
    answer in several messages)."""
    from monim.model_client import host_socket

    send_frame, recv_frame = host_socket.send_frame, host_socket.recv_frame
    marks = {}

    def sent(connection, kind, payload):
        marks["sent"] = time.perf_counter()  # its send begun (the server may have it before the send returns)
        send_frame(connection, kind, payload)

    def received(connection):
        frame = recv_frame(connection)
        marks["received"] = time.perf_counter()
        return frame

    host_socket.send_frame, host_socket.recv_frame = sent, received
    try:
        for _ in range(warm_ups):
            call()
        service.timeline()
        client = []
        for _ in range(calls):
            start = time.perf_counter()
            call()
            client.append((start, marks["sent"], marks["received"], time.perf_counter()))
    finally:
        host_socket.send_frame, host_socket.recv_frame = send_frame, recv_frame
    server = service.timeline(calls, since=client[0][0])
    p50_call_ms = 1e3 * float(np.median([end - start for start, _, _, end in client]))
    if len(server) != len(client):
        return p50_call_ms, None
    spans = [(sent - start, frame_in - sent, gate_in - frame_in, gate_out - gate_in, out - gate_out, received - out,
              end - received)
             for (start, sent, received, end), (frame_in, gate_in, gate_out, out) in zip(client, server)]
    return p50_call_ms, [1e6 * float(np.median(stage)) for stage in zip(*spans)]


def stages_line(stages: list[float] | None) -> str:
    if stages is None:
        return "    stages: n/a (the server's answers did not pair with the calls)"
    return "    stages, p50 us: " + " | ".join(f"{name} {us:.0f}" for name, us in zip(STAGES, stages)) + \
        f" (sum {sum(stages):.0f})"


def servicer_ms(stages: list[float] | None) -> str:
    return f"{stages[STAGES.index('servicer')] / 1e3:8.3f}" if stages else f"{'n/a':>8}"


class Handler:
    """A method's handler over a router, called with request bytes as the server's socket calls it."""

    def __init__(self, router, method: str):
        from monim.protos.framing import DEFAULT_MAX_MESSAGE_BYTES
        from monim.workers.decoding import intercepted_handler
        from monim.workers.host_socket import _SocketContext
        from monim.workers.servicer import MemoryServicer

        self._handler = intercepted_handler(MemoryServicer(router, None, DEFAULT_MAX_MESSAGE_BYTES), method, [])
        self._context = _SocketContext

    def __call__(self, request: bytes) -> bytes:
        handler = self._handler
        parsed = handler.request_deserializer(request)
        return handler.response_serializer(handler.unary_unary(parsed, self._context((), "bench")))


def recorded_stacks(py_spy: str, pid: int, calls, seconds: float = 3.0, idle: bool = False):
    """(stack, samples) of each line py-spy recorded of process pid during `seconds` of calls (the
    stack's frames split, the thread first; with idle samples if `idle`), or the error it gave."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "stacks.txt")
        spy = subprocess.Popen([py_spy, "record", "-r", "1000", "-f", "raw", "-o", out, "-p", str(pid),
                                "-d", str(int(seconds) + 1), "--threads", "--nonblocking"] + ["--idle"] * idle,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)
        ends = time.perf_counter() + seconds
        while time.perf_counter() < ends:
            calls()
        problem = spy.communicate(timeout=60)[1].decode()
        if spy.returncode or not os.path.exists(out):
            return f"py-spy failed: {problem.strip()[-300:]}"
        with open(out) as f:
            return [(stack.split(";"), int(count)) for stack, _, count in (line.rstrip().rpartition(" ") for line in f)]


def busy_stacks(py_spy: str, pid: int, calls, thread: str, serving: str, waiting: tuple[str, ...]) -> list[str]:
    """The functions a thread of process pid (its name containing `thread`) was busy in during calls:
    samples under the function `serving`, less those whose next frame is one of `waiting` (the thread
    waiting for its next call or answer)."""
    stacks = recorded_stacks(py_spy, pid, calls, idle=True)
    if isinstance(stacks, str):
        return [stacks]
    totals, busy, idle = collections.Counter(), 0, 0
    for frames, count in stacks:
        names = [frame.split(" (")[0] for frame in frames[1:]]
        if thread not in frames[0] or serving not in names:
            continue
        below = names[names.index(serving) + 1:]
        if below[:1] and below[0] in waiting:
            idle += count
            continue
        busy += count
        for name in set(below):
            totals[name] += count
    return [f"{busy} busy samples (1 ms each) of {thread} under {serving}, {idle} waiting"] + [
        f"{count:6d} {100 * count / max(1, busy):5.1f}% {name}" for name, count in totals.most_common(30)]


def active_threads(py_spy: str, pid: int, calls) -> list[str]:
    """Samples of each thread of process pid that py-spy found active (not idle) during calls, and the
    innermost functions of the threads other than the host socket's: what else in the server takes a
    core or the GIL while a call is served."""
    stacks = recorded_stacks(py_spy, pid, calls)
    if isinstance(stacks, str):
        return [stacks]
    threads, innermost = collections.Counter(), collections.Counter()
    for frames, count in stacks:
        threads[frames[0]] += count
        if "host-sock" not in frames[0]:
            innermost[f"{frames[0]}: {frames[-1].split(' (')[0]}"] += count
    return [f"{count:6d} active samples: {name}" for name, count in threads.most_common(12)] + [
        f"{count:6d} innermost {name}" for name, count in innermost.most_common(12)]


def server_stacks(py_spy: str, pid: int, calls) -> list[str]:
    """The server's socket thread during calls, its waits for the next call left out."""
    return busy_stacks(py_spy, pid, calls, "host-sock", "HostSocket._serve_calls", ("recv_frame",))


def client_stacks(py_spy: str, calls) -> list[str]:
    """This process's main thread during calls through the service (all of it: its wait for the answer
    is part of the call)."""
    return busy_stacks(py_spy, os.getpid(), calls, "MainThread", "p50_ms", ())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.call_split_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=0, help="key and value width (0: 768 on cuda, 64 on cpu)")
    parser.add_argument("--calls", type=int, default=30, help="timed calls a cell (a third past B x k of 100,000)")
    parser.add_argument("--py-spy", metavar="PATH", help="sample the server's socket thread with this py-spy")
    parser.add_argument("--py-spy-cells", default="1x32,64x1024", help="the Search cells sampled (BxK, commas)")
    parser.add_argument("--stages", action="store_true", help="print each cell's service calls' stages (p50 us)")
    parser.add_argument("--read-chunks", action="store_true", help="time B=4096 at several SHARED_READ_CHUNK_BYTES")
    args = parser.parse_args(argv)
    from monim.model_client import client as client_module
    from monim.protos import convert, framing
    from monim.protos import memory_pb2 as pb

    from bench.one_process_service import OneProcessService
    from monim import MemoryClient

    dim = args.dim or (768 if args.device.startswith("cuda") else 64)
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((args.rows, dim), dtype=np.float32)
    queries = keys[rng.integers(0, args.rows, 4096)] + 0.1 * rng.standard_normal((4096, dim), dtype=np.float32)
    print(f"# python -m bench.call_split_bench {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"# {args.rows:,} x {dim} keys and values (adam) on {args.device}; {os.cpu_count()} CPUs; p50 ms")
    local = MemoryClient(":memory:", device=args.device)
    load(local, keys)
    search, apply = Handler(local._store, "Search"), Handler(local._store, "ApplyGradients")
    with OneProcessService(args.device, timeline=True) as service:
        remote = MemoryClient(service.address)
        load(remote, keys)
        print(f"{'what':>24} | {'in-process':>10} {'handler':>8} {'read':>6} {'service':>8} {'servicer':>8} | "
              "left  in/service")
        for rows in sorted({min(n, args.rows) for n in APPLY_ROWS}):
            ids = rng.choice(args.rows, rows, replace=False).astype(np.int64)
            grads = rng.standard_normal((rows, dim), dtype=np.float32)
            request = framing.serialized(pb.ApplyGradientsRequest(namespace="split"), dict(ids=ids, grads=grads))
            cells = [p50_ms(lambda: local.apply_gradients("split", ids, grads), 20),
                     p50_ms(lambda: apply(request), 20), 0.0]
            served, stages = service_calls(service, lambda: remote.apply_gradients("split", ids, grads), 20)
            cells.append(served)
            print(f"{f'ApplyGradients {rows} rows':>24} | {cells[0]:10.3f} {cells[1]:8.3f} {'':>6} {cells[3]:8.3f} "
                  f"{servicer_ms(stages)} | {cells[3] - cells[1]:5.2f} {cells[0] / cells[3]:5.2f}", flush=True)
            if args.stages:
                print(stages_line(stages), flush=True)
        for batch, k in SEARCHES:
            q = queries[:batch]
            calls = args.calls if batch * k < 100_000 else max(3, args.calls // 3)
            request = framing.serialized(pb.SearchRequest(namespace="split", k=k), dict(queries=q))
            answer = search(request)
            cells = [p50_ms(lambda: local.search("split", q, k), calls), p50_ms(lambda: search(request), calls),
                     p50_ms(lambda: convert.search_result_from_parts([framing.parsed(pb.SearchResponse, answer)]),
                            calls)]
            served, stages = service_calls(service, lambda: remote.search("split", q, k), calls)
            cells.append(served)
            left = cells[3] - cells[1] - cells[2]
            print(f"{f'Search B={batch} k={k}':>24} | {cells[0]:10.3f} {cells[1]:8.3f} {cells[2]:6.3f} {cells[3]:8.3f} "
                  f"{servicer_ms(stages)} | {left:5.2f} {cells[0] / cells[3]:5.2f}  (answer {len(answer) / 1e6:.2f} MB)",
                  flush=True)
            if args.stages:
                print(stages_line(stages), flush=True)
            if args.py_spy and f"{batch}x{k}" in args.py_spy_cells.split(","):
                print(f"--- the server during Search B={batch} k={k} through the service")
                print("\n".join(server_stacks(args.py_spy, service.pid, lambda: remote.search("split", q, k))))
                print("--- the server's active threads during the same calls")
                print("\n".join(active_threads(args.py_spy, service.pid, lambda: remote.search("split", q, k))))
                print("--- the client (this process) during the same calls")
                print("\n".join(client_stacks(args.py_spy, lambda: p50_ms(lambda: remote.search("split", q, k), 5, 0))))
        if args.read_chunks:
            default = client_module.SHARED_READ_CHUNK_BYTES
            for k in (32, 1024):
                q = queries[:4096]
                cells = []
                for chunk in READ_CHUNKS:
                    client_module.SHARED_READ_CHUNK_BYTES = chunk
                    cells.append(f"{chunk >> 20} MiB {p50_ms(lambda: remote.search('split', q, k), 10, 2):.1f}")
                client_module.SHARED_READ_CHUNK_BYTES = default
                print(f"Search B=4096 k={k} through the service by SHARED_READ_CHUNK_BYTES: {', '.join(cells)} | in-process "
                      f"{p50_ms(lambda: local.search('split', q, k), 10, 2):.1f} ms", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
