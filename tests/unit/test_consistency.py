"""Correctness under partial failure and interleaving, on in-process shards (LocalRuntime), where a
failure or a concurrent delete can be placed exactly between two rounds of a call.

Each test names the behaviour a caller relies on; the Ray versions of the concurrent ones run
for real in tests/integration/test_concurrency.py.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
import torch
from monim.datastore import NamespaceConfig
from monim.model_client import MemoryClient
from monim.model_client.layer import MoNIMLayer
from monim.model_client.local_store import LocalMemory
from monim.protos.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    IdsNotFound,
    InvalidArgument,
    ShardUnavailable,
    Unavailable,
)
from monim.workers import router as router_module
from monim.workers.registry import NamespaceRegistry
from monim.workers.router import DESCRIBE_WAIT_S, Router
from monim.workers.runtime import LocalRuntime

from tests.unit.test_learnable_memory import dense_reference

N, DIM, VALUE_DIM, K, LR = 60, 4, 3, 6, 0.5


class Hooked:
    """A shard whose calls first run ``before(method, args)``, which may raise or act."""

    def __init__(self, shard, before):
        self.shard, self.before = shard, before

    def __getattr__(self, name):
        target = getattr(self.shard, name)
        if not callable(target):
            return target

        def call(*args):
            if name == "placed":  # the router's version-checked call (Shard.placed): hook the method it runs
                version, method, *rest = args
                self.before(method, tuple(rest))
                return target(version, method, *rest)
            self.before(name, args)
            return target(*args)

        return call


def rows(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((N, DIM)).astype(np.float32), np.arange(N) % 7,
            rng.standard_normal((N, VALUE_DIM)).astype(np.float32))


def make_router(shards=2, metric="l2", timeout_s=30.0):
    runtime = LocalRuntime(shards)
    router = Router(runtime, timeout_s=timeout_s)
    router.create_namespace(NamespaceConfig("ns", dim=DIM, metric=metric, value_dim=VALUE_DIM,
                                            optimizer={"name": "sgd", "lr": LR}))
    return router, runtime


def stored(router, ids):
    got = router.get("ns", ids, return_optimizer_state=True)
    return got.values.copy(), got.optimizer_state["step"].copy()


def queries(seed=1, batch=5):
    return np.random.default_rng(seed).standard_normal((batch, DIM)).astype(np.float32)


# ----- 1. CreateNamespace --------------------------------------------------------------------------
def test_a_failed_create_never_drops_the_namespace_the_shards_already_hold():
    router, runtime = make_router()
    keys, tokens, values = rows()
    router.add("ns", keys, tokens, values=values)
    runtime.registry = NamespaceRegistry(2)  # a registry that lost its state, shards that did not
    with pytest.raises(AlreadyExists):
        router.create_namespace(NamespaceConfig("ns", dim=DIM, value_dim=VALUE_DIM))
    assert sum(len(shard.stores["ns"]) for shard in runtime.shards) == N
    assert runtime.registry.call("list") == []  # and the failed create left no registration behind


# ----- 2. multi-shard writes -----------------------------------------------------------------------
def fail_once(method_names, shard=1):
    left = {"count": 1}

    def before(method, args):
        if method in method_names and left["count"]:
            left["count"] -= 1
            raise ShardUnavailable(shard, "injected")

    return before


def test_an_add_that_failed_on_one_shard_lands_exactly_once_when_retried():
    router, runtime = make_router()
    runtime.shards[1] = Hooked(runtime.shards[1], fail_once({"add"}))
    keys, tokens, values = rows()
    with pytest.raises(Unavailable):
        router.add("ns", keys, tokens, values=values, request_id="batch-1")
    assert 0 < router.describe_namespace("ns")["rows"] < N  # shard 0 stored its part
    result = router.add("ns", keys, tokens, values=values, request_id="batch-1")
    assert router.describe_namespace("ns")["rows"] == N
    np.testing.assert_array_equal(result.ids, np.arange(N))
    np.testing.assert_array_equal(router.get("ns", result.ids).keys, keys)


def test_the_client_retries_a_failed_write_and_it_lands_once():
    client = MemoryClient(":memory:", backoff_s=0.001)
    client.create_namespace("ns", dim=DIM, value_dim=VALUE_DIM)
    runtime = client._store.runtime
    runtime.shards[0] = Hooked(runtime.shards[0], fail_once({"add"}, shard=0))
    keys, tokens, values = rows()
    ids = client.add("ns", keys, tokens, values=values)
    assert client.describe_namespace("ns").rows == N
    np.testing.assert_array_equal(ids, np.arange(N))


def test_a_backward_that_fails_on_one_shard_steps_no_shard():
    router, runtime = make_router()
    keys, tokens, values = rows()
    router.add("ns", keys, tokens, values=values)
    result = router.retrieve("ns", queries(), K, 1.0)
    before = stored(router, np.arange(N))
    runtime.shards[1] = Hooked(runtime.shards[1], fail_once({"backward_part", "backward_partials"}))
    with pytest.raises(Unavailable):
        router.retrieve_backward("ns", result.queries, result.ids, result.alpha, result.distances,
                                 np.ones((5, VALUE_DIM), np.float32), 1.0)
    after = stored(router, np.arange(N))
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])


def test_apply_gradients_that_fail_on_one_shard_step_no_shard():
    router, runtime = make_router()
    keys, tokens, values = rows()
    router.add("ns", keys, tokens, values=values)
    before = stored(router, np.arange(N))
    runtime.shards[1] = Hooked(runtime.shards[1], fail_once({"stage_gradients", "apply_gradients"}))
    with pytest.raises(Unavailable):
        router.apply_gradients("ns", np.arange(N), np.ones((N, VALUE_DIM), np.float32))
    np.testing.assert_array_equal(stored(router, np.arange(N))[0], before[0])


def test_a_write_that_outlived_its_deadline_lands_once_when_retried():
    router, runtime = make_router(timeout_s=0.2)
    slow = {"first": True}

    def before(method, args):
        if method == "add" and slow["first"]:
            slow["first"] = False
            time.sleep(0.6)

    runtime.shards[1] = Hooked(runtime.shards[1], before)
    keys, tokens, values = rows()
    with pytest.raises(DeadlineExceeded):
        router.add("ns", keys, tokens, values=values, request_id="slow-batch")
    time.sleep(0.8)  # the "failed" write lands late on shard 1
    router.add("ns", keys, tokens, values=values, request_id="slow-batch")
    assert router.describe_namespace("ns")["rows"] == N


# ----- 3. races between the rounds of one call ----------------------------------------------------
def delete_first_held_id(runtime, shard, methods, result_holder):
    """Before the first call of one of ``methods`` on ``shard``: delete, on that shard, one id of the
    call's ids (a concurrent Delete landing between two rounds)."""
    state = {"done": False}
    inner = runtime.shards[shard]

    def before(method, args):
        if method in methods and not state["done"]:
            state["done"] = True
            ids = next(a for a in args if isinstance(a, np.ndarray) and a.dtype == np.int64 and a.ndim == 2)
            held = np.unique(ids[(ids >= 0) & (ids % runtime.num_shards == shard)])
            result_holder.append(int(held[0]))
            inner.stores["ns"].delete(ids=held[:1])

    runtime.shards[shard] = Hooked(inner, before)


def test_a_row_deleted_between_search_and_value_sum_never_leaves_a_hole_in_the_memory(monkeypatch):
    monkeypatch.setattr(router_module, "ONE_ROUND_VALUE_BYTES", 0)  # the two-round forward: its race
    router, runtime = make_router()
    keys, tokens, values = rows()
    router.add("ns", keys, tokens, values=values)
    deleted = []
    delete_first_held_id(runtime, 0, {"value_sum"}, deleted)
    result = router.retrieve("ns", queries(), K, 1.0)
    assert deleted and deleted[0] not in result.ids
    current = router.get("ns", result.ids.reshape(-1)).values.reshape(result.ids.shape + (VALUE_DIM,))
    np.testing.assert_allclose(result.memory, (result.alpha[..., None] * current).sum(1), atol=1e-5)


def test_a_small_retrieve_reads_the_values_with_the_search_in_one_round(monkeypatch):
    """Decoding (small B x k): the value rows come with the search, from the same hold of each shard's
    lock, so no shard is called twice and no delete can fall between two rounds; m is the same as the
    two-round forward's."""
    router, runtime = make_router()
    keys, tokens, values = rows()
    router.add("ns", keys, tokens, values=values)
    calls = []
    for shard in range(runtime.num_shards):
        runtime.shards[shard] = Hooked(runtime.shards[shard], lambda method, args: calls.append(method))
    one = router.retrieve("ns", queries(), K, 1.0)
    assert calls.count("search") == runtime.num_shards and "value_sum" not in calls
    monkeypatch.setattr(router_module, "ONE_ROUND_VALUE_BYTES", 0)
    two = router.retrieve("ns", queries(), K, 1.0)
    assert "value_sum" in calls
    np.testing.assert_array_equal(one.ids, two.ids)
    np.testing.assert_allclose(one.memory, two.memory, rtol=1e-6, atol=1e-7)
    stored_values = router.get("ns", one.ids.reshape(-1)).values.reshape(one.ids.shape + (VALUE_DIM,))
    np.testing.assert_allclose(one.memory, (one.alpha[..., None] * stored_values).sum(1), atol=1e-6)


def test_a_row_deleted_during_the_backward_fails_it_and_steps_nothing():
    router, runtime = make_router()
    keys, tokens, values = rows()
    router.add("ns", keys, tokens, values=values)
    result = router.retrieve("ns", queries(), K, 1.0)
    before = stored(router, np.arange(N))
    deleted = []
    delete_first_held_id(runtime, 0, {"backward_part", "backward_partials"}, deleted)
    with pytest.raises(IdsNotFound) as raised:
        router.retrieve_backward("ns", result.queries, result.ids, result.alpha, result.distances,
                                 np.ones((5, VALUE_DIM), np.float32), 1.0)
    assert raised.value.missing_ids == deleted
    kept = np.setdiff1d(np.arange(N), deleted)
    after = stored(router, kept)
    np.testing.assert_array_equal(after[0], before[0][kept])
    np.testing.assert_array_equal(after[1], before[1][kept])


# ----- 4. values train without any other gradient --------------------------------------------------
def test_values_train_with_a_frozen_model_and_a_fixed_temperature():
    client = MemoryClient(":memory:")
    client.create_namespace("ns", dim=DIM, value_dim=VALUE_DIM, optimizer="sgd", lr=LR)
    keys, tokens, values = rows()
    client.add("ns", keys, tokens, values=values)
    layer = MoNIMLayer(client, "ns", k=K, learn_temperature=False)
    hidden = torch.from_numpy(queries(batch=8)).reshape(2, 4, DIM)  # a frozen LM's states: no grad
    (layer.gate * layer(hidden)).sum().backward()
    assert layer.gate.grad is not None and layer.gate.grad != 0
    changed = (client.get("ns", np.arange(N)).values != values).any(axis=1)
    assert changed.sum() > 0
    frozen = MoNIMLayer(client, "ns", k=K, learn_temperature=False, train_values=False)
    before = client.get("ns", np.arange(N)).values
    (frozen.gate * frozen(hidden)).sum().backward()
    np.testing.assert_array_equal(client.get("ns", np.arange(N)).values, before)


def test_frozen_values_stay_frozen_when_the_temperature_learns():
    """train_values=False with a learned T: the backward gives T (and the queries) their gradients
    and steps no value row (the store used to step them in every backward)."""
    client = MemoryClient(":memory:")
    client.create_namespace("ns", dim=DIM, value_dim=VALUE_DIM, optimizer="sgd", lr=LR)
    keys, tokens, values = rows()
    client.add("ns", keys, tokens, values=values)
    frozen = MoNIMLayer(client, "ns", k=K, learn_temperature=True, train_values=False)
    hidden = torch.from_numpy(queries(batch=8)).reshape(2, 4, DIM)
    (frozen.gate * frozen(hidden)).sum().backward()
    assert frozen.log_temperature.grad is not None and frozen.log_temperature.grad != 0
    np.testing.assert_array_equal(client.get("ns", np.arange(N)).values, values)


# ----- 5. generations ----------------------------------------------------------------------------
def test_a_second_front_end_follows_a_namespace_recreated_by_the_first():
    runtime = LocalRuntime(2)
    first, second = Router(runtime), Router(runtime)
    keys, tokens, values = rows()
    first.create_namespace(NamespaceConfig("ns", dim=DIM, metric="l2", value_dim=VALUE_DIM))
    first.add("ns", keys, tokens, values=values)
    second.search("ns", queries(), K)  # the second front end caches the l2 config
    first.drop_namespace("ns")
    first.create_namespace(NamespaceConfig("ns", dim=DIM, metric="ip", value_dim=VALUE_DIM))
    first.add("ns", keys, tokens, values=values)
    result = second.retrieve("ns", queries(), K, 1.0)
    grad_memory = np.ones((5, VALUE_DIM), np.float32)
    grad_queries, grad_temperature = second.retrieve_backward(
        "ns", result.queries, result.ids, result.alpha, result.distances, grad_memory, 1.0)
    _, _, ref_grad_queries, ref_grad_temperature, _ = dense_reference(
        result.queries, keys, values, np.ones(N, np.float32), result.ids, "ip", 1.0, grad_memory)
    np.testing.assert_allclose(grad_queries, ref_grad_queries, atol=1e-5)
    assert second.describe_namespace("ns")["config"].metric == "ip"


def test_an_old_retrieve_result_never_updates_the_rows_of_a_recreated_namespace():
    client = MemoryClient(":memory:")
    client.create_namespace("ns", dim=DIM, value_dim=VALUE_DIM, optimizer="sgd", lr=LR)
    keys, tokens, values = rows()
    client.add("ns", keys, tokens, values=values)
    old = client.retrieve("ns", queries(), K)
    client.drop_namespace("ns")
    client.create_namespace("ns", dim=DIM, value_dim=VALUE_DIM, optimizer="sgd", lr=LR)
    client.add("ns", keys[::-1].copy(), tokens, values=values * 2)  # new rows, the same ids
    with pytest.raises(FailedPrecondition, match="re-created"):
        client.retrieve_backward("ns", old, np.ones((5, VALUE_DIM), np.float32))
    np.testing.assert_array_equal(client.get("ns", np.arange(N)).values, values * 2)


# ----- 11. one code path ---------------------------------------------------------------------------
def test_the_in_process_store_is_the_router_over_one_shard():
    client = MemoryClient(":memory:")
    assert isinstance(client._store, LocalMemory) and isinstance(client._store, Router)
    assert client._store.num_shards == 1


# ----- 12. errors an operator must see ------------------------------------------------------------
def test_a_shard_failure_leaves_its_traceback_in_the_front_end_log(caplog):
    router, runtime = make_router()

    def broken(method, args):
        if method == "search":
            raise RuntimeError("disk on fire")

    runtime.shards[1] = Hooked(runtime.shards[1], broken)
    with caplog.at_level(logging.ERROR, logger="monim.workers.runtime"), pytest.raises(RuntimeError):
        router.search("ns", queries(), K)
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert "shard 1" in logged and "disk on fire" in logged and "Traceback" in logged


def test_describe_names_a_shard_that_does_not_answer():
    router, runtime = make_router()
    runtime.kill_shard(1)
    shards = router.describe_namespace("ns")["shards"]
    assert [s["state"] for s in shards] == ["serving", "unavailable"]


def test_a_request_id_is_scoped_to_its_namespace():
    """The same request id sent to another namespace is another request (it used to answer the
    first namespace's result and change nothing)."""
    from monim.workers.router import Router
    from monim.workers.runtime import LocalRuntime

    router = Router(LocalRuntime(2))
    for name in ("a", "b"):
        router.create_namespace(NamespaceConfig(name, dim=4))
    keys = np.eye(4, dtype=np.float32)
    first = router.add("a", keys, np.arange(4), request_id="batch-1")
    second = router.add("b", keys, np.arange(4), request_id="batch-1")
    again = router.add("a", keys, np.arange(4), request_id="batch-1")  # a retry in "a" lands once
    assert [router.describe_namespace(name)["rows"] for name in ("a", "b")] == [4, 4]
    np.testing.assert_array_equal(again.ids, first.ids)
    assert len(second.ids) == 4
    assert router.delete("b", ids=second.ids[:2], request_id="del-1") == 2
    assert router.delete("a", ids=first.ids[:2], request_id="del-1") == 2
    assert [router.describe_namespace(name)["rows"] for name in ("a", "b")] == [2, 2]


def test_a_shard_never_commits_a_step_staged_for_another_namespace():
    """A safety net below the router (which names steps per namespace): a commit that names the
    step of another namespace is refused, and that step stays staged for its own commit."""
    from monim.workers.shard import Shard

    shard = Shard(0)
    for name in ("a", "b"):
        shard.create_namespace(NamespaceConfig(name, dim=2, value_dim=2, generation=5).to_dict())
        shard.add(name, 5, f"add-{name}", np.arange(2), np.eye(2, dtype=np.float32), np.arange(2), None, None, "")
    shard.stage_gradients("a", 5, "step", 0, np.arange(2), np.ones((2, 2), np.float32))
    with pytest.raises(InvalidArgument, match="staged for namespace 'a'"):
        shard.commit_step("b", 5, "step")
    assert shard.commit_step("a", 5, "step", expect_parts=True) == 2


def test_describe_within_its_deadline_counts_the_shards_that_answer_when_one_is_stuck():
    """Seen in the reliability profile (CI, seed 15): a shard stuck behind its queue (back from a
    SIGSTOP) made DescribeNamespace's first round use the call's whole deadline, and the per-shard
    round after it found no time left for any shard: both read "recovering" with 0 rows, the shard
    that was serving included. Each shard now has the deadline, in one round: the stuck one is named,
    the other's rows are counted, and the answer comes before the deadline."""
    router, runtime = make_router()
    router.add("ns", np.ones((10, DIM), np.float32), np.zeros(10, np.int64))
    held = [s["rows"] for s in router.describe_namespace("ns")["shards"]]
    release = threading.Event()

    def stuck(method, args):
        if method == "stats":
            release.wait(20)

    runtime.shards[1] = Hooked(runtime.shards[1], stuck)
    try:
        started = time.monotonic()
        with router.deadline(4.0):
            described = router.describe_namespace("ns")
        took = time.monotonic() - started
    finally:
        release.set()
    assert [s["state"] for s in described["shards"]] == ["serving", "unavailable"]
    assert described["shards"][0]["rows"] == held[0] > 0
    assert described["rows"] == held[0]
    assert DESCRIBE_WAIT_S <= took < 4.0
