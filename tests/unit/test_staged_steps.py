"""Staged step parts are bounded by age, count and bytes (workers/staged_steps.py).

Before the bound, the parts of steps whose client died before its commit stayed for 10 minutes
whatever their size (on a GPU shard without a log, GBs of value gradients each): a few such steps
could exhaust the shard's memory. Now a part that would pass the byte budget drops steps that are
idle (no part or commit for IDLE_S), least recently reached first, and is refused with
RESOURCE_EXHAUSTED, staging nothing, when only live steps are left. Through a real gRPC server: the
client sees RESOURCE_EXHAUSTED, nothing is stepped, and the steps already waiting still commit."""

import collections
import urllib.request

import numpy as np
import pytest
from monim.datastore import NamespaceConfig
from monim.model_client import MemoryClient
from monim.model_client.errors import ResourceExhausted as ClientResourceExhausted
from monim.protos.config import OptimizerConfig
from monim.protos.errors import Aborted, InvalidArgument, ResourceExhausted
from monim.workers import staged_steps
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime
from monim.workers.server import start_server
from monim.workers.staged_steps import StagedSteps
from prometheus_client.parser import text_string_to_metric_families

DIM, VALUE_DIM, ROWS = 8, 16, 200
PART_BYTES = 10 * 8 + 10 * VALUE_DIM * 4  # 10 ids and their float32 gradients


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def part(rows=10):
    return np.arange(rows, dtype=np.int64), np.ones((rows, VALUE_DIM), np.float32)


def table(budget=3 * PART_BYTES):
    clock = Clock()
    return StagedSteps(budget, shard_index=2, clock=clock), clock


def test_bytes_are_counted_per_part_and_released_by_pop_and_by_a_retried_part():
    steps, _ = table()
    steps.stage("ns", 1, "a", 0, *part())
    steps.stage("ns", 1, "a", 1, *part())
    assert steps.bytes == 2 * PART_BYTES and steps["a"].bytes == 2 * PART_BYTES
    steps.stage("ns", 1, "a", 1, *part())  # the same part again (a retry): counted once
    assert steps.bytes == 2 * PART_BYTES
    assert steps.pop("a").bytes == 2 * PART_BYTES
    assert steps.bytes == 0 and len(steps) == 0 and steps.pop("a") is None


def test_a_part_past_the_budget_evicts_idle_steps_least_recently_reached_first():
    steps, clock = table()
    steps.stage("ns", 1, "old", 0, *part())
    clock.now += 10
    steps.stage("ns", 1, "older-but-reached", 0, *part())
    clock.now += 10
    steps.stage("ns", 1, "old", 1, *part())  # reached again: now the most recent
    clock.now += staged_steps.IDLE_S + 1
    steps.stage("ns", 1, "new", 0, *part())  # 3 parts + 1 > budget: one idle step must go
    assert "older-but-reached" not in steps and "old" in steps and "new" in steps
    assert steps.bytes == 3 * PART_BYTES
    assert steps.dropped == {"expired": 0, "evicted": 1}


def test_a_part_past_the_budget_with_only_live_steps_is_refused_and_nothing_of_it_is_staged():
    steps, clock = table()
    steps.stage("ns", 1, "live", 0, *part())
    steps.stage("ns", 1, "live", 1, *part())
    clock.now += staged_steps.IDLE_S / 2
    with pytest.raises(ResourceExhausted) as refused:
        steps.stage("ns", 1, "new", 0, *part(20))
    assert refused.value.code == "RESOURCE_EXHAUSTED"
    message = str(refused.value)
    assert "shard 2 cannot stage 1.4 KiB more of step parts: the other steps waiting for their commit (1) hold " \
           "1.4 KiB of its 2.1 KiB" in message and "nothing of this part was staged" in message
    assert "new" not in steps and steps.bytes == 2 * PART_BYTES and steps["live"].bytes == 2 * PART_BYTES
    # ... while a step's own parts never keep it out: the live step may pass the budget alone
    steps.stage("ns", 1, "live", 2, *part(20))
    assert sorted(steps["live"].parts) == [0, 1, 2] and steps.bytes == 2 * PART_BYTES + 1440


def test_a_step_larger_than_the_budget_is_staged_when_no_other_step_waits():
    """The bound is on what waits beside a step (abandoned steps), not on one step's size: a step whose
    parts together pass the budget was taken before the bound and still is (a review found it refused)."""
    steps, clock = table(budget=PART_BYTES - 1)
    steps.stage("ns", 1, "big", 0, *part())
    steps.stage("ns", 1, "big", 1, *part())
    assert steps.bytes == 2 * PART_BYTES and steps.pop("big").bytes == 2 * PART_BYTES


def test_a_part_that_cannot_fit_evicts_nothing():
    steps, clock = table(budget=3 * PART_BYTES)
    steps.stage("ns", 1, "idle", 0, *part())
    steps.stage("ns", 1, "live", 0, *part())
    clock.now += staged_steps.IDLE_S + 1
    steps.stage("ns", 1, "live", 1, *part(1))  # reached again: live; "idle" is idle
    with pytest.raises(ResourceExhausted):
        steps.stage("ns", 1, "new", 0, *part(20))  # live's bytes + this pass the budget, idle's or not
    assert "idle" in steps and steps.dropped["evicted"] == 0


def test_a_part_staged_again_without_partial_sums_forgets_the_earlier_ones():
    """The same (step, part) first from a backward (with the sums it answered), then as value gradients
    alone: the sums are not kept for the commit to remember, and the bytes count what is held."""
    steps, _ = table(budget=1 << 20)
    partials = np.zeros((4, 20))
    steps.stage("ns", 1, "a", 0, *part(), partials=partials)
    assert steps.bytes == PART_BYTES + partials.nbytes
    steps.stage("ns", 1, "a", 0, *part())
    assert steps["a"].partials == {} and steps.bytes == steps["a"].bytes == PART_BYTES


def test_steps_expire_after_the_ttl_and_are_counted(monkeypatch):
    steps, clock = table(budget=1 << 30)
    steps.stage("ns", 1, "a", 0, *part())
    clock.now += staged_steps.TTL_S + 1
    steps.stage("ns", 1, "b", 0, *part())
    assert "a" not in steps and steps.bytes == PART_BYTES
    assert steps.stats() == {"steps": 1, "bytes": PART_BYTES, "budget": 1 << 30,
                             "dropped": {"expired": 1, "evicted": 0}}


def test_the_count_bound_evicts_idle_steps_and_refuses_when_all_are_live(monkeypatch):
    monkeypatch.setattr(staged_steps, "MAX_STEPS", 2)
    steps, clock = table(budget=1 << 30)
    steps.stage("ns", 1, "a", 0, *part())
    steps.stage("ns", 1, "b", 0, *part())
    with pytest.raises(ResourceExhausted, match="2 steps waiting for their commit, the most it keeps"):
        steps.stage("ns", 1, "c", 0, *part())
    steps.stage("ns", 1, "b", 1, *part())  # a new part of a waiting step needs no new entry
    clock.now += staged_steps.IDLE_S + 1
    steps.stage("ns", 1, "c", 0, *part())
    assert sorted(s for s, _ in steps.items()) == ["b", "c"]  # "a" was reached least recently
    assert steps.dropped["evicted"] == 1


def test_a_step_id_of_another_namespace_is_refused():
    steps, _ = table()
    steps.stage("ns", 1, "a", 0, *part())
    with pytest.raises(InvalidArgument, match="already used by namespace 'ns'"):
        steps.stage("other", 1, "a", 1, *part())
    assert steps.bytes == PART_BYTES


def test_the_default_budget_is_a_quarter_of_the_memory_budget_and_at_least_256_mib():
    assert staged_steps.default_budget(8 << 30) == 2 << 30
    assert staged_steps.default_budget(1 << 20) == 256 << 20


# ----- through the router and a real gRPC server -------------------------------------------------

def _deployment(shards=2):
    runtime = LocalRuntime(shards)
    router = Router(runtime)
    router.create_namespace(NamespaceConfig("ns", dim=DIM, value_dim=VALUE_DIM, optimizer=OptimizerConfig("sgd", lr=0.5)))
    rng = np.random.default_rng(0)
    router.add("ns", rng.standard_normal((ROWS, DIM)).astype(np.float32), np.arange(ROWS) % 7,
               values=rng.standard_normal((ROWS, VALUE_DIM)).astype(np.float32))
    return runtime, router


def test_dead_clients_steps_no_longer_pile_up_past_the_budget():
    """Steps left staged (never committed) by clients that went away: before the bound, every one
    stayed (bytes without limit); now an idle one makes room for a live one, and a live step commits.
The front end's metrics count them."""
    clock = Clock()
    runtime, router = _deployment()
    try:
        for shard in runtime.shards:
            shard._staged.budget, shard._staged.clock = 12 * 1024, clock
        grads = np.ones((ROWS, VALUE_DIM), np.float32)
        for dead in range(5):  # each stages 7.0 KiB a shard (100 rows)
            router.apply_gradients("ns", np.arange(ROWS), grads, step_id=f"dead-{dead}", defer_step=True)
            clock.now += staged_steps.IDLE_S + 1
        for shard in runtime.shards:
            assert shard._staged.bytes <= shard._staged.budget and len(shard._staged) == 1
            assert shard._staged.dropped["evicted"] == 4
        before = router.get("ns", np.arange(ROWS)).values
        router.apply_gradients("ns", np.arange(ROWS), grads, step_id="live", defer_step=True)
        assert router.commit_step("ns", "live") == ROWS
        np.testing.assert_allclose(router.get("ns", np.arange(ROWS)).values, before - 0.5, rtol=1e-6)
        with pytest.raises(Aborted):  # an evicted step's commit steps nothing
            router.commit_step("ns", "dead-0")
        samples = scrape(router)
        # the live step took the room of dead-4 (idle), then committed: nothing waits
        assert samples["monim_shard_staged_steps"] == [({"shard": "0"}, 0.0), ({"shard": "1"}, 0.0)]
        assert [value for _, value in samples["monim_shard_staged_step_bytes"]] == [0.0, 0.0]
        assert sorted((labels["shard"], labels["why"], value) for labels, value in
                      samples["monim_shard_staged_steps_dropped_total"]) == \
            [("0", "evicted", 5.0), ("0", "expired", 0.0), ("1", "evicted", 5.0), ("1", "expired", 0.0)]
    finally:
        runtime.shutdown()


def scrape(router) -> dict:
    """Every sample of a front end's /metrics over router: {name: [(labels, value)]}."""
    server, _ = start_server(router, port=0, metrics_port=0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=30) as answer:
            text = answer.read().decode()
    finally:
        server.stop(0)
    samples = collections.defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))
    return samples


def test_a_refused_part_reaches_the_client_as_resource_exhausted_and_steps_nothing():
    runtime, router = _deployment()
    server, port = start_server(router, port=0)
    try:
        for shard in runtime.shards:
            shard._staged.budget = 8 * 1024
        with MemoryClient(f"127.0.0.1:{port}") as client:
            grads = np.ones((ROWS, VALUE_DIM), np.float32)
            before = client.get("ns", np.arange(ROWS)).values
            waiting = np.arange(0, 100)  # a live step of another client holds half of each shard's budget
            router.apply_gradients("ns", waiting, grads[:100], step_id="waiting", defer_step=True)
            with pytest.raises(ClientResourceExhausted) as refused:
                client.apply_gradients("ns", np.arange(ROWS), grads)
            assert refused.value.status_code == "RESOURCE_EXHAUSTED"  # the gRPC status the server sent
            assert "more of step parts" in refused.value.message and "nothing of this part was staged" in \
                refused.value.message
            np.testing.assert_array_equal(client.get("ns", np.arange(ROWS)).values, before)  # nothing stepped
            for shard in runtime.shards:  # the refused step was dropped everywhere; the waiting one stays
                assert [s.rsplit(":", 1)[1] for s, _ in shard._staged.items()] == ["waiting"]
            assert router.commit_step("ns", "waiting") == 100
            after = client.get("ns", np.arange(ROWS)).values
            np.testing.assert_allclose(after[:100], before[:100] - 0.5, rtol=1e-6)
            np.testing.assert_array_equal(after[100:], before[100:])
            assert client.apply_gradients("ns", np.arange(ROWS), grads) == ROWS  # room again once committed
    finally:
        server.stop(0)
        runtime.shutdown()


def test_a_step_dropped_between_its_parts_is_aborted_at_its_commit_not_stepped_in_part():
    """Part 0 of step A staged; A idle while step B needs the room: A is dropped; then A's part 1 comes
    and stages A afresh. Its commit is ABORTED, nothing of A stepped (a review found the commit stepped
    part 1 alone: row 0 at -1 instead of -2 or untouched). Through a real gRPC server."""
    clock = Clock()
    runtime, router = _deployment()
    server, port = start_server(router, port=0)
    try:
        for shard in runtime.shards:
            shard._staged.budget, shard._staged.clock = 12 * 1024, clock
        grads = np.ones((ROWS, VALUE_DIM), np.float32)
        before = router.get("ns", np.arange(ROWS)).values
        router.apply_gradients("ns", np.arange(ROWS), grads, step_id="A", part=0, defer_step=True)
        clock.now += staged_steps.IDLE_S + 1
        router.apply_gradients("ns", np.arange(ROWS), grads, step_id="B", part=0, defer_step=True)  # A goes
        assert all(shard._staged.dropped["evicted"] == 1 for shard in runtime.shards)
        assert router.commit_step("ns", "B") == ROWS
        router.apply_gradients("ns", np.arange(ROWS), grads, step_id="A", part=1, defer_step=True)
        stepped_once = router.get("ns", np.arange(ROWS)).values
        np.testing.assert_allclose(stepped_once, before - 0.5, rtol=1e-6)
        with MemoryClient(f"127.0.0.1:{port}") as client:
            with pytest.raises(Aborted, match=r"lost part\(s\) \[0\] on shard .*nothing was stepped"):
                client._store.commit_step("ns", "A")
        np.testing.assert_array_equal(router.get("ns", np.arange(ROWS)).values, stepped_once)
        assert all(len(shard._staged) == 0 for shard in runtime.shards)  # the rest of A went too
    finally:
        server.stop(0)
        runtime.shutdown()


def test_a_step_dropped_on_one_shard_only_is_stepped_on_none():
    """Each shard has its own budget and load: A's part 0 is dropped on shard 1 only. The commit's first
    round asks every shard (prepare_step): shard 1 lost a part, so A is aborted everywhere before any
    shard steps (a second review found shard 0 stepping its half, and the caller told UNAVAILABLE)."""
    clock = Clock()
    runtime, router = _deployment()
    try:
        for shard in runtime.shards:
            shard._staged.budget, shard._staged.clock = 12 * 1024, clock
        runtime.shards[0]._staged.budget = 1 << 20  # room on shard 0: nothing is evicted there
        ids, grads = np.arange(ROWS), np.ones((ROWS, VALUE_DIM), np.float32)
        router.apply_gradients("ns", ids, grads, step_id="A", part=0, defer_step=True)
        clock.now += staged_steps.IDLE_S + 1
        router.apply_gradients("ns", ids, grads, step_id="B", part=0, defer_step=True)
        assert [shard._staged.dropped["evicted"] for shard in runtime.shards] == [0, 1]
        assert router.commit_step("ns", "B") == ROWS
        after_b = router.get("ns", ids).values
        router.apply_gradients("ns", ids, grads, step_id="A", part=1, defer_step=True)
        with pytest.raises(Aborted, match=r"lost part\(s\) \[0\] on shard 1"):
            router.commit_step("ns", "A")
        np.testing.assert_array_equal(router.get("ns", ids).values, after_b)  # neither shard stepped
        assert all(len(shard._staged) == 0 for shard in runtime.shards)  # and neither holds A's parts
        router.apply_gradients("ns", ids, grads, step_id="A", part=0, defer_step=True)  # sent again whole
        router.apply_gradients("ns", ids, grads, step_id="A", part=1, defer_step=True)
        assert router.commit_step("ns", "A") == ROWS
        np.testing.assert_allclose(router.get("ns", ids).values, after_b - 1.0, rtol=1e-6)
    finally:
        runtime.shutdown()


def test_dropping_a_namespace_forgets_what_its_committed_steps_answered():
    """The sums a shard remembers for retries of committed steps' parts lie on its device (a GPU's
    memory): a dropped namespace's go with it."""
    runtime, router = _deployment(shards=1)
    try:
        rng = np.random.default_rng(1)
        forward = router.retrieve("ns", rng.standard_normal((8, DIM)).astype(np.float32), 4, 1.0)
        router.retrieve_backward("ns", forward.queries, forward.ids, forward.alpha, forward.distances,
                                 np.ones((8, VALUE_DIM), np.float32), 1.0, step_id="s")
        shard = runtime.shards[0]
        assert len(shard._answered) == 1 and shard._answered.bytes > 0
        router.drop_namespace("ns")
        assert len(shard._answered) == 0 and shard._answered.bytes == 0
    finally:
        runtime.shutdown()


@pytest.mark.parametrize("grow_begins", ["between the parts", "before the commit"])
def test_a_step_across_the_start_of_a_grow_commits(grow_begins):
    """Between the parts: part 0 staged on the 2 shards of the old placement, part 1 on the 4 of the
    grow's (the router that drives the reshard adopts it at once): the new shards never had part 0, which
    is not a lost part (a second review found a check of the parts count aborting this, half committed).
    Before the commit: every part staged on the old 2 shards; the new ones hold none of it and are not
    told to expect parts (the second review found them answering ABORTED, turned into UNAVAILABLE though
    every row was stepped once, on every retry)."""
    from monim.workers.reshard import Resharder

    runtime, router = _deployment()
    try:
        ids, grads = np.arange(ROWS), np.ones((ROWS, VALUE_DIM), np.float32)
        before = router.get("ns", ids).values
        steps = Resharder(router).run(4, 10)
        router.apply_gradients("ns", ids[:100], grads[:100], step_id="S", part=0, defer_step=True)
        if grow_begins == "between the parts":
            next(steps)  # 4 actors in this router's placement now
        router.apply_gradients("ns", ids[100:], grads[100:], step_id="S", part=1, defer_step=True)
        if grow_begins == "before the commit":
            next(steps)
        assert router.commit_step("ns", "S") == ROWS
        assert router.commit_step("ns", "S") == ROWS  # again: the first answer
        for _ in steps:
            pass
        np.testing.assert_allclose(router.get("ns", ids).values, before - 0.5, rtol=1e-6)
    finally:
        runtime.shutdown()


def test_a_shard_that_lost_its_parts_in_a_restart_still_makes_the_commit_aborted():
    """No shard holds the step's parts (both restarted): the commit is ABORTED (nothing stepped), not 0
    rows: the prepare round's answers (0 everywhere) leave every shard expecting its parts."""
    runtime, router = _deployment()
    try:
        ids, grads = np.arange(ROWS), np.ones((ROWS, VALUE_DIM), np.float32)
        router.apply_gradients("ns", ids, grads, step_id="S", part=0, defer_step=True)
        for shard in runtime.shards:
            shard._staged.pop(next(iter(shard._staged)))  # what a restart loses
        with pytest.raises(Aborted, match="has no staged parts"):
            router.commit_step("ns", "S")
    finally:
        runtime.shutdown()
