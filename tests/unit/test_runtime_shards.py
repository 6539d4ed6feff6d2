"""A runtime's shard handles when several calls learn of a grow at once (CI 2026-12-05: a search during
a 2 -> 4 reshard answered some rows twice). Each of a front end's or a read endpoint's concurrent calls
that finds the placement naming more shards than it has handles adds the missing ones; without one
lock over the check and the append, two such calls appended the same shard's handle twice, and shard
index 3 called shard 2's actor: its rows came back twice in every search."""

from __future__ import annotations

import threading
import time

import pytest
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


# ----- a shrink's retire while calls are in flight (an audit of the router's shared state, 2026-12-05) -----

def _searcher_paused_at_submit(router, shard_to_pause: int):
    """Runs a search on a thread whose submit to shard_to_pause waits until released (as a slow ray.put
    or a thread switch would hold it): (thread, paused, release, outcome)."""
    import numpy as np

    runtime = router.runtime
    paused, release, outcome, searcher = threading.Event(), threading.Event(), {}, {}
    real_submit = runtime._pool.submit

    def submit(fn, shard, *args, **kwargs):
        if threading.get_ident() == searcher.get("id") and shard == shard_to_pause and not paused.is_set():
            paused.set()
            release.wait(10)
        return real_submit(fn, shard, *args, **kwargs)

    runtime._pool.submit = submit

    def search():
        searcher["id"] = threading.get_ident()
        try:
            outcome["ids"] = router.search("ns", np.zeros((1, 8), np.float32), 5).ids
        except Exception as error:  # noqa: BLE001 - the test reports it
            outcome["error"] = error

    thread = threading.Thread(target=search)
    thread.start()
    return thread, paused, release, outcome


def test_a_search_whose_shards_a_shrink_retires_midway_is_retried_not_an_internal_error():
    """A search routed over 4 shards was past the check of the shard list when the reshard driver
    retired shards 2 and 3; indexing the shortened list raised IndexError (INTERNAL to the client)."""
    import numpy as np
    from monim.datastore import NamespaceConfig
    from monim.workers.reshard import reshard
    from monim.workers.router import Router

    router = Router(LocalRuntime(4))
    router.create_namespace(NamespaceConfig("ns", dim=8))
    keys = np.random.default_rng(0).standard_normal((200, 8)).astype(np.float32)
    ids = router.add("ns", keys, np.arange(200)).ids
    expected = ids[np.argsort((keys ** 2).sum(1), kind="stable")[:5]]
    thread, paused, release, outcome = _searcher_paused_at_submit(router, shard_to_pause=1)
    assert paused.wait(10)
    assert reshard(router, 2).done and len(router.runtime.shards) == 2
    release.set()
    thread.join(10)
    assert "error" not in outcome, repr(outcome.get("error"))
    np.testing.assert_array_equal(outcome["ids"][0], expected)


def test_a_placement_read_before_a_shrink_finished_neither_comes_back_nor_restarts_retired_shards():
    """A request thread compared the registry's placement with the router's (PlacementChanged), and the
    driver finished a 4 -> 2 shrink and retired shards 2 and 3 before the thread stored what it had read:
    the router went back to the older placement and started shards 2 and 3 again, which nothing ever
    retired."""
    import numpy as np
    from monim.datastore import NamespaceConfig
    from monim.workers.reshard import Resharder
    from monim.workers.router import Router

    compared, release, late = threading.Event(), threading.Event(), {}

    class PausingRouter(Router):
        """The late reader's read of the router's placement (to compare it) stalls, as a thread switch can."""

        @property
        def placement(self):
            value = self.__dict__["_placement"]
            if threading.get_ident() == late.get("id") and not compared.is_set():
                compared.set()
                release.wait(10)
            return value

        @placement.setter
        def placement(self, value):
            self.__dict__["_placement"] = value

    router = PausingRouter(LocalRuntime(4))
    router.create_namespace(NamespaceConfig("ns", dim=8))
    router.add("ns", np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32), np.arange(100))
    steps = Resharder(router).run(2, batch_rows=50)
    for progress in steps:
        if progress.namespaces_done == progress.namespaces:
            break  # every batch moved: the next step finishes and retires

    def refresh():
        late["id"] = threading.get_ident()
        router.refresh_placement()

    reader = threading.Thread(target=refresh)
    reader.start()
    assert compared.wait(10)
    driver = threading.Thread(target=lambda: next(steps))
    driver.start()
    driver.join(1)  # finished, or waiting for the reader to let go of the placement
    release.set()
    reader.join(10)
    driver.join(10)
    registry = router.runtime.call_registry("get_placement")
    assert registry["move"] is None and router.placement.version == registry["version"]
    assert len(router.runtime.shards) == 2 and router.runtime.num_shards == 2


def test_a_call_that_meets_a_grow_replacing_the_thread_pool_is_answered():
    """In-process: a grow shut the shards' thread pool down and made a new one while a call was about
    to submit to the old one (RuntimeError: cannot schedule new futures after shutdown)."""
    runtime = LocalRuntime(2)
    real = runtime.shards[1]

    class SlowLookup:  # the call's getattr on the shard is slow: the grow happens meanwhile
        def __getattr__(self, name):
            time.sleep(0.2)
            return getattr(real, name)

    runtime.shards[1] = SlowLookup()
    outcome = {}

    def call():
        try:
            outcome["answers"] = runtime.call_shards([(0, "ping", ()), (1, "ping", ())])
        except Exception as error:  # noqa: BLE001 - the test reports it
            outcome["error"] = error

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(0.05)
    runtime.ensure_shards(3)
    thread.join(10)
    assert "error" not in outcome, repr(outcome.get("error"))
    assert len(outcome["answers"]) == 2


class _RestartingShards(RayRuntime):
    """RayRuntime's retry of dead shards without Ray: shard 1's actor is dead for the first `dead_for`
    sends (restarting, or retired for good), and every send is recorded."""

    def __init__(self, dead_for: int, retired: bool):
        self.restarts, self.sent, self.dead_for, self.retired = True, [], dead_for, retired

    def _call_shards_once(self, calls, timeout_s, partial=False):
        self.sent.append([shard for shard, _, _ in calls])
        dead = self.retired or len(self.sent) <= self.dead_for
        return [runtime_module.ShardUnavailable(shard, "RayActorError") if shard == 1 and dead else f"{method}@{shard}"
                for shard, method, _ in calls]

    def _rebound(self, shard):
        return False

    def _retired(self, shard):
        return self.retired


def test_only_the_calls_a_dead_shard_missed_are_sent_again(monkeypatch):
    """A round with a restarting shard sends that shard's call again until it answers, and not the
    others: a shard that applied its share of a write answers it once (sent again with a new share,
    it would answer only that share's rows: the reliability run's Delete answering 1 for 8)."""
    monkeypatch.setattr(runtime_module, "RESTART_POLL_S", 0.01)
    runtime = _RestartingShards(dead_for=3, retired=False)
    assert runtime.call_shards([(0, "delete", ()), (1, "delete", ()), (2, "delete", ())], 5) == \
        ["delete@0", "delete@1", "delete@2"]
    assert runtime.sent == [[0, 1, 2], [1], [1], [1]]


def test_a_retired_shards_call_is_its_outcome_with_each_and_the_rounds_error_without(monkeypatch):
    monkeypatch.setattr(runtime_module, "RESTART_POLL_S", 0.01)
    runtime = _RestartingShards(dead_for=0, retired=True)
    outcomes = runtime.call_shards([(0, "delete", ()), (1, "delete", ())], 5, each=True)
    assert outcomes[0] == "delete@0" and isinstance(outcomes[1], runtime_module.ShardUnavailable)
    assert runtime.sent == [[0, 1]]
    with pytest.raises(runtime_module.ShardUnavailable, match="shard 1"):
        runtime.call_shards([(0, "search", ()), (1, "search", ())], 5)
