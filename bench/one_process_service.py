"""A one-shard service without Ray: the router and its one shard in a server process of their own.

A client of a one-shard deployment sends its reads, training steps and the layer's writes to the
shard's read endpoint (workers/read_endpoint.py): a gRPC server (and host socket) in the shard
actor's process whose router calls that shard directly. This process is the same shape: a server
(``start_server``) over ``Router(LocalRuntime(1, device))``, in a process apart from the client's,
so a call crosses a process boundary, the wire (or the host's shared memory and socket) and the
servicer, as an endpoint's does, and no Ray. The benches use it where Ray is not installed (the GPU
machine takes it in a second call: docs/DEVELOPMENT.md); what it leaves out is the front end's
hop to the shard actor, which the calls above do not take.

    with OneProcessService("cuda") as service:
        client = MemoryClient(service.address)

    python -m bench.one_process_service --device cuda     # serves until stdin closes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time


class OneProcessService:
    """cpus: the threads its torch and faiss get (OMP_NUM_THREADS), as Ray gives a shard actor of that
    many CPUs (monim serve --shard-cpus, default 1)."""

    def __init__(self, device: str = "cpu", cpus: int = 1, timeline: bool = False):
        self._process = subprocess.Popen([sys.executable, "-m", "bench.one_process_service", "--device", device]
                                         + ["--timeline"] * timeline,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                         env=dict(os.environ, OMP_NUM_THREADS=str(cpus)))
        line = self._process.stdout.readline().strip()
        if not line.startswith("serving "):
            self._process.kill()
            raise RuntimeError(f"the one-process service did not start (it said {line!r})")
        self.address = line.split()[1]

    def timeline(self, calls: int = 0, since: float = 0.0) -> list[tuple[float, float, float, float]]:
        """For a service started with timeline: each call answered on its host socket since the last
        reading and received from `since` on, as (its frame received, its servicer's gate entered, left,
        its answer's send begun), in time.perf_counter seconds (CLOCK_MONOTONIC: the same clock as this
        process's). calls: how many the caller made; the server records a call just after its answer
        went, so it is read until that many came (10 s at most a reading), and a call from before
        `since` that came late is left out."""
        found: list = []
        while True:
            self._process.stdin.write(f"timeline {calls - len(found)}\n")
            self._process.stdin.flush()
            read = [tuple(call) for call in json.loads(self._process.stdout.readline())]
            found += [call for call in read if call[0] >= since]
            if len(found) >= calls or not read:
                return found

    @property
    def pid(self) -> int:
        """The server process's pid (a profiler's target)."""
        return self._process.pid

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.stdin.close()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def record_timeline(server) -> list:
    """The list each call on the server's host socket is appended to as (its frame received, the
    servicer's gate entered, left, its answer's send begun), perf_counter seconds: the host socket's frame
    functions wrapped, and the gate's observer (the server has no metrics here) set. Each connection's
    thread keeps its own call's times (a client's pipelined Add calls come on several at once)."""
    from monim.protos.socket_frames import MESSAGE
    from monim.workers import host_socket

    calls, local = [], threading.local()
    recv_frame, send_frame = host_socket.recv_frame, host_socket.send_frame

    def received(connection):
        frame = recv_frame(connection)
        local.now = {"in": time.perf_counter()}
        return frame

    def sent(connection, kind, payload):
        sending = time.perf_counter()  # (its reader may have it before the send returns)
        send_frame(connection, kind, payload)
        now = getattr(local, "now", {})
        if kind == MESSAGE and "gate" in now:
            calls.append((now.pop("in"), *now.pop("gate"), sending))

    def observed(method, request, code, seconds, token):
        left = time.perf_counter()
        if hasattr(local, "now"):  # a call on the host socket (not one over gRPC)
            local.now["gate"] = (left - seconds, left)

    host_socket.recv_frame, host_socket.send_frame = received, sent
    server.gate.observer = observed
    return calls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.one_process_service", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeline", action="store_true",
                        help="record each host socket call's times; a line 'timeline N' on stdin prints them (JSON)")
    args = parser.parse_args(argv)
    from monim.workers.router import Router
    from monim.workers.runtime import LocalRuntime
    from monim.workers.server import start_server

    runtime = LocalRuntime(1, device=args.device)
    server, port = start_server(Router(runtime), port=0)
    calls = record_timeline(server) if args.timeline else []
    print(f"serving 127.0.0.1:{port}", flush=True)
    for line in sys.stdin:  # until the parent closes it (or exits)
        if line.startswith("timeline"):
            waited = time.monotonic() + 10
            while len(calls) < int(line.split()[1]) and time.monotonic() < waited:
                time.sleep(0.001)
            taken = calls[:]
            del calls[:len(taken)]
            print(json.dumps(taken), flush=True)
    server.stop(0)
    runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
