"""Capacity: each shard has a memory budget for its rows; an Add (or a restore) that would pass
it is refused with RESOURCE_EXHAUSTED naming the numbers before anything is allocated or logged,
on every shard of the Add (nothing of it is stored); DescribeNamespace shows used / budget."""

import numpy as np
import pytest
from monim.datastore import NamespaceConfig
from monim.protos.errors import ResourceExhausted
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime
from monim.workers.shard import Shard, default_memory_budget

DIM = 32


def add(router, rows, seed):
    rng = np.random.default_rng(seed)
    return router.add("ns", rng.standard_normal((rows, DIM)).astype(np.float32), np.arange(rows))


@pytest.mark.parametrize("data_dir", [False, True], ids=["in memory", "with a log"])
def test_an_add_past_the_budget_is_refused_on_every_shard_and_nothing_is_stored(tmp_path, data_dir):
    probe = Shard(0)
    probe.create_namespace(NamespaceConfig("ns", dim=DIM).to_dict())
    row_bytes = probe.stores["ns"].rows.row_bytes  # 1024 rows are allocated when a namespace is made
    budget = 3100 * row_bytes  # growing 1024 -> 2048 rows needs both at once (3072), 2048 -> 4096 does not fit
    router = Router(LocalRuntime(2, data_dir=str(tmp_path) if data_dir else None, memory_budget=budget))
    router.create_namespace(NamespaceConfig("ns", dim=DIM))
    add(router, 3000, seed=1)  # 1500 rows a shard: each grows to 2048
    described = router.describe_namespace("ns")
    assert [s["memory_budget"] for s in described["shards"]] == [budget, budget]
    assert all(s["memory_used"] == 2048 * row_bytes for s in described["shards"])
    with pytest.raises(ResourceExhausted) as refused:
        add(router, 2000, seed=2)  # 1000 more rows a shard: each would grow to 4096 rows
    message = refused.value.message
    assert "no room for 1000 more rows of namespace 'ns'" in message and "--shard-memory-budget" in message
    assert f"{4096 * row_bytes / 1024:.1f} KiB" in message
    assert router.describe_namespace("ns")["rows"] == 3000  # nothing of the refused Add, on either shard
    add(router, 500, seed=3)  # what fits still goes in
    assert router.describe_namespace("ns")["rows"] == 3500
    if data_dir:
        router.runtime.shutdown()
        again = Router(LocalRuntime(2, data_dir=str(tmp_path), memory_budget=budget))
        assert again.describe_namespace("ns")["rows"] == 3500  # the refused Add never reached the log
        again.runtime.shutdown()


def test_the_default_budget_is_most_of_the_host_memory_shared_by_the_shards():
    total = default_memory_budget("cpu", 1)
    assert 0 < default_memory_budget("cpu", 4) < total
    assert Shard(0).memory_budget == total


def test_a_shard_without_room_keeps_the_others_from_taking_their_part():
    router = Router(LocalRuntime(2))
    router.create_namespace(NamespaceConfig("ns", dim=DIM))
    add(router, 1000, seed=4)
    small = router.runtime.shards[1]
    small.memory_budget = small._memory_used()  # a shard on a smaller device: no room to grow
    with pytest.raises(ResourceExhausted, match="shard 1 has no room for 1000 more rows"):
        add(router, 2000, seed=5)
    assert [len(shard.stores["ns"]) for shard in router.runtime.shards] == [500, 500]


def test_the_first_add_to_an_empty_namespace_is_checked_too():
    """The check once read `store and check_room(...)`: an empty store is falsy (len 0), so the first
    Add of a namespace was never checked."""
    probe = Shard(0)
    probe.create_namespace(NamespaceConfig("ns", dim=DIM).to_dict())
    row_bytes = probe.stores["ns"].rows.row_bytes
    router = Router(LocalRuntime(1, memory_budget=2000 * row_bytes))
    router.create_namespace(NamespaceConfig("ns", dim=DIM))
    with pytest.raises(ResourceExhausted, match="no room for 5000 more rows"):
        add(router, 5000, seed=5)
    assert router.describe_namespace("ns")["rows"] == 0


def test_rows_kept_for_steps_count_as_used_and_make_room_for_an_add():
    """A lone shard keeps the rows (and alpha, distances) of recent training forwards on its device
    (NeighborStore.kept_rows): they count in memory_used, and an Add that needs their room drops them
    (a cache: the step's backward then looks its ids up, and steps what a twin that kept them steps)."""
    from monim.protos.config import OptimizerConfig

    def deployment():
        router = Router(LocalRuntime(1))
        router.create_namespace(NamespaceConfig("ns", dim=DIM, value_dim=4, optimizer=OptimizerConfig("sgd", lr=0.5)))
        rng = np.random.default_rng(5)
        router.add("ns", rng.standard_normal((1000, DIM)).astype(np.float32), np.arange(1000),
                   values=rng.standard_normal((1000, 4)).astype(np.float32))
        queries = rng.standard_normal((64, DIM)).astype(np.float32)
        return router, router.retrieve("ns", queries, 16, 1.0, keep_state=True)

    router, forward = deployment()
    twin, twin_forward = deployment()
    shard, store = router.runtime.shards[0], router.runtime.shards[0].stores["ns"]
    kept = store.kept_rows.bytes
    assert kept >= 64 * 16 * 8  # the answer's rows (int64), with alpha and distances where the forward ran there
    assert router.describe_namespace("ns")["shards"][0]["memory_used"] == store.nbytes + kept
    shard.memory_budget = store.nbytes + store.growth_bytes(100) + kept // 2  # room for 100 rows once they go
    router.add("ns", np.random.default_rng(6).standard_normal((100, DIM)).astype(np.float32), np.arange(100))
    assert store.kept_rows.bytes == 0 and router.describe_namespace("ns")["rows"] == 1100
    grad = np.random.default_rng(7).standard_normal((64, 4)).astype(np.float32)
    found = router.retrieve_backward("ns", None, None, None, None, grad, 1.0, handle=forward.handle)
    expected = twin.retrieve_backward("ns", None, None, None, None, grad, 1.0, handle=twin_forward.handle)
    np.testing.assert_array_equal(found[0], expected[0])
    np.testing.assert_array_equal(router.get("ns", np.arange(1000)).values, twin.get("ns", np.arange(1000)).values)


def test_an_add_refused_anyway_leaves_the_kept_rows():
    router = Router(LocalRuntime(1))
    router.create_namespace(NamespaceConfig("ns", dim=DIM, value_dim=4))
    rng = np.random.default_rng(5)
    router.add("ns", rng.standard_normal((1000, DIM)).astype(np.float32), np.arange(1000),
               values=rng.standard_normal((1000, 4)).astype(np.float32))
    router.retrieve("ns", rng.standard_normal((64, DIM)).astype(np.float32), 16, 1.0, keep_state=True)
    shard, store = router.runtime.shards[0], router.runtime.shards[0].stores["ns"]
    kept = store.kept_rows.bytes
    shard.memory_budget = store.nbytes + kept + store.growth_bytes(100) - 1  # short of room even without them
    with pytest.raises(ResourceExhausted):
        router.add("ns", rng.standard_normal((10_000, DIM)).astype(np.float32), np.arange(10_000))
    assert store.kept_rows.bytes == kept
