"""One `monim serve` process (one local Ray instance, 2 shards, gRPC on loopback) for the whole run.

It is started the way a user starts it, in its own process, and stopped with
SIGTERM at the end of the session (which shuts its Ray instance down).
"""

from __future__ import annotations

import os
import pathlib
import queue
import signal
import socket
import subprocess
import sys
import threading
import uuid

import pytest
from monim.model_client import MemoryClient

ROOT = pathlib.Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server_address():
    port = _free_port()
    command = [sys.executable, "-m", "monim.workers.cli", "serve", "--port", str(port), "--shards", "2",
               "--num-cpus", "2", "--deployment", f"test-{uuid.uuid4().hex[:8]}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_DISABLE_USAGE_STATS="1")
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    output: list[str] = []

    def pump():
        for line in process.stdout:
            output.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    address = None
    try:
        while address is None:
            line = lines.get(timeout=START_TIMEOUT_S)
            if line is None:
                raise RuntimeError("monim serve exited early:\n" + "".join(output))
            if "serving" in line:
                address = line.rsplit(" on ", 1)[1].strip()
        yield address
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="session")
def remote_client(server_address):
    with MemoryClient(server_address, timeout_s=120) as client:
        yield client


@pytest.fixture
def namespace_name():
    return f"ns-{uuid.uuid4().hex[:10]}"
