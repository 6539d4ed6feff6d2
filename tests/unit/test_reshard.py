"""Online resharding with in-process shards (workers/reshard.py): rows, ids and every column survive
2 -> 4 -> 3 -> 1 -> 2; reads stay exact and writes land once while it runs; a driver that dies at
any step (the runtime dropped, a new one on the same data dir) loses nothing and the same reshard
resumes it; bad requests change nothing."""

from __future__ import annotations

import concurrent.futures
import hashlib
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from monim.datastore import NamespaceConfig
from monim.protos.errors import Aborted, FailedPrecondition, IdsNotFound, InvalidArgument
from monim.workers import registry as registry_module
from monim.workers.placement import PlacementChanged
from monim.workers.reshard import Resharder, reshard
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime

DIM, VALUE_DIM, K = 8, 4, 10


def deployment(data_dir, shards=2):
    return Router(LocalRuntime(shards, data_dir=None if data_dir is None else str(data_dir), fsync="always",
                               snapshot_every=0))


def crash(router) -> None:
    """What a killed process leaves: its files as written (every acknowledged write is fsynced), its
    locks released; nothing flushed, no snapshot finished, no driver step run."""
    runtime = router.runtime
    runtime._pool.shutdown(wait=False)
    for shard in runtime.shards:
        if shard is not None and shard.wal is not None:
            shard.wal.close()
    runtime.registry.close()


def fill(router, rows=300, seed=0):
    """Two namespaces: 'ns' (adam values, sources, merged weights, stepped rows, deleted rows) and 'plain'."""
    rng = np.random.default_rng(seed)
    router.create_namespace(NamespaceConfig("ns", dim=DIM, value_dim=VALUE_DIM, optimizer={"name": "adam", "lr": 0.01}))
    router.create_namespace(NamespaceConfig("plain", dim=DIM))
    keys = rng.standard_normal((rows, DIM)).astype(np.float32)
    router.add("ns", keys, rng.integers(0, 9, rows), values=rng.standard_normal((rows, VALUE_DIM)).astype(np.float32),
               weights=rng.uniform(1, 2, rows).astype(np.float32), source="day-0")
    router.add("ns", keys[:5] + 1e-4, np.full(5, 3), merge_eps=0.1)
    found = router.retrieve("ns", rng.standard_normal((4, DIM)).astype(np.float32), 6, 0.7)
    router.retrieve_backward("ns", found.queries, found.ids, found.alpha, found.distances,
                             rng.standard_normal((4, VALUE_DIM)).astype(np.float32), 0.7)
    router.delete("ns", ids=np.arange(0, rows, 17))
    router.add("plain", rng.standard_normal((rows // 2, DIM)).astype(np.float32), np.arange(rows // 2))


def state(router) -> dict:
    """Everything a caller can read: per namespace, every row with every column, and searches."""
    queries = np.random.default_rng(9).standard_normal((6, DIM)).astype(np.float32)
    out = {}
    for config in router.list_namespaces():
        described = router.describe_namespace(config.name)
        found = router.search(config.name, queries, K, return_weights=True)
        present = np.sort(all_ids(router, config.name))
        rows = router.get(config.name, present, return_optimizer_state=bool(config.value_dim))
        out[config.name] = {
            "rows": described["rows"], "ids": present.tolist(),
            "keys": rows.keys.tolist(), "tokens": rows.tokens.tolist(), "weights": rows.weights.tolist(),
            "sources": rows.sources, "values": None if rows.values is None else rows.values.tolist(),
            "state": {n: a.tolist() for n, a in (rows.optimizer_state or {}).items()},
            "search": (found.ids.tolist(), found.distances.tolist(), found.weights.tolist())}
    return out


def all_ids(router, namespace) -> np.ndarray:
    """Every id stored, over the shards, checking that no id is held twice (but for the copies of a
    batch being moved, which the new owner holds hidden until the batch flips)."""
    held = []
    for shard in router.runtime.shards[: router.num_shards]:
        if namespace in shard.stores:
            ids = shard.stores[namespace].rows.ids[: len(shard.stores[namespace])].numpy()
            hidden = shard._incoming(namespace)
            held.append(ids if hidden is None else ids[~np.isin(ids, hidden)])
    ids = np.concatenate(held) if held else np.empty(0, np.int64)
    assert np.unique(ids).size == ids.size, "an id is held by two shards"
    return ids


def brute_force(keys: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int):
    distances = ((queries[:, None, :].astype(np.float64) - keys[None].astype(np.float64)) ** 2).sum(-1)
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return ids[order], np.take_along_axis(distances, order, axis=1)


@pytest.mark.parametrize("with_data_dir", [True, False], ids=["data dir", "in memory"])
def test_grow_and_shrink_keep_every_row_and_column(tmp_path, with_data_dir):
    router = deployment(tmp_path if with_data_dir else None)
    fill(router)
    before = state(router)
    next_id = router.describe_namespace("ns")["next_id"]
    for shards in (4, 3, 1, 2):
        last = reshard(router, shards, batch_rows=64)
        assert last.done and (last.target, router.num_shards, router.runtime.num_shards) == (shards, shards, shards)
        assert state(router) == before
        for name in before:
            counts = [len(shard.stores[name]) for shard in router.runtime.shards]
            assert sum(counts) == before[name]["rows"] and max(counts) - min(counts) <= len(before[name]["ids"]) // 4
            for index, shard in enumerate(router.runtime.shards):  # every row on its owner, id % shards
                held = shard.stores[name].rows.ids[: len(shard.stores[name])].numpy()
                assert (held % shards == index).all()
    # ids go on after the moves, never reused; deletes and steps reach the new owners
    new = router.add("ns", np.ones((3, DIM), np.float32), np.arange(3)).ids
    assert new.min() == next_id
    assert router.delete("ns", ids=np.array(before["ns"]["ids"][:10])) == 10
    assert router.apply_gradients("ns", new, np.ones((3, VALUE_DIM), np.float32)) == 3
    if with_data_dir:
        assert sorted(p.name for p in tmp_path.glob("shard-*")) == ["shard-0", "shard-1"]
        expected = state(router)
        router.runtime.shutdown()
        assert state(deployment(tmp_path, shards=5)) == expected  # the data dir keeps its 2 shards


def test_reads_stay_exact_and_writes_land_once_during_a_reshard(tmp_path):
    """One thread adds, one searches, one deletes and steps rows, while 2 -> 4 -> 3 runs in small batches:
    no call fails; every search answer is a brute-force answer over the rows acknowledged before it
    started (plus, where nearer, rows whose Add was in flight); at the end every acknowledged row is
    there with its steps, and no deleted one."""
    router = deployment(tmp_path)
    router.create_namespace(NamespaceConfig("ns", dim=DIM, value_dim=VALUE_DIM))
    rng = np.random.default_rng(1)
    acked_keys = [rng.standard_normal((200, DIM)).astype(np.float32)]
    acked_ids = [router.add("ns", acked_keys[0], np.arange(200)).ids]
    lock, stop, errors = threading.Lock(), threading.Event(), []
    in_flight: dict[int, np.ndarray] = {}
    deleted, deleting, stepped = set(), set(), {}

    def adder():
        local = np.random.default_rng(2)
        n = 0
        while not stop.is_set():
            keys = local.standard_normal((7, DIM)).astype(np.float32)
            with lock:
                in_flight[n] = keys
            ids = router.add("ns", keys, np.arange(7)).ids
            with lock:
                acked_keys.append(keys)
                acked_ids.append(ids)
                del in_flight[n]
            n += 1

    def searcher():
        local = np.random.default_rng(3)
        while not stop.is_set():
            with lock:
                keys, ids = np.concatenate(acked_keys), np.concatenate(acked_ids)
                gone_before = set(deleted)
            queries = local.standard_normal((3, DIM)).astype(np.float32)
            found = router.search("ns", queries, K)
            with lock:
                gone = set(deleted) | set(deleting)  # deletes acknowledged, or in flight, by the end
                known = set(np.concatenate(acked_ids).tolist())
                adding = bool(in_flight)
            check_answer(found, queries, keys, ids, gone_before, gone, known, adding)

    def check_answer(found, queries, keys, ids, gone_before, gone, known, adding):
        order = np.argsort(ids)
        for row in range(queries.shape[0]):
            got = found.ids[row]
            assert (got >= 0).all() and np.unique(got).size == K
            assert not set(got.tolist()) & gone_before, "a row deleted before the search started"
            old = np.isin(got, ids)
            positions = order[np.searchsorted(ids, got[old], sorter=order)]
            assert np.allclose(found.distances[row][old], ((keys[positions] - queries[row]) ** 2).sum(-1), atol=1e-4)
            # every row acknowledged before the search, and not being deleted, that is nearer than the
            # answer's k-th is in it: the answer is the brute force over them, plus nearer in-flight rows
            keep = ~np.isin(ids, list(gone))
            distances = ((keys[keep] - queries[row]) ** 2).sum(-1)
            must = ids[keep][distances < found.distances[row][-1] - 1e-4]
            assert np.isin(must, got).all(), f"missed rows {set(must.tolist()) - set(got.tolist())}"
            # an id beyond those acknowledged by the end belongs to an Add still in flight
            assert adding or not set(got[~old].tolist()) - known, "an id that was never added"

    def writer():
        local = np.random.default_rng(4)
        while not stop.is_set():
            with lock:
                ids = np.concatenate(acked_ids)
            ids = np.array([i for i in local.choice(ids, 6, replace=False) if i not in deleted and i not in stepped])
            if ids.size < 2:
                continue
            router.apply_gradients("ns", ids[1:], np.ones((ids.size - 1, VALUE_DIM), np.float32))
            with lock:
                for i in ids[1:]:
                    stepped[int(i)] = 1
                deleting.add(int(ids[0]))
            router.delete("ns", ids=ids[:1])
            with lock:
                deleted.add(int(ids[0]))
                deleting.discard(int(ids[0]))

    def run(target):
        try:
            target()
        except Exception as error:  # noqa: BLE001 - reported below
            import traceback

            errors.append("".join(traceback.format_exception(error)))
            stop.set()

    threads = [threading.Thread(target=run, args=(t,)) for t in (adder, searcher, writer)]
    for thread in threads:
        thread.start()
    try:
        for shards in (4, 3):
            reshard(router, shards, batch_rows=32)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not errors, "\n".join(errors)
    keys, ids = np.concatenate(acked_keys), np.concatenate(acked_ids)
    alive = ~np.isin(ids, list(deleted))
    assert np.sort(all_ids(router, "ns")).tolist() == np.sort(ids[alive]).tolist()
    rows = router.get("ns", ids[alive], return_optimizer_state=True)
    assert np.array_equal(rows.keys, keys[alive])
    steps = dict(zip(ids[alive].tolist(), rows.optimizer_state["step"].tolist()))
    assert all(steps[i] == stepped.get(i, 0) for i in steps), "a step lost or applied twice"
    queries = np.random.default_rng(5).standard_normal((8, DIM)).astype(np.float32)
    assert np.array_equal(router.search("ns", queries, K).ids, brute_force(keys[alive], ids[alive], queries, K)[0])


def _stop_at(router, step: int, crash_inside: bool, monkeypatch):
    """Runs a 2 -> 3 reshard and kills it at its step-th push to the shards: before the push (the
    registry has the step, no shard has) or in the middle of it (one shard has it)."""
    pushes = {"n": 0}
    original = Resharder._push

    class Killed(Exception):
        pass

    def push(self, placement):
        pushes["n"] += 1
        if pushes["n"] == step:
            if crash_inside:
                self.router.runtime.shards[0].set_placement(placement.to_dict())
            raise Killed
        return original(self, placement)

    monkeypatch.setattr(Resharder, "_push", push)
    with pytest.raises(Killed):
        reshard(router, 3, batch_rows=40)
    monkeypatch.setattr(Resharder, "_push", original)


@pytest.mark.parametrize("crash_inside", [False, True], ids=["before a push", "in a push"])
@pytest.mark.parametrize("step", [1, 2, 3, 4, 7, 12, 25])
def test_a_reshard_killed_at_any_step_loses_nothing_and_resumes(tmp_path, monkeypatch, step, crash_inside):
    monkeypatch.setattr(registry_module, "RESHARD_LEASE_S", 0.0)  # the killed driver's lease is over at once
    router = deployment(tmp_path)
    fill(router)
    before = state(router)
    _stop_at(router, step, crash_inside, monkeypatch)
    crash(router)
    router = deployment(tmp_path)
    assert state(router) == before  # reads are exact mid-move, on a deployment that restarted
    with pytest.raises(FailedPrecondition, match="from 2 to 3 shards is in progress"):
        next(Resharder(router).run(4))
    last = reshard(router, 3, batch_rows=40)
    assert last.done and router.num_shards == 3
    assert state(router) == before
    router.runtime.shutdown()
    assert state(deployment(tmp_path)) == before


def test_a_copy_killed_half_way_resumes_without_duplicates(tmp_path, monkeypatch):
    """The new owner logged part of a batch, then the driver died: the resumed copy skips what it has."""
    monkeypatch.setattr(registry_module, "RESHARD_LEASE_S", 0.0)
    router = deployment(tmp_path)
    fill(router)
    before = state(router)
    original = Resharder._copy

    def half_copy(self, config, first, end, placement):
        exports = self.router._call([(s, "export_batch", (config.name, config.generation, first, end))
                                     for s in range(placement.actors)])
        target, payload, applied = next(batch for batches in exports for batch in batches)
        self.router._call([(target, "receive_rows", (config.name, config.generation, "half", payload, applied))])
        raise KeyboardInterrupt

    monkeypatch.setattr(Resharder, "_copy", half_copy)
    with pytest.raises(KeyboardInterrupt):
        reshard(router, 4, batch_rows=100)
    monkeypatch.setattr(Resharder, "_copy", original)
    crash(router)
    router = deployment(tmp_path)
    assert state(router) == before
    reshard(router, 4, batch_rows=100)
    assert state(router) == before


def test_an_interrupted_reshard_serves_writes_and_resumes(tmp_path):
    """Closing the driver's iterator (Ctrl-C on monim reshard) stops at a step; the deployment serves
    reads and writes meanwhile, on its mixed placement; the same call resumes it."""
    router = deployment(tmp_path)
    fill(router)
    steps = Resharder(router).run(3, 50)
    for _ in range(4):
        next(steps)
    steps.close()
    assert router.refresh_placement().move is not None
    new = router.add("ns", np.linspace(0, 1, 4 * DIM, dtype=np.float32).reshape(4, DIM), np.arange(4)).ids
    router.delete("ns", source="day-0")
    expected = state(router)
    assert set(new.tolist()) <= set(expected["ns"]["ids"]) and "day-0" not in expected["ns"]["sources"]
    reshard(router, 3, batch_rows=50)
    assert state(router) == expected


def test_bad_reshards_are_refused_and_change_nothing(tmp_path):
    router = deployment(tmp_path)
    fill(router)
    before = state(router), router.refresh_placement()
    for shards, error in ((0, InvalidArgument), (-1, InvalidArgument), (True, InvalidArgument),
                          (5000, InvalidArgument)):
        with pytest.raises(error, match="shard"):
            router.reshard(shards)
    with pytest.raises(InvalidArgument, match="batch_rows"):
        router.reshard(3, -1)
    assert (state(router), router.refresh_placement()) == before
    # one that runs: a second driver is ABORTED, one to another count FAILED_PRECONDITION
    steps = Resharder(router).run(3, 50)
    next(steps)
    running = router.refresh_placement()
    with pytest.raises(Aborted, match="already running"):
        next(Resharder(router).run(3))
    with pytest.raises(FailedPrecondition, match="from 2 to 3 shards is in progress"):
        next(Resharder(router).run(4))
    assert router.refresh_placement() == running
    for _ in steps:
        pass
    assert state(router) == before[0] and router.num_shards == 3


def test_a_reshard_to_the_same_count_moves_nothing(tmp_path):
    router = deployment(tmp_path)
    fill(router)
    before = state(router), router.refresh_placement()
    last = reshard(router, 2)
    assert last.done and last.rows_moved == 0
    assert (state(router), router.refresh_placement()) == before


@pytest.mark.parametrize("target", [3, 1])
def test_writes_retried_with_their_request_ids_after_their_rows_moved_land_once(tmp_path, target):
    """A write whose answer was lost, retried with its request id after a reshard moved its rows to
    another shard: the new owner must not apply it again (an Add would store its rows twice, a step
    would step them twice)."""
    router = deployment(tmp_path)
    rng = np.random.default_rng(4)
    router.create_namespace(NamespaceConfig("ns", dim=DIM, value_dim=VALUE_DIM, optimizer={"name": "adam", "lr": 0.01}))
    keys = rng.standard_normal((60, DIM)).astype(np.float32)
    values = rng.standard_normal((60, VALUE_DIM)).astype(np.float32)
    ids = router.add("ns", keys, np.arange(60), values=values, request_id="add-1").ids
    grads = rng.standard_normal((60, VALUE_DIM)).astype(np.float32)
    stepped = router.apply_gradients("ns", ids, grads, request_id="step-1")
    before = state(router)
    reshard(router, target)
    assert state(router) == before
    again = router.add("ns", keys, np.arange(60), values=values, request_id="add-1").ids
    np.testing.assert_array_equal(again, ids)
    # Answered by the shards that stepped rows at first: those that hold them now answer 0 for the moved ones.
    assert router.apply_gradients("ns", ids, grads, request_id="step-1") <= stepped
    assert state(router) == before, "a retried write applied again on the shard its rows moved to"
    crash(router)  # what a new owner learnt of the old owners' writes is in its log
    router = deployment(tmp_path)
    router.add("ns", keys, np.arange(60), values=values, request_id="add-1")
    router.apply_gradients("ns", ids, grads, request_id="step-1")
    assert state(router) == before


class _OtherFrontEnd(LocalRuntime):
    """Another front end's runtime over the same in-process shards and registry (as a second `monim
    serve` finds a deployment's named shard actors): its own handles, its own router's placement."""

    def __init__(self, first: LocalRuntime):
        self.first, self.registry = first, first.registry
        self._shard_args, self.data_dir = first._shard_args, first.data_dir
        self.shards = list(first.shards)
        self.num_shards = len(self.shards)
        self._shards_lock = threading.RLock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="other-shard")

    def ensure_shards(self, count: int) -> None:
        self.first.ensure_shards(count)
        self.shards += self.first.shards[len(self.shards):count]
        self.num_shards = max(self.num_shards, count)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False)


@pytest.mark.parametrize("start,target", [(2, 4), (2, 3), (4, 3)])
def test_a_row_added_while_a_placement_is_pushed_is_found_by_another_front_end(tmp_path, monkeypatch, start, target):
    """Between every two steps of a reshard (a grow adds shards the other front end does not know yet),
    one front end adds a row (its router is the driver's) and then the other searches for it and gets
    it by id: the row acknowledged first is always found, where the reader's placement puts it. Before
    the fix a grow failed both: the new shards took the move's placement, and writes, while the old
    ones still answered another front end's reads at the old one; and an old shard still at its first
    placement took any id it was sent (2 -> 3: id 201 on shard 0, where the old placement's Get looks
    on shard 1)."""
    writer = deployment(tmp_path)
    writer.create_namespace(NamespaceConfig("ns", dim=DIM))
    rng = np.random.default_rng(3)
    writer.add("ns", rng.standard_normal((200, DIM)).astype(np.float32), np.arange(200))
    if start != 2:  # each front end knows all the shards already
        reshard(writer, start, batch_rows=64)
    reader = Router(_OtherFrontEnd(writer.runtime))
    reader.search("ns", np.zeros((1, DIM), np.float32), 1)
    missed, checked = [], []

    def add_then_read(where):
        key = rng.standard_normal((1, DIM)).astype(np.float32) * 100  # far from every other row
        added = writer.add("ns", key, np.arange(1)).ids
        found = reader.search("ns", key, 1).ids[0]
        checked.append(where)
        try:
            got = reader.get("ns", added).ids.tolist()
        except IdsNotFound:
            got = []
        if found[0] != added[0] or got != added.tolist():
            missed.append((where, int(added[0]), int(found[0]), got, writer.placement.version,
                           reader.placement.version))

    for name in ("_create_namespaces", "_push"):
        original = getattr(Resharder, name)

        def wrapped(self, *args, _original=original, _name=name):
            add_then_read(f"before {_name}")
            _original(self, *args)
            add_then_read(f"after {_name}")

        monkeypatch.setattr(Resharder, name, wrapped)
    assert reshard(writer, target, batch_rows=64).done
    assert len(checked) > 10 and not missed, missed
    reader.runtime.shutdown()


def test_a_share_of_a_write_refused_before_a_batch_moved_lands_on_the_shard_the_batch_went_to(tmp_path, monkeypatch):
    """An Add's share that a new shard refused (not placed yet) is sent again after a batch moved there
    from an old owner that had applied another share of the same Add. The new owner learns from the
    move that the Add was applied to the rows it received (a retry must not apply it to them again),
    not to rows it never held: the share sent again lands. (Before the fix the whole request id was
    taken as applied: the retried share was answered as done and its row was never stored.)"""
    router = deployment(tmp_path)
    rng = np.random.default_rng(5)
    router.create_namespace(NamespaceConfig("ns", dim=DIM))
    router.add("ns", rng.standard_normal((200, DIM)).astype(np.float32), np.arange(200))   # ids 0..199
    config = router.config("ns")
    request = router._step_key(config, "add-after-the-mark")
    shards = router.runtime.shards
    keys = rng.standard_normal((2, DIM)).astype(np.float32)
    merge = router._step_key(config, "merge-before-the-move")   # a write applied on shard 0 to row 2, which moves to shard 2
    shards[0].increment_weights("ns", config.generation, merge, np.array([2]), np.array([1.0], np.float32))
    original_copy, copies = Resharder._copy, []

    def copy_between_the_shares(self, config, first, end, placement):
        if not copies:  # ids 204 and 206 are past the move's mark: placed by the target count (4)
            shards[0].add("ns", config.generation, request, np.array([204]), keys[:1], np.arange(1), None, None, "")
        original_copy(self, config, first, end, placement)
        if not copies:  # the share refused by shard 2 before it was placed, sent again now
            shards[2].add("ns", config.generation, request, np.array([206]), keys[1:], np.arange(1), None, None, "")
        copies.append((first, end))

    monkeypatch.setattr(Resharder, "_copy", copy_between_the_shares)
    assert reshard(router, 4, batch_rows=64).done and copies
    assert router.get("ns", np.array([204, 206])).ids.tolist() == [204, 206]
    # and the retried Add, sent whole again, stores nothing twice: also after a snapshot of every shard
    # (what the moves taught them is in it) and a restart
    for restarted in (False, True):
        if restarted:
            for shard in shards:
                shard.snapshot()
            crash(router)
            router = deployment(tmp_path)
            shards = router.runtime.shards
        shards[0].add("ns", config.generation, request, np.array([204]), keys[:1], np.arange(1), None, None, "")
        shards[2].add("ns", config.generation, request, np.array([206]), keys[1:], np.arange(1), None, None, "")
        shards[2].increment_weights("ns", config.generation, merge, np.array([2]), np.array([1.0], np.float32))
        assert router.describe_namespace("ns")["rows"] == 202
        assert router.get("ns", np.array([2])).weights.tolist() == [2.0]


@pytest.mark.parametrize("restart", ["none", "log", "snapshot"])
def test_shares_of_one_write_sent_to_one_shard_one_after_another_all_land(tmp_path, restart):
    """After a reshard refused a write's shares, the router sends their rows again to their owners at
    the new placement: a shard may then get a second share of a request whose first share it applied
    (one round: shares of several old owners; or a later round). Each share's rows land, once; the
    whole write retried lands nothing twice; and so after a restart from the log or a snapshot. (Before
    the fix the shard took the request id as applied and answered the second share without storing it:
    acknowledged rows lost, found by tests/integration/test_reshard_service.py once Adds came from a
    shard's read endpoint, whose timing sends the shares apart.)"""
    router = deployment(tmp_path)
    rng = np.random.default_rng(6)
    router.create_namespace(NamespaceConfig("ns", dim=DIM))
    config = router.config("ns")
    shard = router.runtime.shards[0]
    request = router._step_key(config, "one-add")
    keys = rng.standard_normal((6, DIM)).astype(np.float32)
    ids = np.array([100, 102, 104, 106, 108, 110])  # all shard 0's (id % 2)
    shares = [[0], [1, 3], [2, 4, 5]]
    for share in shares:
        assert shard.add("ns", config.generation, request, ids[share], keys[share], np.arange(len(share)),
                         None, None, "") == len(share)
    merge = router._step_key(config, "one-merge")
    for share in ([0, 1], [2]):
        shard.increment_weights("ns", config.generation, merge, ids[share], np.ones(len(share), np.float32))
    if restart != "none":
        if restart == "snapshot":
            shard.snapshot()
        crash(router)
        router = deployment(tmp_path)
        shard = router.runtime.shards[0]
    for share in shares + [[0, 1, 2, 3, 4, 5]]:  # every share again, and the whole write: nothing twice
        shard.add("ns", config.generation, request, ids[share], keys[share], np.arange(len(share)), None, None, "")
    shard.increment_weights("ns", config.generation, merge, ids[:3], np.ones(3, np.float32))
    rows = router.get("ns", ids)
    np.testing.assert_array_equal(rows.keys, keys)
    assert router.describe_namespace("ns")["rows"] == 6
    assert rows.weights.tolist() == [2.0, 2.0, 2.0, 1.0, 1.0, 1.0]


def test_a_request_applied_in_shares_is_not_applied_again_to_rows_a_move_brought(tmp_path, monkeypatch):
    """Shard 2 (new in a grow) applies a share of an Add; then a batch the old owner had applied another
    share of the same Add to moves there. The whole Add retried stores nothing twice: the shard knows
    the moved rows' range as applied, beside its own share's ids."""
    router = deployment(tmp_path)
    rng = np.random.default_rng(8)
    router.create_namespace(NamespaceConfig("ns", dim=DIM))
    keys = rng.standard_normal((200, DIM)).astype(np.float32)
    router.add("ns", keys, np.arange(200), request_id="first")  # ids 0..199, on shards 0 and 1
    config = router.config("ns")
    request = router._step_key(config, "first")
    shards, original_copy, copies = router.runtime.shards, Resharder._copy, []
    late = rng.standard_normal((1, DIM)).astype(np.float32)

    def copy_after_a_share(self, config, first, end, placement):
        if not copies:  # a share of the same request, applied by the new shard before the batch comes
            assert shards[2].add("ns", config.generation, request, np.array([202]), late, np.arange(1), None,
                                 None, "") == 1
        original_copy(self, config, first, end, placement)
        copies.append((first, end))

    monkeypatch.setattr(Resharder, "_copy", copy_after_a_share)
    assert reshard(router, 4, batch_rows=64).done and copies
    assert router.describe_namespace("ns")["rows"] == 201
    moved = np.arange(2, 200, 4)  # id % 4 == 2: shard 2's now, moved from shard 0 with "first" applied
    for _ in range(2):
        shards[2].add("ns", config.generation, request, moved, keys[moved], np.arange(moved.size), None, None, "")
        shards[2].add("ns", config.generation, request, np.array([202]), late, np.arange(1), None, None, "")
        assert router.describe_namespace("ns")["rows"] == 201
    np.testing.assert_array_equal(router.get("ns", moved).keys, keys[moved])


@pytest.mark.parametrize("start,target", [(4, 3), (2, 3)])
def test_an_add_routed_with_the_placement_before_a_reshard_began_is_found_after_it(tmp_path, monkeypatch, start,
                                                                                     target):
    """Another front end (its router still at the placement before the move) adds a row between the
    registry's begin of a reshard (which reads the namespace's mark: its next id) and the push of the
    move's placement to the shards. The row's id is past the mark, so the move places it by the target
    count and never moves it; routed by the old count, its shard (still at the old placement) took it
    and kept it where no placement looks. The registry answers each Add's plan with its placement
    version, and a router behind it reads the placement first. After the reshard a Get and a search
    must find the row."""
    writer = deployment(tmp_path)
    writer.create_namespace(NamespaceConfig("ns", dim=DIM))
    rng = np.random.default_rng(9)
    writer.add("ns", rng.standard_normal((200, DIM)).astype(np.float32), np.arange(200))
    reshard(writer, start, batch_rows=64)
    other = Router(_OtherFrontEnd(writer.runtime))
    other.search("ns", np.zeros((1, DIM), np.float32), 1)  # its placement: start shards, no move
    keys = rng.standard_normal((3, DIM)).astype(np.float32) * 100  # far from every other row
    original, added = Resharder._create_namespaces, []

    def add_before_the_push(self, shards):
        if not added:  # the reshard has begun in the registry; no shard has its placement yet
            added.append(other.add("ns", keys, np.arange(3)).ids)
        original(self, shards)

    monkeypatch.setattr(Resharder, "_create_namespaces", add_before_the_push)
    assert reshard(writer, target, batch_rows=64).done
    assert (added[0] % start != added[0] % target).any()  # the old count routes one to a shard the new does not
    assert writer.search("ns", keys, 1).ids[:, 0].tolist() == added[0].tolist()
    assert writer.get("ns", added[0]).ids.tolist() == added[0].tolist()
    other.runtime.shutdown()


def test_the_ids_a_shard_keeps_of_each_request_are_bounded():
    """The oldest requests' ids go first past the bound of runs (a request then counts as applied whole)."""
    from monim.workers.shard import _id_runs, _RememberedIds

    kept = _RememberedIds(max_runs=10)
    for n in range(6):
        kept.remember((f"r{n}", "delete"), [_id_runs(np.arange(0, 40, 1 + n % 2) * 7 + n)])  # 1 run each
    random_ids = np.random.default_rng(0).choice(10_000, 8, replace=False)
    kept.remember(("random", "delete"), [_id_runs(random_ids)])
    assert kept.runs <= 10 and ("random", "delete") in kept and ("r0", "delete") not in kept
    assert kept.runs == sum(runs.shape[0] for shares in kept.values() for runs in shares)
    kept.remember(("random", "delete"), kept[("random", "delete")] + [_id_runs([1])])
    assert kept.runs == sum(runs.shape[0] for shares in kept.values() for runs in shares)


def test_a_request_given_another_share_is_the_newest_the_shard_keeps(monkeypatch):
    """A request that a later share updated goes last, not by when its first share came."""
    from monim.workers import shard as shard_module
    from monim.workers.shard import _id_runs, _RememberedIds

    monkeypatch.setattr(shard_module, "REMEMBERED_REQUESTS", 2)
    kept = _RememberedIds()
    kept.remember(("old", "add"), [_id_runs([1])])
    kept.remember(("new", "add"), [_id_runs([2])])
    kept.remember(("old", "add"), kept[("old", "add")] + [_id_runs([3])])  # another share of "old"
    kept.remember(("newest", "add"), [_id_runs([4])])
    assert list(kept) == [("old", "add"), ("newest", "add")]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=60), st.lists(st.integers(-5, 305), max_size=60))
def test_id_runs_hold_exactly_their_ids(held, asked):
    from monim.workers.shard import _id_runs, _in_runs

    runs = _id_runs(np.array(held, np.int64))
    np.testing.assert_array_equal(_in_runs(runs, np.array(asked, np.int64)), np.isin(asked, held))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=60), st.integers(-5, 305), st.integers(0, 320))
def test_the_ids_of_runs_in_a_range_are_exactly_their_ids_there(held, first, span):
    """What a move's marks of a delete carry: the ids of a set in one batch's range (runs may share an end)."""
    from monim.workers.shard import _id_runs, _ids_of

    held = np.unique(np.array(held, np.int64))
    runs = _id_runs(held)
    np.testing.assert_array_equal(_ids_of(runs, first, first + span), held[(held >= first) & (held < first + span)])
    np.testing.assert_array_equal(_ids_of(runs), held)


@pytest.mark.parametrize("start,target", [(2, 1), (3, 2)])
def test_a_grow_after_a_shrink_keeps_its_new_shards_when_the_router_reads_the_placement_before_it_begins(
        tmp_path, monkeypatch, start, target):
    """A grow starts its new shards (and creates every namespace on them) before the registry names them;
    a request of the same front end that reads the placement in that moment (a refresh after a refusal,
    an Add planned past the router's version) must not drop them. Seen in the reliability run's reshard
    fault: a shrink and then a grow back, driven through one front end, failed with 'shard 1 is
    unavailable: retired by a reshard'."""
    router = deployment(tmp_path, shards=start)
    router.create_namespace(NamespaceConfig("ns", dim=DIM))
    keys = np.random.default_rng(3).standard_normal((300, DIM)).astype(np.float32)
    ids = router.add("ns", keys, np.arange(300)).ids
    assert reshard(router, target, batch_rows=64).done
    original = Resharder._create_namespaces

    def placement_read_first(self, shards):  # another request's refresh, on the same router
        self.router.refresh_placement()
        original(self, shards)

    monkeypatch.setattr(Resharder, "_create_namespaces", placement_read_first)
    assert reshard(router, start, batch_rows=64).done
    assert router.describe_namespace("ns")["rows"] == 300
    assert [s["rows"] > 0 for s in router.describe_namespace("ns")["shards"]] == [True] * start
    np.testing.assert_array_equal(router.get("ns", ids).keys, keys)


def test_a_copy_that_arrives_after_its_batch_was_thawed_is_refused_and_changes_nothing(tmp_path, monkeypatch):
    """A batch's copy that reaches its new owner late (the driver's call timed out, the routers thawed
    the batch after the driver's lease ran out, writes to its rows went on at the old owner) would
    put a stale second copy of the rows beside the live ones: the new owner takes a copy only at the
    placement it was exported at (PlacementChanged otherwise), so nothing of it is stored."""
    router = deployment(tmp_path)
    fill(router)
    late, frozen = [], []

    def export_then_stop(self, config, first, end, placement):
        exports = self.router._call([(s, "export_batch", (config.name, config.generation, first, end))
                                     for s in range(placement.actors)])
        late.extend((config, target, payload, applied) for batches in exports for target, payload, applied in batches)
        frozen.append(placement)
        raise KeyboardInterrupt  # the driver's receive calls are still on their way

    monkeypatch.setattr(Resharder, "_copy", export_then_stop)
    with pytest.raises(KeyboardInterrupt):
        reshard(router, 3, batch_rows=40)
    monkeypatch.undo()
    assert late, "the batch moves rows"
    placement = frozen[0]
    monkeypatch.setattr(registry_module, "RESHARD_LEASE_S", 0.0)  # the driver's lease ran out
    router._catch_up(router.refresh_placement())  # a router that waited thaws the batch
    thawed = router.refresh_placement()
    assert thawed.version > placement.version and not thawed.any_frozen(placement.move.current)
    before = state(router)
    for config, target, payload, applied in late:
        with pytest.raises(PlacementChanged, match="placement"):
            router._call([(target, "receive_rows", (config.name, config.generation,
                                                    f"reshard:{placement.version}:late", payload, applied,
                                                    placement.version))])
    assert state(router) == before  # no row twice, nothing else changed
    reshard(router, 3, batch_rows=40)
    assert state(router) == before


def _tagged(router, rng, rows: int, source: str) -> np.ndarray:
    return router.add("ns", rng.standard_normal((rows, DIM)).astype(np.float32), np.arange(rows), source=source).ids


@pytest.mark.parametrize("applied_first_on", ["target", "source"])
def test_a_delete_by_source_retried_after_a_move_deletes_every_row_of_the_source(tmp_path, applied_first_on):
    """A delete by source whose round one shard applied and another refused (the reshard's placement
    reached them at different times: the reliability run of seed 53 lost 659 deletes this way) is sent
    again, whole, after the batch moved. The shard that had applied it must delete the rows of the
    source that the move brought it, and the shard that learnt of it from the move (the batch's marks)
    must still delete its own. Before the fix the first answered its first count and the second 0: the
    rows stayed, though the delete was acknowledged."""
    router = deployment(tmp_path)
    rng = np.random.default_rng(11)
    router.create_namespace(NamespaceConfig("ns", dim=DIM))
    tagged = _tagged(router, rng, 120, "day-0")
    kept = _tagged(router, rng, 40, "day-1")
    config = router.config("ns")
    request = router._step_key(config, "delete-day-0")
    shards = router.runtime.shards
    shard = shards[0] if applied_first_on == "target" else shards[1]  # a shrink to 1 moves shard 1's rows to 0
    first = shard.delete("ns", config.generation, request, None, "day-0")
    assert 0 < first < tagged.size
    assert reshard(router, 1, batch_rows=32).done
    # The retry answers every row of the source the request deleted, each once: shard 1's first count
    # came with the move's marks (it used to go with shard 1: the retry answered tagged.size - first).
    counted = tagged.size
    assert router.delete("ns", source="day-0", request_id="delete-day-0") == counted
    assert sorted(all_ids(router, "ns").tolist()) == sorted(kept.tolist())
    assert router.delete("ns", source="day-0", request_id="delete-day-0") == counted  # again: nothing more
    # the log replays the same: a restart keeps the rows deleted
    crash(router)
    router = deployment(tmp_path, shards=1)
    assert sorted(all_ids(router, "ns").tolist()) == sorted(kept.tolist())


def _resharded(router, tmp_path, target: int, restart: str):
    """The deployment resharded to target shards, then (restart "log" or "snapshot") crashed and started
    again from its logs, or from snapshots taken after the reshard; the router to use next."""
    assert reshard(router, target, batch_rows=32).done
    if restart == "none":
        return router
    if restart == "snapshot":
        for shard in router.runtime.shards[: router.num_shards]:
            shard.snapshot()
    crash(router)
    return deployment(tmp_path, shards=target)


@pytest.mark.parametrize("restart", ["none", "log", "snapshot"])
@pytest.mark.parametrize("target", [1, 3, 4])
def test_a_delete_by_source_retried_after_a_reshard_answers_every_row_it_deleted(tmp_path, target, restart):
    """A Delete by source whose answer was lost, retried with its request id after a reshard, answers the
    rows of the source it deleted, each once, wherever their ids belong now. Before, a shrink lost the
    count of the shard that went: 2 -> 1 answered shard 0's rows alone, 60 of 120 (docs/OPERATIONS.md
    said so); a grow counted right (each old owner its own count)."""
    router = deployment(tmp_path)
    rng = np.random.default_rng(13)
    router.create_namespace(NamespaceConfig("ns", dim=DIM))
    tagged = _tagged(router, rng, 120, "day-0")
    kept = _tagged(router, rng, 40, "day-1")
    assert router.delete("ns", source="day-0", request_id="delete-1") == tagged.size
    router = _resharded(router, tmp_path, target, restart)
    assert router.delete("ns", source="day-0", request_id="delete-1") == tagged.size
    assert sorted(all_ids(router, "ns").tolist()) == sorted(kept.tolist())
    assert router.delete("ns", source="day-0", request_id="delete-1") == tagged.size  # again: the same
    assert router.delete("ns", source="day-1", request_id="delete-2") == kept.size    # another request deletes


@pytest.mark.parametrize("restart", ["none", "log", "snapshot"])
@pytest.mark.parametrize("target", [1, 3, 4])
def test_a_delete_by_ids_retried_after_its_rows_moved_answers_every_row_it_deleted(tmp_path, target, restart):
    """A Delete by ids whose answer was lost (the reliability run of 5fd574c: its first attempt timed out
    while a shard was stopped) is retried with its request id after a reshard: it answers the rows it
    deleted, each once, whichever shards hold their ids now, and deletes nothing more. Before the fix a
    shrink lost the count of the shard that went (its rows were deleted, so not moved, and the move's
    marks named only rows it moved): 2 -> 1 answered shard 0's share alone (the run: 634 for 926);
    and an old owner answered its whole count for the ids it still owns, with the ids a grow moved
    counted again by nobody or twice."""
    router = deployment(tmp_path)
    rng = np.random.default_rng(12)
    router.create_namespace(NamespaceConfig("ns", dim=DIM))
    ids = router.add("ns", rng.standard_normal((240, DIM)).astype(np.float32), np.arange(240)).ids
    doomed = np.concatenate([ids[::3], [10_000, 10_001]])   # two ids never stored: not counted
    deleted = router.delete("ns", ids=doomed, request_id="delete-1")
    assert deleted == ids[::3].size
    left = sorted(all_ids(router, "ns").tolist())
    router = _resharded(router, tmp_path, target, restart)
    assert router.delete("ns", ids=doomed, request_id="delete-1") == deleted
    assert sorted(all_ids(router, "ns").tolist()) == left
    # a share of it alone (as the router sends one again after a reshard refused it) answers its own rows
    config = router.config("ns")
    digest = hashlib.blake2b(np.ascontiguousarray(doomed).tobytes(), digest_size=8).hexdigest()
    share = doomed[(router.placement.owners("ns", doomed) == 0) & (doomed < 10_000)][:5]
    assert router.runtime.shards[0].delete("ns", config.generation, router._step_key(config, "delete-1"), share,
                                           None, digest) == 5
    assert router.delete("ns", ids=ids[1:3], request_id="delete-2") == 2   # another request still deletes


def test_every_delete_during_reshards_answers_the_rows_it_deleted(tmp_path):
    """Three threads delete 8 stored ids at a time through one router while another router reshards
    2 -> 1 -> 2 three times: each Delete's count is the 8 rows it deleted (the rows are another test's;
    here the count, which a client checks against its own). The reliability run met a first-attempt
    Delete answering 1 for 8 during a reshard with Ray (docs/RELIABILITY.md, "Open finding"); this is the
    in-process form of that workload, which counts right."""
    runtime = LocalRuntime(2, data_dir=str(tmp_path), fsync="never", snapshot_every=0)
    router, driver = Router(runtime), Router(runtime)
    router.create_namespace(NamespaceConfig("ns", dim=DIM))
    rng = np.random.default_rng(11)
    alive = set(router.add("ns", rng.standard_normal((6000, DIM)).astype(np.float32), np.arange(6000) % 100).ids.tolist())
    lock, stop, wrong, errors = threading.Lock(), threading.Event(), [], []

    def deleter(seed):
        local = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                with lock:
                    picks = local.choice(np.array(sorted(alive)), 8, replace=False)
                    alive.difference_update(picks.tolist())
                count = router.delete("ns", ids=picks)
                if count != 8:
                    wrong.append((count, picks.tolist()))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(repr(error))

    threads = [threading.Thread(target=deleter, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(3):
            for shards in (1, 2):
                assert reshard(driver, shards, batch_rows=400).done
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not errors, errors
    assert not wrong, wrong[:5]
    assert np.sort(all_ids(router, "ns")).tolist() == sorted(alive)


def test_a_delete_that_meets_a_retired_shard_counts_the_rows_the_other_shards_deleted(tmp_path):
    """A front end that has not seen a shrink routes a Delete with the placement before it: the shard
    still placed applies its share, the retired shard's actor is gone (ShardUnavailable). The router
    sends the Delete again at the new placement, where the shard that applied a share answers only
    the rows it had not: the first round's answers must count. (Before the fix the router dropped
    them: a Delete of 8 rows answered 1, the reliability run's open finding of 2026-12-06, seen with
    Ray only, because an in-process runtime shortens its list of shards before any call goes.)"""
    runtime = LocalRuntime(2, data_dir=str(tmp_path), fsync="never", snapshot_every=0)
    stale_runtime = _OtherFrontEnd(runtime)
    stale, driver = Router(stale_runtime), Router(runtime)
    driver.create_namespace(NamespaceConfig("ns", dim=DIM))
    rng = np.random.default_rng(3)
    ids = driver.add("ns", rng.standard_normal((400, DIM)).astype(np.float32), np.arange(400) % 9).ids
    stale.config("ns")
    assert stale.placement.actors == 2
    assert reshard(driver, 1, batch_rows=100).done
    stale_runtime.shards[1] = None  # killed with the shrink; this front end still routes to it
    picks = ids[:8]
    assert {int(i) % 2 for i in picks} == {0, 1}  # shares on both shards of the placement before
    assert stale.delete("ns", ids=picks) == 8
    assert not set(picks.tolist()) & set(all_ids(driver, "ns").tolist())
    assert len(all_ids(driver, "ns")) == 392
    assert stale.delete("ns", ids=picks, request_id="again") == 0
    stale_runtime.shutdown()
