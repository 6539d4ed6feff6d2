"""Durability through the service, with Ray: a server killed with SIGKILL (its whole process
group, Ray's processes too) comes back on its data dir with every acknowledged row; a shard
actor's worker killed in the middle of an add loop is restarted by Ray and the loop never sees
an error (its log a local folder, or objects written whole as on an object store)."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import numpy as np
import pytest
from monim.model_client import MemoryClient

from tests.integration.conftest import start_serve

DIM, VALUE_DIM = 16, 8


def start_server(data_dir, deployment):
    # (a snapshot every 160 records: the add loop below writes ~1,440, so it is killed after several
    # snapshots, with a log tail past the last one)
    return start_serve(data_dir, deployment, "--snapshot-every", "160")[:2]


def session_processes(session_id: int) -> list[int]:
    """Every process of a session (the server and whatever Ray started under it)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == session_id:
                    pids.append(int(entry))
            except ProcessLookupError:
                continue
    return pids


def kill_session(process) -> None:
    session = os.getsid(process.pid)
    for pid in session_processes(session):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)
    deadline = time.monotonic() + 30
    while session_processes(session) and time.monotonic() < deadline:
        time.sleep(0.2)


def test_a_killed_server_comes_back_with_every_acknowledged_row(tmp_path):
    data_dir = tmp_path / "data"
    deployment = f"dur-{uuid.uuid4().hex[:8]}"
    process, address = start_server(data_dir, deployment)
    twin = MemoryClient(":memory:")
    rng = np.random.default_rng(0)
    acknowledged = 0
    try:
        with MemoryClient(address, timeout_s=60) as client:
            for target in (client, twin):
                target.create_namespace("ns", dim=DIM, value_dim=VALUE_DIM, optimizer="adam", lr=0.01)
            for call in range(1200):
                keys = rng.standard_normal((50, DIM)).astype(np.float32)
                values = rng.standard_normal((50, VALUE_DIM)).astype(np.float32)
                ids = client.add("ns", keys, np.arange(50), values=values)
                np.testing.assert_array_equal(twin.add("ns", keys, np.arange(50), values=values), ids)
                acknowledged += 50
                if call % 5 == 4:
                    stepped = rng.integers(0, acknowledged, 64)
                    grads = rng.standard_normal((64, VALUE_DIM)).astype(np.float32)
                    client.apply_gradients("ns", stepped, grads)
                    twin.apply_gradients("ns", stepped, grads)
    finally:
        kill_session(process)
    process, address = start_server(data_dir, deployment)
    try:
        with MemoryClient(address, timeout_s=120) as client:
            assert client.describe_namespace("ns").rows == acknowledged
            ids = np.arange(acknowledged)
            for start in range(0, acknowledged, 30_000):
                part = ids[start:start + 30_000]
                got = client.get("ns", part, return_optimizer_state=True)
                want = twin.get("ns", part, return_optimizer_state=True)
                np.testing.assert_array_equal(got.keys, want.keys)
                np.testing.assert_allclose(got.values, want.values, atol=1e-5)
                np.testing.assert_array_equal(got.optimizer_state["step"], want.optimizer_state["step"])
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def object_store_folder(path) -> object:
    """A folder written the way an object store is (whole objects, no appends, no fsync): the local
    disk behind pyarrow's PyFileSystem over fsspec, which the log cannot treat as a local folder.
    It pickles, so shard actors in other processes (and restarted ones) reach the same files."""
    import fsspec
    import pyarrow.fs as pafs
    from monim.datastore.location import Location

    location = Location(pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("file"))), str(path))
    assert location.local is None
    return location


@pytest.mark.parametrize("kind, victim", [("local folder", "shard-1"), ("object store", "shard-1"),
                                          ("local folder", "registry")])
def test_a_killed_shard_worker_is_restarted_and_the_add_loop_never_sees_an_error(ray_joined, tmp_path, kind, victim):
    """victim: the actor whose worker is killed: a shard, or the namespace registry (which every
    Add asks for its id block)."""
    from monim.workers.embedded import EmbeddedStore

    deployment = f"kill-{uuid.uuid4().hex[:8]}"
    data_dir, fsync = (str(tmp_path), "never") if kind == "local folder" else (object_store_folder(tmp_path),
                                                                              "batch_ms=5")
    store = EmbeddedStore(shards=2, ray_address="auto", shard_cpus=0, use_gpus=False, deployment=deployment,
                          data_dir=data_dir, fsync=fsync)
    try:
        with MemoryClient(store.address, timeout_s=120, retries=0) as client:  # the server waits, not the client
            client.create_namespace("ns", dim=DIM)
            added, errors = [], []
            halfway = threading.Event()

            def add_loop():
                rng = np.random.default_rng(1)
                try:
                    for call in range(120):
                        added.append(client.add("ns", rng.standard_normal((50, DIM)).astype(np.float32),
                                                np.arange(50)))
                        if call == 40:
                            halfway.set()
                except Exception as error:  # noqa: BLE001 - the test reports it
                    errors.append(error)
                    halfway.set()

            loop = threading.Thread(target=add_loop)
            loop.start()
            assert halfway.wait(timeout=120)
            shard = ray_joined.get_actor(f"{deployment}-{victim}", namespace="monim")
            pid = ray_joined.get(shard.ping.remote())["pid"]
            os.kill(pid, signal.SIGKILL)  # the worker process of the actor this test's deployment created
            loop.join(timeout=300)
            assert not errors, errors
            ids = np.concatenate(added)
            assert ids.size == 120 * 50 and client.describe_namespace("ns").rows == ids.size
            assert len(client.get("ns", ids)) == ids.size
            assert ray_joined.get(shard.ping.remote())["pid"] != pid  # a new worker, recovered from the log
    finally:
        store.server.stop(1).wait()
        store.runtime.destroy()
