"""Correctness with Ray, for real: several threads, two front ends on one 3-shard deployment, the
session's 2-shard service, and the wire format's edge cases (explicit presence, message splits).
"""

from __future__ import annotations

import logging
import threading
import uuid

import numpy as np
import pytest
from monim.model_client import MemoryClient
from monim.protos.errors import FailedPrecondition, InvalidArgument, NotFound

DIM, VALUE_DIM, K, LR = 8, 4, 8, 0.5


@pytest.fixture
def two_clients(three_shard_front_ends):
    """One client per front end of the 3-shard deployment."""
    with MemoryClient(three_shard_front_ends[0], timeout_s=60) as first, \
            MemoryClient(three_shard_front_ends[1], timeout_s=60) as second:
        yield first, second


def new_name() -> str:
    return f"c-{uuid.uuid4().hex[:10]}"


def run_threads(*targets):
    errors = []

    def guarded(target):
        try:
            target()
        except BaseException as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors


def test_two_front_ends_adding_at_once_never_share_an_id(two_clients):
    first, second = two_clients
    name = new_name()
    first.create_namespace(name, dim=DIM)
    added = {}

    def adder(client, tag):
        def run():
            rng = np.random.default_rng(abs(hash(tag)) % 2**32)
            for batch in range(15):
                keys = rng.standard_normal((40, DIM)).astype(np.float32)
                added[(tag, batch)] = (client.add(name, keys, np.arange(40), source=tag), keys)
        return run

    run_threads(*(adder(client, f"{side}-{t}") for side, client in (("a", first), ("b", second)) for t in range(2)))
    ids = np.concatenate([ids for ids, _ in added.values()])
    assert np.unique(ids).size == ids.size == 4 * 15 * 40
    assert first.describe_namespace(name).rows == ids.size
    for ids, keys in added.values():
        np.testing.assert_array_equal(second.get(name, ids).keys, keys)
    first.drop_namespace(name)


def test_a_front_end_follows_a_namespace_recreated_through_the_other(two_clients):
    first, second = two_clients
    name = new_name()
    rng = np.random.default_rng(3)
    first.create_namespace(name, dim=DIM, value_dim=VALUE_DIM, metric="l2")
    first.add(name, rng.standard_normal((50, DIM)).astype(np.float32), np.arange(50),
              values=rng.standard_normal((50, VALUE_DIM)).astype(np.float32))
    old = second.retrieve(name, rng.standard_normal((3, DIM)).astype(np.float32), K)  # caches the old config
    first.drop_namespace(name)
    wider = 2 * DIM
    first.create_namespace(name, dim=wider, value_dim=VALUE_DIM, metric="ip")
    first.add(name, rng.standard_normal((50, wider)).astype(np.float32), np.arange(50),
              values=np.ones((50, VALUE_DIM), np.float32))
    found = second.search(name, rng.standard_normal((3, wider)).astype(np.float32), K)  # the new width
    assert found.ids.shape == (3, K) and (found.distances <= 0).any()  # ip: negative inner products
    with pytest.raises(FailedPrecondition, match="re-created"):
        second.retrieve_backward(name, old, np.ones((3, VALUE_DIM), np.float32))
    np.testing.assert_array_equal(first.get(name, np.arange(50)).values, 1.0)
    first.drop_namespace(name)


def test_training_while_rows_are_deleted_never_takes_a_silently_wrong_step(two_clients):
    """One trainer (front end 1) runs forward/backward; a deleter (front end 2) deletes rows of the
    trainer's neighbourhoods at the same time. Only the trainer changes values, so every step can
    be checked exactly: a forward's memory is alpha . values of its ids; a backward either moves
    each surviving row by -lr * its gradient, or answers NOT_FOUND and moves nothing."""
    trainer, deleter = two_clients
    name = new_name()
    rng = np.random.default_rng(7)
    trainer.create_namespace(name, dim=DIM, value_dim=VALUE_DIM, optimizer="sgd", lr=LR)
    trainer.add(name, rng.standard_normal((600, DIM)).astype(np.float32), np.arange(600),
                values=rng.standard_normal((600, VALUE_DIM)).astype(np.float32))
    query_bank = rng.standard_normal((40, 4, DIM)).astype(np.float32)
    stop = threading.Event()
    outcomes = {"stepped": 0, "not_found": 0}

    def values_of(ids):
        try:
            return trainer.get(name, ids).values
        except NotFound:
            return None

    def train():
        try:
            for queries in query_bank:
                result = trainer.retrieve(name, queries, K)
                flat = np.unique(result.ids)
                before = values_of(flat)
                if before is None:
                    continue  # a row went after the forward: nothing to compare the forward with
                by_id = dict(zip(flat.tolist(), before))
                expected_memory = np.einsum("bk,bkv->bv", result.alpha,
                                            np.stack([[by_id[i] for i in row] for row in result.ids.tolist()]))
                np.testing.assert_allclose(result.memory, expected_memory, atol=1e-4)
                grad = np.random.default_rng(len(flat)).standard_normal((4, VALUE_DIM)).astype(np.float32)
                try:
                    trainer.retrieve_backward(name, result, grad)
                    outcome = "stepped"
                except NotFound as error:  # the service's NOT_FOUND names the ids that went
                    assert "has no entries with ids" in error.message
                    outcome = "not_found"
                outcomes[outcome] += 1
                expected = dict(by_id)
                if outcome == "stepped":
                    for b, row in enumerate(result.ids.tolist()):
                        for slot, entry in enumerate(row):
                            expected[entry] = expected[entry] - LR * result.alpha[b, slot] * grad[b]
                for entry, value in expected.items():
                    now = values_of(np.array([entry]))
                    if now is not None:
                        np.testing.assert_allclose(now[0], value, atol=1e-4, err_msg=f"{outcome} row {entry}")
        finally:
            stop.set()

    def delete():
        victims = np.random.default_rng(1)
        while not stop.is_set():
            found = deleter.search(name, query_bank[victims.integers(0, len(query_bank))], K)
            deleter.delete(name, ids=found.ids[0, victims.integers(0, K, 2)])
            stop.wait(0.01)

    run_threads(train, delete)
    assert outcomes["stepped"] > 0
    trainer.drop_namespace(name)


def test_a_backward_larger_than_one_message_is_one_optimizer_step(server_address):
    """Sent in parts (a 64 KiB message limit), the backward applies one step: the same values,
    per-row steps and gradients as the same backward sent whole. SGD, whose change is linear in the
    gradient: the parts' sums over a row's queries run in another order, and Adam's first step
    (about lr * g / |g| per element) turns the float32 rounding of a gradient that nearly cancels into
    a change of up to lr (it failed 2 runs in 8 at 2e-6 with Adam, before and after the parts were
    joined in order); the step counts below show it is one step either way."""
    rng = np.random.default_rng(5)
    keys = rng.standard_normal((300, 32)).astype(np.float32)
    values = rng.standard_normal((300, 16)).astype(np.float32)
    queries = rng.standard_normal((400, 32)).astype(np.float32)
    grad = rng.standard_normal((400, 16)).astype(np.float32)
    answers = []
    with MemoryClient(server_address) as reader:
        for limit in (256 << 20, 64 << 10):
            name = new_name()
            with MemoryClient(server_address, max_message_bytes=limit) as client:
                client.create_namespace(name, dim=32, value_dim=16, optimizer="sgd", lr=0.1)
                # With the small limit the Add goes in chunks, several at a time: ids in the order the
                # chunks arrived, so rows are compared by the ids the Add returned, in row order.
                ids = client.add(name, keys, np.arange(300), values=values)
                result = client.retrieve(name, queries, 16)
                grad_queries, grad_temperature = client.retrieve_backward(name, result, grad)
            rows = reader.get(name, ids, return_optimizer_state=True)
            answers.append((grad_queries, grad_temperature, rows.values, rows.optimizer_state["step"]))
            reader.drop_namespace(name)
    (gq_whole, gt_whole, v_whole, s_whole), (gq_parts, gt_parts, v_parts, s_parts) = answers
    np.testing.assert_allclose(gq_parts, gq_whole, rtol=1e-5, atol=1e-4)  # float32 sums in another order
    assert abs(gt_parts - gt_whole) <= 1e-4 * max(1.0, abs(gt_whole))
    np.testing.assert_allclose(v_parts, v_whole, atol=1e-6)
    np.testing.assert_array_equal(s_parts, s_whole)
    assert s_whole.max() == 1  # one step, however many messages carried it


def test_delete_by_the_empty_source_deletes_the_untagged_rows(remote_client, namespace_name):
    client = remote_client
    client.create_namespace(namespace_name, dim=DIM)
    rng = np.random.default_rng(0)
    untagged = client.add(namespace_name, rng.standard_normal((5, DIM)).astype(np.float32), np.arange(5))
    tagged = client.add(namespace_name, rng.standard_normal((3, DIM)).astype(np.float32), np.arange(3), source="x")
    assert client.delete(namespace_name, source="") == 5
    assert client.describe_namespace(namespace_name).rows == 3
    np.testing.assert_array_equal(client.get(namespace_name, tagged).ids, tagged)
    with pytest.raises(NotFound):
        client.get(namespace_name, untagged[:1])
    with pytest.raises(InvalidArgument, match="either ids or a source"):
        client.delete(namespace_name)
    client.drop_namespace(namespace_name)


def test_a_shard_actor_failure_leaves_its_traceback_in_the_front_end_log(ray_joined, caplog):
    """An error inside a shard actor that is not a caller's mistake is logged by the front end with
    the actor's traceback (Ray's log_to_driver also forwards the actor's own output)."""
    from monim.workers.runtime import RayRuntime

    runtime = RayRuntime(1, address="auto", shard_cpus=0, use_gpus=False, deployment=f"log-{uuid.uuid4().hex[:8]}")
    try:
        with caplog.at_level(logging.ERROR, logger="monim.workers.runtime"), pytest.raises(TypeError):
            runtime.call_shards([(0, "drop_namespace", (["a list is no namespace name"], 0))], 60)
    finally:
        runtime.shutdown()
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "shard 0 failed" in logged and "shard.py" in logged and "TypeError: unhashable type" in logged
