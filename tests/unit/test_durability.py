"""Durability of a deployment on a data dir (in-process shards): whatever was acknowledged is there
after a restart, bit for bit, from the log alone or from a snapshot plus the log after it."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import numpy as np
import pytest
from monim.datastore import NamespaceConfig
from monim.datastore.wal import WalCorrupted, read_segment
from monim.protos.errors import FailedPrecondition, ResourceExhausted, StepAnswerLost
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime

DIM, VALUE_DIM = 8, 4


def deployment(data_dir, shards=2, snapshot_every=0):
    return Router(LocalRuntime(shards, data_dir=str(data_dir), fsync="never", snapshot_every=snapshot_every))


def feed(router, seed=0):
    """A day of writes: adds (with sources, weights, merges), steps of both kinds, deletes."""
    rng = np.random.default_rng(seed)
    router.create_namespace(NamespaceConfig("ns", dim=DIM, value_dim=VALUE_DIM, optimizer={"name": "adam", "lr": 0.01}))
    router.create_namespace(NamespaceConfig("plain", dim=DIM))
    router.add("plain", rng.standard_normal((30, DIM)).astype(np.float32), np.arange(30))
    for day in range(6):
        keys = rng.standard_normal((40, DIM)).astype(np.float32)
        router.add("ns", keys, rng.integers(0, 9, 40), values=rng.standard_normal((40, VALUE_DIM)).astype(np.float32),
                   weights=rng.uniform(1, 2, 40).astype(np.float32), source=f"day-{day % 3}")
        router.add("ns", keys[:5] + 1e-3, np.full(5, 3), merge_eps=0.1)
        result = router.retrieve("ns", rng.standard_normal((6, DIM)).astype(np.float32), 5, 0.7)
        router.retrieve_backward("ns", result.queries, result.ids, result.alpha, result.distances,
                                 rng.standard_normal((6, VALUE_DIM)).astype(np.float32), 0.7)
        ids = router.search("ns", rng.standard_normal((1, DIM)).astype(np.float32), 8).ids[0]
        router.apply_gradients("ns", ids, rng.standard_normal((8, VALUE_DIM)).astype(np.float32))
        router.delete("ns", ids=ids[:2])
    router.delete("ns", source="day-1")
    router.drop_namespace("plain")


def state(router) -> dict:
    described = router.describe_namespace("ns")
    queries = np.random.default_rng(9).standard_normal((10, DIM)).astype(np.float32)
    found = router.search("ns", queries, 20, return_values=True, return_weights=True)
    ids = np.unique(found.ids[found.ids >= 0])
    rows = router.get("ns", ids, return_optimizer_state=True)
    return {"rows": described["rows"], "config": described["config"], "names": [c.name for c in router.list_namespaces()],
            "search": (found.ids.tolist(), found.distances.tolist(), found.values.tolist(), found.weights.tolist()),
            "values": rows.values.tolist(), "sources": rows.sources, "weights": rows.weights.tolist(),
            "state": {name: array.tolist() for name, array in rows.optimizer_state.items()}}


@pytest.mark.parametrize("snapshot_every", [0, 7], ids=["log only", "snapshots and log"])
def test_a_restarted_deployment_has_every_acknowledged_change(tmp_path, snapshot_every):
    first = deployment(tmp_path, snapshot_every=snapshot_every)
    feed(first)
    before = state(first)
    first.runtime.shutdown()  # finishes background snapshots, releases the data dir
    if snapshot_every:
        assert list((tmp_path / "shard-0").glob("snapshot-*/manifest.json"))
    again = deployment(tmp_path)
    assert state(again) == before
    # ids continue after the restart, never reused
    new = again.add("ns", np.ones((3, DIM), np.float32), np.arange(3)).ids
    assert new.min() > max(max(row) for row in before["search"][0])


def test_a_retry_after_a_restart_lands_once(tmp_path):
    first = deployment(tmp_path)
    first.create_namespace(NamespaceConfig("ns", dim=DIM))
    keys = np.random.default_rng(1).standard_normal((10, DIM)).astype(np.float32)
    first.add("ns", keys, np.arange(10), request_id="the-batch")
    first.runtime.shutdown()
    again = deployment(tmp_path)
    again.add("ns", keys, np.arange(10), request_id="the-batch")
    assert again.describe_namespace("ns")["rows"] == 10


@pytest.mark.parametrize("snapshot_every", [0, 1], ids=["log only", "snapshot after each write"])
def test_a_used_delete_request_id_is_known_after_a_restart(tmp_path, snapshot_every):
    """Another Delete reusing a request id answers the first count and deletes nothing, also after a
    restart: the whole request's digest is recovered from the log, or from the snapshot past it."""
    first = deployment(tmp_path, snapshot_every=snapshot_every)
    first.create_namespace(NamespaceConfig("ns", dim=DIM))
    keys = np.random.default_rng(2).standard_normal((40, DIM)).astype(np.float32)
    ids = first.add("ns", keys, np.arange(40)).ids
    assert first.delete("ns", ids=ids[:10], request_id="delete-1") == 10
    first.add("ns", keys[:2], np.arange(2))  # writes after it: a snapshot then covers the delete
    first.add("ns", keys[:2], np.arange(2))
    first.runtime.shutdown()
    again = deployment(tmp_path, snapshot_every=snapshot_every)
    assert again.delete("ns", ids=ids[20:30], request_id="delete-1") == 10
    assert again.describe_namespace("ns")["rows"] == 34


def three_adds_then_stop(data_dir, seed):
    """A 1-shard deployment that took three 5-row adds, then stopped: the path of its last log segment."""
    first = deployment(data_dir, shards=1)
    first.create_namespace(NamespaceConfig("ns", dim=DIM))
    rng = np.random.default_rng(seed)
    for _ in range(3):
        first.add("ns", rng.standard_normal((5, DIM)).astype(np.float32), np.arange(5))
    first.runtime.shutdown()
    return sorted((data_dir / "shard-0" / "wal").glob("*.wal"))[-1]


def test_a_torn_log_tail_recovers_to_the_last_whole_record(tmp_path):
    segment = three_adds_then_stop(tmp_path, seed=2)
    offset, payload, _ = list(read_segment(segment, last=True))[-1]
    with open(segment, "r+b") as file:
        file.truncate(offset + 12 + len(payload) - 3)  # the third add was being written when the process died
    assert deployment(tmp_path, shards=1).describe_namespace("ns")["rows"] == 10


def test_a_corrupt_log_keeps_the_shard_from_serving(tmp_path):
    segment = three_adds_then_stop(tmp_path, seed=3)
    data = bytearray(segment.read_bytes())
    data[len(data) // 2] ^= 0x10
    segment.write_bytes(bytes(data))
    with pytest.raises(WalCorrupted, match="corrupt at byte"):
        deployment(tmp_path, shards=1)


def test_a_full_disk_refuses_the_write_and_reads_go_on(tmp_path, monkeypatch):
    router = deployment(tmp_path)
    router.create_namespace(NamespaceConfig("ns", dim=DIM))
    rng = np.random.default_rng(4)
    router.add("ns", rng.standard_normal((20, DIM)).astype(np.float32), np.arange(20))
    queries = rng.standard_normal((3, DIM)).astype(np.float32)
    before = router.search("ns", queries, 5)
    full_descriptor = router.runtime.shards[1].wal._segments._fd
    real_pwrite = os.pwrite

    def pwrite(descriptor, data, offset):
        if descriptor == full_descriptor:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(descriptor, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(ResourceExhausted, match="No space left on device"):
        router.add("ns", rng.standard_normal((20, DIM)).astype(np.float32), np.arange(20))
    # shard 0 took its half (it had room); shard 1 refused before applying: no row of it is acknowledged
    assert router.runtime.shards[1].stores["ns"].rows.size == 10
    after = router.search("ns", queries, 5)
    assert after.ids.shape == before.ids.shape


def test_a_data_dir_serves_one_deployment_at_a_time(tmp_path):
    first = deployment(tmp_path)
    with pytest.raises(FailedPrecondition, match="in use by another running deployment"):
        deployment(tmp_path)
    first.runtime.shutdown()
    deployment(tmp_path).runtime.shutdown()  # free again once the first one is gone


FILE_SIZE_LIMIT_SCRIPT = """
import resource, signal, sys
import numpy as np
from monim.datastore import NamespaceConfig
from monim.protos.errors import ResourceExhausted
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
router = Router(LocalRuntime(1, data_dir=sys.argv[1], fsync="always", snapshot_every=0))
router.create_namespace(NamespaceConfig("ns", dim=64))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # no file may pass 1 MiB
rng = np.random.default_rng(0)
queries = rng.standard_normal((2, 64)).astype(np.float32)
acknowledged = 0
for call in range(100):
    try:
        router.add("ns", rng.standard_normal((500, 64)).astype(np.float32), np.arange(500))
        acknowledged += 500
    except ResourceExhausted as error:
        assert "could not write the write-ahead log" in error.message, error.message
        break
else:
    raise SystemExit("the file size limit was never reached")
assert router.describe_namespace("ns")["rows"] == acknowledged
assert router.search("ns", queries, 3).ids.shape == (2, 3)  # reads go on
print(acknowledged)
"""


def test_a_data_dir_on_a_file_size_limit_refuses_the_write_and_keeps_what_was_acknowledged(tmp_path):
    """A real limit (RLIMIT_FSIZE, enforced by the kernel) instead of a simulated ENOSPC."""
    result = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT_SCRIPT, str(tmp_path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    acknowledged = int(result.stdout.split()[-1])
    assert 0 < acknowledged < 100 * 500
    router = Router(LocalRuntime(1, data_dir=str(tmp_path), fsync="always", snapshot_every=0))
    assert router.describe_namespace("ns")["rows"] == acknowledged  # nothing half-written came back
    router.runtime.shutdown()


def _stepped_deployment(tmp_path, shards, steps=("s1",)):
    """A deployment with 50 rows and an SGD step (RetrieveBackward) per step id; returns (router, the
    backward's arguments, {step id: its answer})."""
    rng = np.random.default_rng(3)
    router = deployment(tmp_path, shards=shards)
    router.create_namespace(NamespaceConfig("ns", dim=DIM, value_dim=VALUE_DIM, optimizer={"name": "sgd", "lr": 0.5}))
    router.add("ns", rng.standard_normal((50, DIM)).astype(np.float32), np.arange(50),
               values=rng.standard_normal((50, VALUE_DIM)).astype(np.float32))
    queries = rng.standard_normal((4, DIM)).astype(np.float32)
    found = router.retrieve("ns", queries, 6, 0.7)
    args = (queries, found.ids, found.alpha, found.distances, rng.standard_normal((4, VALUE_DIM)).astype(np.float32), 0.7)
    return router, args, {step: router.retrieve_backward("ns", *args, step_id=step) for step in steps}


@pytest.mark.parametrize("shards", [1, 2])
def test_a_backward_retried_after_a_restart_answers_its_first_gradients_or_says_it_cannot(tmp_path, shards):
    """A RetrieveBackward whose commit a shard took before it was killed (the client saw UNAVAILABLE) is
    sent again with its step id after the restart: the value rows must not step twice, and the answer
    must be the first try's dL/dq and dL/dT, or an error that says they are gone, never sums over
    the rows' values after the step."""
    first, args, answers = _stepped_deployment(tmp_path, shards)
    answer = answers["s1"]
    stepped = first.get("ns", np.arange(50)).values
    first.runtime.shutdown()
    again = deployment(tmp_path, shards=shards)
    try:
        retried = again.retrieve_backward("ns", *args, step_id="s1")
    except FailedPrecondition:
        retried = None
    np.testing.assert_array_equal(again.get("ns", np.arange(50)).values, stepped)  # stepped once
    if retried is not None:
        np.testing.assert_allclose(retried[0], answer[0], rtol=1e-6, atol=1e-7)
        assert retried[1] == pytest.approx(answer[1])


def test_a_backward_retried_after_its_sums_aged_out_says_so_and_a_recent_one_answers_the_same(tmp_path):
    """A shard keeps the sums of its latest committed steps up to a byte bound: a retry of an older step
    is answered FAILED_PRECONDITION (StepAnswerLost), not sums over the values after the step; a retry
    of the latest gets its first answer; neither steps anything again."""
    router, args, answers = _stepped_deployment(tmp_path, 1, steps=())
    router.runtime.shards[0]._answered.max_bytes = 1  # keeps the latest step's sums only
    for step in ("s1", "s2"):
        answers[step] = router.retrieve_backward("ns", *args, step_id=step)
    stepped = router.get("ns", np.arange(50)).values
    with pytest.raises(StepAnswerLost, match="step 's1' was committed on shard 0") as lost:
        router.retrieve_backward("ns", *args, step_id="s1")
    assert isinstance(lost.value, FailedPrecondition)
    again = router.retrieve_backward("ns", *args, step_id="s2")
    np.testing.assert_array_equal(again[0], answers["s2"][0])
    assert again[1] == answers["s2"][1]
    np.testing.assert_array_equal(router.get("ns", np.arange(50)).values, stepped)
    router.runtime.shutdown()


def test_a_step_committed_on_one_shard_before_both_restarted_is_finished_by_its_retry(tmp_path):
    """Both shards staged their parts; only shard 0's commit landed before both were killed (shard 1's
    parts are lost). The retry with the step id: shard 0 cannot answer its sums again (StepAnswerLost),
    and shard 1 stages its part again; the router commits it before saying so, so every row of the
    step stepped exactly once, as in a twin that committed whole."""
    twin, args, _ = _stepped_deployment(tmp_path / "twin", 2, steps=("s1",))
    whole = twin.get("ns", np.arange(50)).values
    twin.runtime.shutdown()
    first, args, _ = _stepped_deployment(tmp_path / "run", 2, steps=())
    first.retrieve_backward("ns", *args, step_id="s1", defer_step=True)
    config = first.config("ns")
    first.runtime.shards[0].commit_step("ns", config.generation, first._step_key(config, "s1"))
    first.runtime.shutdown()
    again = deployment(tmp_path / "run", shards=2)
    with pytest.raises(StepAnswerLost, match="step 's1' was committed on shard 0"):
        again.retrieve_backward("ns", *args, step_id="s1")
    np.testing.assert_array_equal(again.get("ns", np.arange(50)).values, whole)
    with pytest.raises(StepAnswerLost):  # sent once more: nothing steps again
        again.retrieve_backward("ns", *args, step_id="s1")
    np.testing.assert_array_equal(again.get("ns", np.arange(50)).values, whole)
    again.runtime.shutdown()


def test_a_client_of_a_restarted_server_gets_step_answer_lost_with_its_status(tmp_path):
    """Through gRPC: the front end sends the reason with FAILED_PRECONDITION, and the client raises
    StepAnswerLost (a FailedPrecondition), so a training loop can tell "this step's gradients are gone,
    its rows stepped" from a stale forward handle; the rows stepped once."""
    from monim.model_client import MemoryClient
    from monim.workers.server import start_server

    def serve():
        router = deployment(tmp_path, shards=2)
        server, port = start_server(router, port=0)
        return router, server, MemoryClient(f"127.0.0.1:{port}")

    rng = np.random.default_rng(5)
    router, server, client = serve()
    client.create_namespace("ns", dim=DIM, value_dim=VALUE_DIM, optimizer="sgd", lr=0.5)
    client.add("ns", rng.standard_normal((50, DIM)).astype(np.float32), np.arange(50),
               values=rng.standard_normal((50, VALUE_DIM)).astype(np.float32))
    found = client.retrieve("ns", rng.standard_normal((4, DIM)).astype(np.float32), 6, 0.7)
    grad = rng.standard_normal((4, VALUE_DIM)).astype(np.float32)
    client.retrieve_backward("ns", found, grad, step_id="s1")
    stepped = client.get("ns", np.arange(50)).values
    client.close(), server.stop(0), router.runtime.shutdown()
    router, server, client = serve()
    try:
        with pytest.raises(StepAnswerLost, match="step 's1' was committed") as lost:
            client.retrieve_backward("ns", found, grad, step_id="s1")
        assert lost.value.status_code == "FAILED_PRECONDITION"
        np.testing.assert_array_equal(client.get("ns", np.arange(50)).values, stepped)
        client.drop_namespace("ns")
        client.create_namespace("ns", dim=DIM, value_dim=VALUE_DIM, optimizer="sgd", lr=0.5)
        with pytest.raises(FailedPrecondition, match="re-created") as other:  # another one stays a plain one
            client.retrieve_backward("ns", found, grad, step_id="s2")
        assert type(other.value) is FailedPrecondition
    finally:
        client.close(), server.stop(0), router.runtime.shutdown()
