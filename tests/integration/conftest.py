"""One `monim serve` process (one local Ray instance, 2 shards, gRPC on loopback) for the whole run.

It is started the way a user starts it, in its own process, and stopped with
SIGTERM at the end of the session (which shuts its Ray instance down).
Tests that need more front ends, or another shard count, join that one Ray
instance from this process (``ray_joined``): no second Ray is started.
"""

from __future__ import annotations

import os
import pathlib
import queue
import signal
import subprocess
import sys
import threading
import uuid

import pytest
from monim.model_client import MemoryClient

ROOT = pathlib.Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180


def start_serve(data_dir, deployment: str, *options: str, env: dict | None = None):
    """`monim serve` (2 shards, its own local Ray of 2 CPUs) as a user starts it, in its own session
    (so a test can kill it and every process under it): (process, address, output lines so far).
    env: more environment variables for it (and so for its Ray and the shards).
    It binds port 0 and says which port it got: a port picked here and freed could be taken (by one
    of its own Ray's processes, say) before it binds."""
    command = [sys.executable, "-m", "monim.workers.cli", "serve", "--port", "0", "--shards", "2",
               "--num-cpus", "2", "--deployment", deployment, "--data-dir", str(data_dir), *options]
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_DISABLE_USAGE_STATS="1", **(env or {}))
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
    try:
        while True:
            line = lines.get(timeout=START_TIMEOUT_S)
            if line is None:
                raise RuntimeError("monim serve exited early:\n" + "".join(output))
            if "serving" in line:
                return process, line.rsplit(" on ", 1)[1].strip(), output
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The session's `monim serve`, durable (a data dir under pytest's tmp): {"address", "deployment",
    "data_dir", "output" (its log lines so far)}."""
    deployment = f"test-{uuid.uuid4().hex[:8]}"
    data_dir = tmp_path_factory.mktemp("monim-data")
    process, address, output = start_serve(data_dir, deployment)
    try:
        yield {"address": address, "deployment": deployment, "data_dir": data_dir, "output": output}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="session")
def server_address(server):
    return server["address"]


@pytest.fixture(scope="session")
def ray_joined(server):
    """This process connected to the session server's Ray instance (left at the end of the session)."""
    import ray

    # By its address: "auto" is whichever Ray this machine started last, maybe another's.
    address = next(line.split(" at ", 1)[1].split()[0] for line in server["output"]
                   if line.startswith("monim: started a local Ray at "))
    ray.init(address=address, namespace="monim", logging_level="WARNING", log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def three_shard_front_ends(ray_joined):
    """A second deployment of 3 shards on the shared Ray, served by two front ends (two routers,
    two gRPC ports) in this process: [address of front end 1, address of front end 2]."""
    from monim.workers.embedded import EmbeddedStore

    deployment = f"three-{uuid.uuid4().hex[:8]}"
    first = EmbeddedStore(shards=3, ray_address="auto", shard_cpus=0, use_gpus=False, deployment=deployment)
    second = EmbeddedStore(shards=3, ray_address="auto", shard_cpus=0, use_gpus=False, deployment=deployment)
    try:
        yield [first.address, second.address]
    finally:
        second.server.stop(1).wait()
        first.stop()


@pytest.fixture(scope="session")
def remote_client(server_address):
    with MemoryClient(server_address, timeout_s=120) as client:
        yield client


@pytest.fixture
def namespace_name():
    return f"ns-{uuid.uuid4().hex[:10]}"
