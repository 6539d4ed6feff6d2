"""The bare round trip of two Python processes on a Unix socket, with our frames, and what waking a
sleeping thread costs on this host: the floor under a small call on the server's host socket.

A server process (this module with --serve) answers each frame with a frame of the size the request
asks for, after busy-waiting --work-us (a GPU search the server's thread waits for, spinning). The
client times round trips of a decoding step's sizes (a query of 768 float32 in, 32 or 1024 answers
of 16 bytes out) with each way of waiting:
- block: recv on a blocking socket (what model_client/host_socket.py does): the client's thread
  sleeps and is woken by the answer;
- spin: the client polls the socket without blocking until the answer is there (its core stays busy
  for the call's length);
- and the same two with the server spinning for its next request instead of sleeping in recv.

    python -m bench.socket_round_trip_bench                 # this host
    python -m bench.socket_round_trip_bench --work-us 600   # with a 0.6 ms search on the server's side

Each cell prints the p50 and p99 of --calls round trips in microseconds.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
from monim.protos.socket_frames import MESSAGE, recv_frame, send_frame

_ASK = struct.Struct("<Id")  # answer bytes, the server's work in seconds (a request's first 12 bytes)
_SPIN_SERVER = b"S"


def _spin_until_readable(sock: socket.socket) -> None:
    while True:
        try:
            sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)  # a byte, or b"" if closed (recv_frame sees it)
            return
        except BlockingIOError:
            pass


def serve(path: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    print("ready", flush=True)
    connection, _ = listener.accept()
    spin = False
    while True:
        if spin:
            _spin_until_readable(connection)
        frame = recv_frame(connection)
        if frame is None:
            return
        payload = bytes(frame[1][:_ASK.size + 1])
        answer_bytes, work_s = _ASK.unpack(payload[:_ASK.size])
        spin = payload[_ASK.size:_ASK.size + 1] == _SPIN_SERVER
        if work_s:
            until = time.perf_counter() + work_s
            while time.perf_counter() < until:
                pass
        send_frame(connection, MESSAGE, bytes(answer_bytes))


def round_trips(sock, request_bytes: int, answer_bytes: int, work_s: float, spin_client: bool, spin_server: bool,
                calls: int) -> np.ndarray:
    head = _ASK.pack(answer_bytes, work_s) + (_SPIN_SERVER if spin_server else b"B")
    request = head + bytes(max(0, request_bytes - len(head)))
    times = []
    for call in range(calls + 20):
        start = time.perf_counter()
        send_frame(sock, MESSAGE, request)
        if spin_client:
            _spin_until_readable(sock)
        frame = recv_frame(sock)
        took = time.perf_counter() - start
        assert frame is not None and len(frame[1]) == answer_bytes
        if call >= 20:
            times.append(took)
        time.sleep(0.0002)  # the model's work between steps: the server's thread goes back to its wait
    return np.array(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--work-us", type=float, default=0.0)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "socket")
    server = subprocess.Popen([sys.executable, "-m", "bench.socket_round_trip_bench", "--serve", path],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        print(f"{os.cpu_count()} CPUs; the server works {args.work_us:.0f} us a call; {args.calls} calls a cell (us)")
        print(f"{'request':>8} {'answer':>8} {'client':>7} {'server':>7} {'p50':>8} {'p99':>8}")
        for request_bytes, answer_bytes in ((3_200, 700), (3_200, 16_600), (16_600, 33_000), (200_000, 1_100_000)):
            for spin_server in (False, True):
                for spin_client in (False, True):
                    times = round_trips(sock, request_bytes, answer_bytes, args.work_us * 1e-6, spin_client,
                                        spin_server, args.calls)
                    print(f"{request_bytes:>8} {answer_bytes:>8} {'spin' if spin_client else 'block':>7} "
                          f"{'spin' if spin_server else 'block':>7} {np.percentile(times, 50):>8.1f} "
                          f"{np.percentile(times, 99):>8.1f}", flush=True)
        sock.close()
    finally:
        try:
            server.wait(timeout=10)  # it ends when the client closes its socket
        except subprocess.TimeoutExpired:  # the client never came (it failed first)
            server.kill()
            server.wait()
        if os.path.exists(path):
            os.unlink(path)
        os.rmdir(folder)


if __name__ == "__main__":
    main()
