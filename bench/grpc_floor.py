"""What gRPC itself costs to move a call's bytes: the floor under any service built on it.

A bare gRPC server in a process of its own (as the service's front end or a shard's endpoint is to
its client) answers generic calls that carry no work: a unary call and a bidirectional stream whose
every request says how many bytes to answer. Timing a call with the same request and answer sizes
as one of the service's, on the same machine in the same run, says how much of the service's time
is gRPC's (the C core's copies and transport, Python's per-message handling) and how much is ours:

    in-process time + floor  ~  the best a gRPC service over this store could do.

Both ends use the message limits and channel options the service uses (workers/server.py's
message_size_options). A large transfer goes as the client sends one: chunks of
model_client.client.CHUNK_BYTES, PIPELINE_DEPTH of them in flight, where the client splits one.

    with GrpcFloor() as floor:
        floor.unary(request_bytes, answer_bytes)              # seconds, median of the calls
        floor.transfer(total_up, total_down)                  # seconds for a chunked, pipelined call
        floor.read(request_bytes, answer_bytes)               # seconds for a read, its answer in parts if large
        floor.stream_step(request_bytes, answer_bytes)        # seconds (median), a step on an open stream

    python -m bench.grpc_floor        # prints a few sizes' floors on this machine
    python -m bench.grpc_floor --chunk-sweep   # one call's bytes in messages of several sizes
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import struct
import subprocess
import sys
import threading
import time

import grpc
import numpy as np

SERVICE = "monim.bench.Floor"
_HEADER = struct.Struct("<q")  # a request's first 8 bytes: the answer's size


def _answer(request: bytes, cache: dict) -> bytes:
    size = _HEADER.unpack_from(request)[0]
    answer = cache.get(size)
    if answer is None:
        answer = cache[size] = bytes(size)
    return answer


def serve(ready_path: str) -> None:
    """The floor's server (run in its own process): writes its port to ready_path, runs until stdin closes."""
    from monim.protos import heap
    from monim.workers.server import DEFAULT_MAX_MESSAGE_BYTES, message_size_options

    heap.keep_freed_memory()  # as the service's processes do (MONIM_KEEP_FREED_MEMORY=0: not)
    cache: dict = {}
    handlers = {
        "Call": grpc.unary_unary_rpc_method_handler(lambda request, context: _answer(request, cache)),
        "Stream": grpc.stream_stream_rpc_method_handler(
            lambda requests, context: (_answer(request, cache) for request in requests)),
    }
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(16),
                         options=message_size_options(DEFAULT_MAX_MESSAGE_BYTES))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with open(ready_path + ".tmp", "w") as f:
        f.write(str(port))
    os.replace(ready_path + ".tmp", ready_path)
    sys.stdin.read()  # the parent closes it (or exits)
    server.stop(0)


class GrpcFloor:
    """A bare gRPC server in a child process and a channel to it (see the module docstring)."""

    def __init__(self, repeats: int = 20, budget_s: float = 2.0):
        import tempfile

        from monim.protos import heap
        from monim.workers.server import DEFAULT_MAX_MESSAGE_BYTES, message_size_options

        self.tuned_malloc = heap.keep_freed_memory()  # as a client's process does
        self.repeats, self.budget_s = repeats, budget_s
        self._dir = tempfile.TemporaryDirectory()
        ready = os.path.join(self._dir.name, "port")
        self._process = subprocess.Popen([sys.executable, "-m", "bench.grpc_floor", "--serve", ready],
                                         stdin=subprocess.PIPE, cwd=os.path.dirname(os.path.dirname(__file__)))
        deadline = time.monotonic() + 60
        while not os.path.exists(ready):
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the gRPC floor's server did not start")
            time.sleep(0.05)
        with open(ready) as f:
            self.address = f"127.0.0.1:{f.read().strip()}"
        self._channel = grpc.insecure_channel(self.address, options=message_size_options(DEFAULT_MAX_MESSAGE_BYTES))
        self._call = self._channel.unary_unary(f"/{SERVICE}/Call")
        self._stream = self._channel.stream_stream(f"/{SERVICE}/Stream")
        self._payloads: dict = {}

    def _request(self, request_bytes: int, answer_bytes: int) -> bytes:
        body = self._payloads.get(request_bytes)
        if body is None:
            body = self._payloads[request_bytes] = bytes(max(0, request_bytes - _HEADER.size))
        return _HEADER.pack(answer_bytes) + body

    def _timed(self, call) -> float:
        call()  # warm-up
        times, began = [], time.perf_counter()
        while len(times) < self.repeats and (not times or time.perf_counter() - began < self.budget_s):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    def unary(self, request_bytes: int, answer_bytes: int) -> float:
        """Seconds (median) of one bare unary call sending and answering that many bytes."""
        return self._timed(lambda: self._call(self._request(request_bytes, answer_bytes)))

    def transfer(self, total_up: int, total_down: int, whole_up_to: int | None = None) -> float:
        """Seconds (median) to send total_up bytes and get total_down back as the client sends a call
        (MemoryClient._row_chunks): one message if the larger side takes at most whole_up_to bytes
        (default CHUNK_BYTES; an Add or a forward that keeps its state: half the message limit), else
        chunks of CHUNK_BYTES with PIPELINE_DEPTH in flight, the other side shared among them."""
        from monim.model_client import client as client_module

        limit = client_module.DEFAULT_MAX_MESSAGE_BYTES // 2
        whole = min(limit, client_module.CHUNK_BYTES if whole_up_to is None else whole_up_to)
        larger = max(total_up, total_down)
        chunks = 1 if larger <= whole else -(-larger // min(limit, client_module.CHUNK_BYTES))
        up, down = -(-total_up // chunks), -(-total_down // chunks)
        if chunks == 1:
            return self.unary(up, down)
        request = self._request(up, down)
        with concurrent.futures.ThreadPoolExecutor(client_module.PIPELINE_DEPTH) as pool:
            return self._timed(lambda: list(pool.map(lambda _: self._call(request), range(chunks))))

    def read(self, request_bytes: int, answer_bytes: int) -> float:
        """Seconds (median) of a read as the client makes it (MemoryClient._read): one unary call, or
        past CHUNK_BYTES one call whose answer streams in messages of ANSWER_PART_BYTES (SearchParts)."""
        from monim.model_client import client as client_module
        from monim.protos import convert

        if answer_bytes <= client_module.CHUNK_BYTES:
            return self.unary(request_bytes, answer_bytes)
        messages = -(-answer_bytes // convert.ANSWER_PART_BYTES)
        each = -(-answer_bytes // messages)
        first, rest = self._request(request_bytes, each), self._request(0, each)
        return self._timed(lambda: sum(1 for _ in self._stream(iter([first] + [rest] * (messages - 1)))))

    def stream_step(self, request_bytes: int, answer_bytes: int) -> float:
        """Seconds (median) of one step of an open bare stream sending and answering that many bytes."""
        with self.stream() as step:
            return self._timed(lambda: step(request_bytes, answer_bytes))

    @contextlib.contextmanager
    def stream(self):
        """step(request_bytes, answer_bytes) -> None: one step on an open bare stream."""
        requests: list = []
        ready = threading.Condition()

        def sent():
            while True:
                with ready:
                    ready.wait_for(lambda: requests)
                    request = requests.pop(0)
                if request is None:
                    return
                yield request

        answers = self._stream(sent())

        def step(request_bytes: int, answer_bytes: int) -> None:
            with ready:
                requests.append(self._request(request_bytes, answer_bytes))
                ready.notify()
            next(answers)

        try:
            yield step
        finally:
            with ready:
                requests.append(None)
                ready.notify()
            answers.cancel()

    def close(self) -> None:
        self._channel.close()
        if self._process.poll() is None:
            self._process.stdin.close()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._dir.cleanup()

    def __enter__(self) -> GrpcFloor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def chunk_sweep(floor: GrpcFloor, rounds: int) -> None:
    """An Add's 403 MB up and a k=1024 Search's 67 MB answer down, in messages of several sizes with
    PIPELINE_DEPTH (or one) in flight, and down as one call's stream of messages (SearchParts), round
    by round (so that all sizes see the same machine)."""
    from monim.model_client import client as client_module

    depth = client_module.PIPELINE_DEPTH
    ways = [("up", 403_000_000, 32 << 20, depth), ("up", 403_000_000, 8 << 20, depth),
            ("up", 403_000_000, 4 << 20, depth), ("down", 67_100_000, 67_100_000, 1),
            ("down", 67_100_000, 32 << 20, depth), ("down", 67_100_000, 8 << 20, depth),
            ("down", 67_100_000, 4 << 20, depth), ("stream", 67_100_000, 8 << 20, 0),
            ("stream", 67_100_000, 4 << 20, 0)]
    times: dict = {way: [] for way in ways}
    with concurrent.futures.ThreadPoolExecutor(depth) as pool:
        for _ in range(rounds):
            for way in ways:
                side, total, size, in_flight = way
                messages = max(1, round(total / size))  # each of the size the client makes: CHUNK_BYTES of rows
                request = floor._request(size, 64) if side == "up" else floor._request(64, size)
                if side == "stream":  # one call, its answer in messages (SearchParts): all asked at once
                    times[way].append(floor._timed(lambda: sum(1 for _ in floor._stream(iter([request] * messages)))))
                elif in_flight == 1:
                    times[way].append(floor._timed(lambda: [floor._call(request) for _ in range(messages)]))
                else:
                    times[way].append(floor._timed(lambda: list(pool.map(lambda _: floor._call(request),
                                                                         range(messages)))))
    print(f"# bare gRPC on {os.cpu_count()} CPUs, grpcio {grpc.__version__}: one call's bytes in messages of a size, "
          f"medians of each round")
    for (side, total, size, in_flight), seconds in times.items():
        messages = max(1, round(total / size))
        how = "one stream" if side == "stream" else f"{in_flight} in flight"
        print(f"{side:6s} {messages * size / 1e6:5.1f} MB in {messages:3d} messages of {size / 2**20:5.1f} MiB, "
              f"{how}: " + " / ".join(f"{1e3 * t:6.1f}" for t in seconds)
              + f" ms ({messages * size / min(seconds) / 1e9:.2f} GB/s at best)")


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", metavar="READY_PATH", help=argparse.SUPPRESS)
    p.add_argument("--chunk-sweep", action="store_true",
                   help="time 403 MB up and 67 MB down in messages of several sizes (CHUNK_BYTES's choice)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the sweep, each over every size (default 3)")
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    if args.chunk_sweep:
        with GrpcFloor(repeats=6) as floor:
            chunk_sweep(floor, args.rounds)
        return 0
    with GrpcFloor() as floor:
        print(f"# bare gRPC on {os.cpu_count()} CPUs, grpcio {grpc.__version__}, malloc keeps freed memory: "
              f"{floor.tuned_malloc} (protos/heap.py)")
        print(f"stream step, 3 KB up / 512 B down: {1e3 * floor.stream_step(3_136, 512):.3f} ms")
        print(f"unary call, 3 KB up / 512 B down: {1e3 * floor.unary(3_136, 512):.3f} ms")
        for mb_up, mb_down in ((12.6, 67.1), (403.0, 0.5)):
            seconds = floor.transfer(int(mb_up * 1e6), int(mb_down * 1e6))
            print(f"transfer, {mb_up} MB up / {mb_down} MB down: {1e3 * seconds:.1f} ms "
                  f"({(mb_up + mb_down) / seconds / 1e3:.2f} GB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
