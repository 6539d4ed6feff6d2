"""The router hands a shard views of the caller's rows where a shard's share is one run of them (an
in-process router over one shard: no copy of a 400 MB Add), copies where it is not; and a shard
keeps its own copy of the gradients it stages, so a caller that reuses its array after a deferred
part does not change the step."""

from __future__ import annotations

import numpy as np
from monim.datastore import NamespaceConfig
from monim.datastore.optimizers import OptimizerConfig
from monim.workers.router import Router, _rows
from monim.workers.runtime import LocalRuntime

DIM, VALUE_DIM = 8, 4


def test_rows_is_a_view_for_one_run_and_a_copy_otherwise():
    array = np.arange(20).reshape(10, 2)
    run, scattered = _rows(array, np.arange(3, 7)), _rows(array, np.array([1, 4, 5]))
    assert np.shares_memory(run, array) and not np.shares_memory(scattered, array)
    np.testing.assert_array_equal(run, array[3:7])
    np.testing.assert_array_equal(scattered, array[[1, 4, 5]])
    assert _rows(array, np.empty(0, np.int64)).shape == (0, 2) and _rows(None, np.arange(2)) is None


def test_one_shard_gets_a_view_of_the_caller_s_rows_and_stores_them(rng):
    router = Router(LocalRuntime(1))
    router.create_namespace(NamespaceConfig("ns", dim=DIM, value_dim=VALUE_DIM))
    shard = router.runtime.shards[0]
    received = []
    real = shard.add
    shard.add = lambda *args: (received.append(args), real(*args))[1]
    keys, values = rng.standard_normal((50, DIM), dtype=np.float32), rng.standard_normal((50, VALUE_DIM), dtype=np.float32)
    ids = router.add("ns", keys, np.arange(50), values=values).ids
    assert np.shares_memory(received[0][4], keys) and np.shares_memory(received[0][6], values)
    keys_before = keys.copy()
    keys[:] = 0  # the store copied them
    np.testing.assert_array_equal(router.get("ns", ids).keys, keys_before)
    router.runtime.shutdown()


def test_a_deferred_part_is_not_changed_by_the_caller_reusing_its_array(rng):
    router = Router(LocalRuntime(1))
    adam = OptimizerConfig("adam", lr=0.1)
    for name in ("reused", "reference"):
        router.create_namespace(NamespaceConfig(name, dim=DIM, value_dim=VALUE_DIM, optimizer=adam))
        ids = router.add(name, np.eye(DIM, dtype=np.float32)[:6], np.arange(6)).ids
    grads = rng.standard_normal((6, VALUE_DIM), dtype=np.float32)
    reference = grads.copy()
    router.apply_gradients("reused", ids, grads, step_id="s1", defer_step=True)
    grads[:] = 1e3  # the caller fills its buffer with the next step's gradients before committing
    router.commit_step("reused", "s1")
    router.apply_gradients("reference", ids, reference)
    np.testing.assert_array_equal(router.get("reused", ids).values, router.get("reference", ids).values)
    router.runtime.shutdown()
