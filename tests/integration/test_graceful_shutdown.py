"""`monim serve` stopped with SIGTERM while a call is in flight: the call finishes, new calls are
refused, health turns NOT_SERVING, the shard's log holds the call's rows, and the exit code is 0
within the grace period. (A local Ray of its own, started the way a user starts it; the call is
held in flight by a slow disk, reliability/slow_disk, injected from outside monim's code.)"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import threading
import time
import urllib.request
import uuid

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from monim.datastore.wal import WriteAheadLog
from monim.protos import convert
from monim.protos import memory_pb2 as pb
from monim.protos import memory_pb2_grpc as pb_grpc
from monim.protos.config import NamespaceConfig

from tests.integration.conftest import start_serve

DIM, ROWS = 8, 25
# While the control file holds it, every fdatasync of the server's processes first sleeps this long
# (reliability/slow_disk): an Add stays in flight long enough to stop the server under it.
SLOW_FSYNC_S = 5
SLOW_DISK_DIR = pathlib.Path(__file__).resolve().parents[2] / "reliability" / "slow_disk"
GRACE_S = 40


def _wait_for(condition, within_s: float, what: str):
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {within_s} s"
        time.sleep(0.05)


def _in_flight(metrics_url: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=10) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith("monim_requests_in_flight "):
                return float(line.split()[1])
    raise AssertionError("no monim_requests_in_flight in the metrics")


@pytest.mark.slow
def test_sigterm_finishes_calls_in_flight_refuses_new_ones_and_exits_0(tmp_path):
    data_dir, slow_disk = tmp_path / "data", tmp_path / "slow-disk"
    python_path = os.pathsep.join(filter(None, [str(SLOW_DISK_DIR), os.environ.get("PYTHONPATH")]))
    process, address, output = start_serve(
        data_dir, f"drain-{uuid.uuid4().hex[:8]}", "--shards", "1", "--num-cpus", "1",
        "--grace-s", str(GRACE_S), "--metrics-port", "0",
        env={"PYTHONPATH": python_path, "RELIABILITY_SLOW_DISK_FILE": str(slow_disk)})
    try:
        _wait_for(lambda: any("/metrics" in line for line in output), 30, "the metrics line")
        metrics_url = next(line for line in output if "/metrics" in line).split(" at ", 1)[1].strip()
        channel = grpc.insecure_channel(address)
        stub = pb_grpc.MemoryServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        config = convert.config_to_proto(NamespaceConfig(name="drained", dim=DIM))
        stub.CreateNamespace(pb.CreateNamespaceRequest(config=config), timeout=60)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING

        keys = np.random.default_rng(5).standard_normal((ROWS, DIM), dtype=np.float32)
        request = pb.AddRequest(namespace="drained", keys=convert.tensor_to_proto(keys),
                                tokens=convert.tensor_to_proto(np.arange(ROWS, dtype=np.int32)))
        answer = {}

        def add():
            try:
                answer["ids"] = convert.add_result_from_proto(stub.Add(request, timeout=60)).ids
            except grpc.RpcError as error:
                answer["error"] = error

        slow_disk.write_text(str(SLOW_FSYNC_S))
        adding = threading.Thread(target=add)
        adding.start()
        _wait_for(lambda: _in_flight(metrics_url) == 1, 10, "the Add in flight")
        slow_disk.unlink()  # the fdatasync under way keeps sleeping; the shutdown's own syncs need not

        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        _wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=10).status ==
                  health_pb2.HealthCheckResponse.NOT_SERVING, 3, "health NOT_SERVING")
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListNamespaces(pb.ListNamespacesRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in refused.value.details()
        assert adding.is_alive(), "the Add finished before the drain could be watched (is SLOW_FSYNC_S too short?)"

        adding.join(60)
        assert "error" not in answer, answer.get("error")
        assert sorted(answer["ids"].tolist()) == list(range(ROWS))
        assert process.wait(timeout=GRACE_S) == 0
        assert time.monotonic() - signalled < GRACE_S
        text = "".join(output)
        assert "SIGTERM: draining (1 call(s) in flight" in text and "monim: stopped" in text, text
        with pytest.raises(grpc.RpcError):  # nothing listens any more
            stub.ListNamespaces(pb.ListNamespacesRequest(), timeout=5)
        channel.close()
    except BaseException:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        raise

    # The shard's log holds the acknowledged Add (closed, whole: replay cuts nothing).
    log_folder = data_dir / "shard-0" / "wal"
    sizes = {path.name: path.stat().st_size for path in log_folder.glob("*.wal")}
    records = list(WriteAheadLog(str(log_folder), fsync="never").replay())
    assert [op for op, _, _ in records] == ["create", "add"]
    np.testing.assert_array_equal(records[1][2]["keys"], keys)
    assert {path.name: path.stat().st_size for path in log_folder.glob("*.wal")} == sizes


def test_bad_grace_or_metrics_port_is_refused_before_anything_starts():
    import sys

    for flag, value, message in (("--grace-s", "-1", "--grace-s -1 must be 0 or more seconds"),
                                 ("--metrics-port", "70000", "--metrics-port 70000 is not a port")):
        done = subprocess.run([sys.executable, "-m", "monim.workers.cli", "serve", "--ephemeral", flag, value],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2
        assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
