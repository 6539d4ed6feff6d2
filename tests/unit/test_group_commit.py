"""Group commit in a shard: concurrent writers share fdatasyncs; a write is answered only after
the fdatasync that covers it, and is not visible before; reads go on while writers wait for the
disk; a snapshot taken meanwhile loses none of them."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from monim.datastore import NamespaceConfig
from monim.datastore import wal as wal_module
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime

DIM = 16


def deployment(data_dir, fsync="always"):
    return Router(LocalRuntime(1, data_dir=str(data_dir), fsync=fsync, snapshot_every=0))


@pytest.fixture
def fdatasyncs(monkeypatch):
    """The log's fdatasync, counted, taking 20 ms (a disk's flush), and gated by ``gate``."""
    real = wal_module._fdatasync
    record = {"calls": 0, "gate": threading.Event(), "inside": threading.Event()}
    record["gate"].set()

    def fdatasync(descriptor):
        record["inside"].set()
        record["gate"].wait(30)
        time.sleep(0.02)
        record["calls"] += 1
        real(descriptor)

    monkeypatch.setattr(wal_module, "_fdatasync", fdatasync)
    return record


@pytest.mark.parametrize("fsync", ["always", "batch_ms=5"])
def test_concurrent_adds_share_fdatasyncs_and_all_survive_a_restart(tmp_path, fdatasyncs, fsync):
    router = deployment(tmp_path, fsync)
    router.create_namespace(NamespaceConfig("ns", dim=DIM))
    before = fdatasyncs["calls"]
    errors = []

    def writer(seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(10):
                router.add("ns", rng.standard_normal((25, DIM)).astype(np.float32), np.arange(25))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    syncs = fdatasyncs["calls"] - before
    assert syncs < 80 / 2, f"{syncs} fdatasyncs for 80 adds: not grouped"
    router.runtime.shutdown()
    again = deployment(tmp_path, fsync)
    assert again.describe_namespace("ns")["rows"] == 8 * 10 * 25
    again.runtime.shutdown()


def test_a_write_is_answered_and_visible_only_after_its_fdatasync_and_reads_go_on_meanwhile(tmp_path, fdatasyncs):
    router = deployment(tmp_path)
    router.create_namespace(NamespaceConfig("ns", dim=DIM))
    rng = np.random.default_rng(0)
    router.add("ns", rng.standard_normal((10, DIM)).astype(np.float32), np.arange(10))
    queries = rng.standard_normal((2, DIM)).astype(np.float32)
    fdatasyncs["gate"].clear()
    fdatasyncs["inside"].clear()
    answered = threading.Event()
    writer = threading.Thread(target=lambda: (router.add("ns", rng.standard_normal((5, DIM)).astype(np.float32),
                                                         np.arange(5)), answered.set()))
    writer.start()
    assert fdatasyncs["inside"].wait(5)  # the add's record is written; its fdatasync is held back
    started = time.monotonic()
    found = router.search("ns", queries, 20)
    assert time.monotonic() - started < 1.0  # the search did not wait for the disk
    assert (found.ids >= 0).sum(axis=1).tolist() == [10, 10]  # and did not see the unsynced rows
    assert router.describe_namespace("ns")["rows"] == 10
    assert not answered.is_set()
    fdatasyncs["gate"].set()
    writer.join(10)
    assert answered.is_set() and router.describe_namespace("ns")["rows"] == 15
    router.runtime.shutdown()


def test_a_snapshot_taken_while_writers_wait_for_the_disk_keeps_their_rows(tmp_path, fdatasyncs):
    router = deployment(tmp_path)
    router.create_namespace(NamespaceConfig("ns", dim=DIM))
    fdatasyncs["gate"].clear()
    fdatasyncs["inside"].clear()
    rng = np.random.default_rng(1)
    writers = [threading.Thread(target=router.add, args=("ns", rng.standard_normal((7, DIM)).astype(np.float32),
                                                         np.arange(7))) for _ in range(4)]
    for thread in writers:
        thread.start()
    assert fdatasyncs["inside"].wait(5)
    time.sleep(0.1)  # the other writers have logged theirs too, and wait
    shard = router.runtime.shards[0]
    snapshot = threading.Thread(target=shard.snapshot)
    snapshot.start()
    time.sleep(0.1)
    fdatasyncs["gate"].set()
    for thread in [*writers, snapshot]:
        thread.join(10)
    assert router.describe_namespace("ns")["rows"] == 28
    router.runtime.shutdown()
    again = deployment(tmp_path)
    assert again.describe_namespace("ns")["rows"] == 28
    assert again.runtime.shards[0].recovery["snapshot"] is not None
    again.runtime.shutdown()


@pytest.mark.parametrize("wait", [True, False])
def test_reads_go_on_while_a_snapshot_waits_for_the_disk(tmp_path, fdatasyncs, monkeypatch, wait):
    """Regression (the reliability run's slowdisk fault, CI 2026-12-05: a search waited 6.01 s, one
    slow sync): a snapshot, asked for (CreateSnapshot: wait) or automatic (in the background), held
    the shard's lock while the log's segment and the snapshot's files were synced. Reads and other
    snapshots' callers must not wait for the disk; the snapshot still covers every row."""
    from monim.datastore import snapshot as snapshot_module

    real_fsync = snapshot_module._fsync

    def gated_fsync(local_path):
        fdatasyncs["inside"].set()
        fdatasyncs["gate"].wait(30)
        real_fsync(local_path)

    monkeypatch.setattr(snapshot_module, "_fsync", gated_fsync)
    router = deployment(tmp_path)
    router.create_namespace(NamespaceConfig("ns", dim=DIM))
    rng = np.random.default_rng(4)
    router.add("ns", rng.standard_normal((12, DIM)).astype(np.float32), np.arange(12))
    shard = router.runtime.shards[0]
    fdatasyncs["gate"].clear()
    fdatasyncs["inside"].clear()
    taken = threading.Thread(target=shard.snapshot, args=(wait,))
    taken.start()
    assert fdatasyncs["inside"].wait(5)  # the snapshot waits for the disk now
    started = time.monotonic()
    found = router.search("ns", rng.standard_normal((2, DIM)).astype(np.float32), 5)
    describe = router.describe_namespace("ns")
    assert time.monotonic() - started < 1.0, "a read waited for the snapshot's disk"
    assert (found.ids >= 0).all() and describe["rows"] == 12
    assert taken.is_alive() or not wait  # a snapshot asked for answers once its files are durable
    fdatasyncs["gate"].set()
    taken.join(10)
    assert not taken.is_alive()
    shard.snapshot()  # waits for a background one first
    router.runtime.shutdown()
    again = deployment(tmp_path)
    assert again.describe_namespace("ns")["rows"] == 12
    assert again.runtime.shards[0].recovery["snapshot"] is not None
    assert again.runtime.shards[0].recovery["records_replayed"] == 0
    again.runtime.shutdown()


def test_racing_retries_of_one_step_and_one_create_apply_once(tmp_path, fdatasyncs):
    """Retries that arrive while the first try waits for the disk: the step is applied once (each
    retry answers its result) and a second create of the same generation changes nothing."""
    router = deployment(tmp_path)
    router.create_namespace(NamespaceConfig("ns", dim=DIM, value_dim=4, optimizer={"name": "sgd", "lr": 1.0}))
    rng = np.random.default_rng(2)
    ids = router.add("ns", rng.standard_normal((6, DIM)).astype(np.float32), np.arange(6)).ids
    shard = router.runtime.shards[0]
    config = router.describe_namespace("ns")["config"]
    generation = config.generation
    shard.stage_gradients("ns", generation, "step-1", 0, ids, np.ones((6, 4), np.float32))
    fdatasyncs["gate"].clear()
    answers = []
    commits = [threading.Thread(target=lambda: answers.append(shard.commit_step("ns", generation, "step-1")))
               for _ in range(3)]
    creates = [threading.Thread(target=shard.create_namespace, args=(config.to_dict(),)) for _ in range(2)]
    for thread in [*commits, *creates]:
        thread.start()
    time.sleep(0.2)
    fdatasyncs["gate"].set()
    for thread in [*commits, *creates]:
        thread.join(10)
    assert answers == [6, 6, 6]
    values = router.get("ns", ids).values
    np.testing.assert_allclose(values, -np.ones((6, 4)), atol=1e-6)  # one SGD step of lr 1 from zero values
    assert router.describe_namespace("ns")["rows"] == 6  # the second create did not empty the namespace
    router.runtime.shutdown()
    again = deployment(tmp_path)
    np.testing.assert_allclose(again.get("ns", ids).values, -np.ones((6, 4)), atol=1e-6)
    again.runtime.shutdown()


class _SlowReads(dict):
    """The registry's id counters, read slowly: widens the window between reading and advancing
    a namespace's next id, where a thread switch happens on a busy host (seen on a 16-core one)."""

    def __getitem__(self, key):
        value = super().__getitem__(key)
        time.sleep(0.001)  # another thread runs between this read and what the reader does with it
        return value


def test_concurrent_adds_on_an_in_process_deployment_get_distinct_ids():
    """Regression: LocalRuntime called its registry from every caller's thread at once, so two
    concurrent Adds could be planned onto the same ids (AlreadyExists on a 16-core host)."""
    router = Router(LocalRuntime(1))
    router.create_namespace(NamespaceConfig("ns", dim=DIM))
    router.runtime.registry.next_ids = _SlowReads(router.runtime.registry.next_ids)
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((16, DIM)).astype(np.float32)
    found, errors = [], []

    def writer():
        try:
            for _ in range(20):
                found.append(router.add("ns", keys, np.arange(16)).ids)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    ids = np.concatenate(found)
    assert ids.size == 4 * 20 * 16 and np.unique(ids).size == ids.size
    assert router.describe_namespace("ns")["rows"] == ids.size
