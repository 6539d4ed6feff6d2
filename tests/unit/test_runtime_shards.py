"""A runtime's shard handles when several calls learn of a grow at once (CI 2026-12-05: a search during
a 2 -> 4 reshard answered some rows twice). Each of a front end's or a read endpoint's concurrent calls
that finds the placement naming more shards than it has handles adds the missing ones; without one
lock over the check and the append, two such calls appended the same shard's handle twice, and shard
index 3 called shard 2's actor: its rows came back twice in every search."""

from __future__ import annotations

import threading
import time

from monim.workers import runtime as runtime_module
from monim.workers.runtime import LocalRuntime, RayRuntime, ShardSideRuntime

SLOW_S = 0.05  # a handle takes this long to make: the calls overlap


class _Handle:
    def __init__(self, name: str):
        self.name = name


class _SlowRay:
    """What ShardSideRuntime asks of ray: named actors, found slowly (a round trip to Ray's GCS)."""

    def get_actor(self, name: str):
        time.sleep(SLOW_S)
        return _Handle(name)


def _at_once(calls: int, target) -> None:
    start = threading.Barrier(calls)

    def run():
        start.wait()
        target()

    threads = [threading.Thread(target=run) for _ in range(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_concurrent_grows_of_a_read_endpoints_runtime_hold_each_shard_once():
    local = type("LocalShard", (), {"shard_index": 0})()
    runtime = ShardSideRuntime(_SlowRay(), "d", local, restarts=False)
    runtime.ensure_shards(2)
    _at_once(4, lambda: runtime.ensure_shards(4))
    assert [handle.name for handle in runtime.shards] == [f"d-shard-{i}" for i in range(4)]
    assert runtime.num_shards == 4


def test_concurrent_grows_of_a_front_ends_runtime_hold_each_shard_once(monkeypatch):
    runtime = object.__new__(RayRuntime)  # its list of handles only: no Ray here
    runtime.deployment, runtime.shards, runtime.num_shards = "d", [_Handle("d-shard-0"), _Handle("d-shard-1")], 2
    runtime.groups = type("Groups", (), {"scheduling": lambda self, missing: {}})()
    runtime._shards_lock = threading.RLock()

    def shard_actor(index, count, scheduling, placement=None):
        time.sleep(SLOW_S)
        return _Handle(f"d-shard-{index}")

    monkeypatch.setattr(runtime, "_shard_actor", shard_actor, raising=False)
    monkeypatch.setattr(runtime, "_actor_exists", lambda name: True, raising=False)
    monkeypatch.setattr(runtime, "call_shards", lambda calls, timeout_s=None: [None] * len(calls), raising=False)
    _at_once(4, lambda: runtime.ensure_shards(4))
    assert [handle.name for handle in runtime.shards] == [f"d-shard-{i}" for i in range(4)]
    assert runtime.num_shards == 4


def test_concurrent_grows_of_an_in_process_runtime_make_each_shard_once(monkeypatch):
    made = []

    class SlowShard(runtime_module.Shard):
        def __init__(self, index, *args, **kwargs):
            time.sleep(SLOW_S)
            made.append(index)
            super().__init__(index, *args, **kwargs)

    runtime = LocalRuntime(2)
    monkeypatch.setattr(runtime_module, "Shard", SlowShard)
    _at_once(4, lambda: runtime.ensure_shards(4))
    assert [shard.shard_index for shard in runtime.shards] == [0, 1, 2, 3] and sorted(made) == [2, 3]
    assert runtime.num_shards == 4
    runtime.shutdown()
