"""A one-shard deployment's training step keeps the search's rows at the shard (NeighborStore.kept_rows):
the value sums and the backward read them instead of sending B x k ids to the store's device and looking
each up again. Same answers and the same step as without; a delete in between makes the store look the
ids up again (rows move), and a deleted neighbour is still NOT_FOUND with nothing stepped."""

import numpy as np
import pytest
from monim.datastore import NamespaceConfig
from monim.protos.errors import IdsNotFound, StepAnswerLost
from monim.workers import router as router_module
from monim.workers.placement import Placement
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime

pytest.importorskip("faiss", reason="these shards search on the CPU, with faiss (not on the GPU machine)")

DIM, VALUE_DIM, ROWS, K, B = 8, 16, 300, 12, 40


def deployment(shards=1):
    router = Router(LocalRuntime(shards))
    router.create_namespace(NamespaceConfig("ns", dim=DIM, value_dim=VALUE_DIM, optimizer=_adam()))
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    values = rng.standard_normal((ROWS, VALUE_DIM)).astype(np.float32)
    router.add("ns", keys, np.arange(ROWS), values=values)
    queries = keys[rng.integers(0, ROWS, B)] + 0.05 * rng.standard_normal((B, DIM)).astype(np.float32)
    grad = rng.standard_normal((B, VALUE_DIM)).astype(np.float32)
    return router, queries, grad


def _adam():
    from monim.protos.config import OptimizerConfig
    return OptimizerConfig("adam", lr=0.01)


def store_of(router):
    return router.runtime.shards[0].stores["ns"]


def count_lookups(store, monkeypatch):
    """Ids the store looks up in its id map (host or device)."""
    looked = []
    id_map = store.rows.id_map
    for name in ("lookup", "lookup_tensor"):
        real = getattr(id_map, name)
        monkeypatch.setattr(id_map, name, lambda ids, real=real: looked.append(int(np.size(ids))) or real(ids))
    return looked


def step(router, queries, grad, **retrieve):
    forward = router.retrieve("ns", queries, K, 0.5, keep_state=True, **retrieve)
    grads = router.retrieve_backward("ns", None, None, None, None, grad, forward.temperature, handle=forward.handle)
    return forward, grads


@pytest.fixture(autouse=True)
def two_rounds(monkeypatch):
    """The value sums as their own round (a training batch's: B x k x value_dim past ONE_ROUND_VALUE_BYTES)."""
    monkeypatch.setattr(router_module, "ONE_ROUND_VALUE_BYTES", 0)


def test_a_step_on_one_shard_looks_no_id_up_after_its_search_and_answers_as_without(monkeypatch):
    router, queries, grad = deployment()
    looked = count_lookups(store_of(router), monkeypatch)
    forward, (grad_q, grad_t) = step(router, queries, grad)
    assert sum(n for n in looked if n >= B * K) == 0, looked  # the value sums' and the backward's ids: none
    stepped = router.get("ns", np.arange(ROWS)).values

    # The same step with the rows not kept (as on several shards): the same answers and values.
    other, _, _ = deployment()
    monkeypatch.setattr(Placement, "alone", property(lambda placement: False))
    again, (grad_q2, grad_t2) = step(other, queries, grad)
    np.testing.assert_array_equal(forward.memory, again.memory)
    np.testing.assert_array_equal(grad_q, grad_q2)
    assert grad_t == grad_t2
    np.testing.assert_array_equal(stepped, other.get("ns", np.arange(ROWS)).values)


def test_a_delete_between_forward_and_backward_makes_the_store_look_the_ids_up_again(monkeypatch):
    """Deleting a row that no query found moves the last row into its place: the kept rows would name
    the wrong entries, so the backward looks its ids up, and steps what an untouched twin steps."""
    router, queries, grad = deployment()
    twin, _, _ = deployment()
    forward = router.retrieve("ns", queries, K, 0.5, keep_state=True)
    found = set(forward.ids.ravel().tolist())
    victim = next(i for i in range(ROWS - 1) if i not in found)
    assert router.delete("ns", ids=np.array([victim])) == 1
    twin.delete("ns", ids=np.array([victim]))
    looked = count_lookups(store_of(router), monkeypatch)
    grads = router.retrieve_backward("ns", None, None, None, None, grad, 0.5, handle=forward.handle)
    assert any(n >= B * K for n in looked)  # looked up again
    twin_forward = twin.retrieve("ns", queries, K, 0.5)
    np.testing.assert_array_equal(twin_forward.ids, forward.ids)
    twin_grads = twin.retrieve_backward("ns", queries, twin_forward.ids, twin_forward.alpha, twin_forward.distances,
                                        grad, 0.5)
    np.testing.assert_array_equal(grads[0], twin_grads[0])
    kept_ids = np.setdiff1d(np.arange(ROWS), [victim])
    np.testing.assert_array_equal(router.get("ns", kept_ids).values, twin.get("ns", kept_ids).values)


def test_a_neighbour_deleted_before_the_backward_is_still_not_found_and_nothing_steps():
    router, queries, grad = deployment()
    forward = router.retrieve("ns", queries, K, 0.5, keep_state=True)
    before = router.get("ns", np.arange(ROWS)).values
    gone = int(forward.ids[0, 0])
    router.delete("ns", ids=np.array([gone]))
    with pytest.raises(IdsNotFound):
        router.retrieve_backward("ns", None, None, None, None, grad, 0.5, handle=forward.handle)
    left = np.setdiff1d(np.arange(ROWS), [gone])
    np.testing.assert_array_equal(router.get("ns", left).values, before[left])


def test_the_kept_answers_are_bounded():
    router, queries, grad = deployment()
    store = store_of(router)
    for _ in range(store.kept_rows.MAX_ENTRIES + 5):
        router.retrieve("ns", queries, K, 0.5, keep_state=True)
    assert len(store.kept_rows._answers) == store.kept_rows.MAX_ENTRIES
    assert store.kept_rows.bytes == store.kept_rows.MAX_ENTRIES * B * K * (8 + 4 + 4)  # rows, alpha, distances


def test_two_shards_keep_nothing():
    router, queries, grad = deployment(shards=2)
    step(router, queries, grad)
    assert all(not shard.stores["ns"].kept_rows._answers for shard in router.runtime.shards)


def test_a_lone_shards_forward_is_one_call_and_its_backward_sends_only_grad_memory_to_the_device(monkeypatch):
    router, queries, grad = deployment()
    shard, store = router.runtime.shards[0], store_of(router)
    calls, sent = [], []
    for name in ("search", "forward", "value_sum", "backward_part"):
        real = getattr(shard, name)
        monkeypatch.setattr(shard, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    real_tensor = store._tensor
    monkeypatch.setattr(store, "_tensor", lambda array: sent.append(np.shape(array)) or real_tensor(array))
    forward, _ = step(router, queries, grad)
    assert calls == ["forward", "backward_part"]
    # grad_memory (and the commit's rows); not the forward's alpha and distances, kept at the shard
    assert (B, VALUE_DIM) in sent and (B, K) not in sent, sent
    np.testing.assert_allclose(forward.alpha.sum(1), 1.0, rtol=1e-5)


def test_rows_kept_while_a_stale_router_searched_two_shards_are_not_used_after_a_shrink_back_to_one():
    """A front end whose placement still named one shard kept the rows of a forward that, once it had
    refreshed, ran on the two shards of a grow: each kept its own half of the answer under the name. After
    a shrink back to one shard, the backward by handle used shard 0's half in place of the merged ids (a
    review of the change found it: grad_q off by 4.35, 129 of 216 rows stepped)."""
    from monim.protos.config import OptimizerConfig
    from monim.workers.reshard import reshard

    runtime = LocalRuntime(1)
    driver = Router(runtime)
    driver.create_namespace(NamespaceConfig("ns", dim=DIM, value_dim=VALUE_DIM, optimizer=OptimizerConfig("sgd", lr=0.1)))
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    driver.add("ns", keys, np.arange(ROWS), values=rng.standard_normal((ROWS, VALUE_DIM)).astype(np.float32))
    queries = keys[rng.integers(0, ROWS, B)] + 0.05 * rng.standard_normal((B, DIM)).astype(np.float32)
    grad = rng.standard_normal((B, VALUE_DIM)).astype(np.float32)
    stale = Router(runtime)  # another front end: it read the placement of one shard
    stale.config("ns")
    reshard(driver, 2, batch_rows=64)
    forward = stale.retrieve("ns", queries, K, 0.5, keep_state=True)
    reshard(driver, 1, batch_rows=64)
    stale.refresh_placement()
    expected = stale.retrieve_backward("ns", forward.queries, forward.ids, forward.alpha, forward.distances, grad,
                                       0.5, step_id="arrays", defer_step=True)
    stale.abort_step("ns", "arrays")
    found = stale.retrieve_backward("ns", None, None, None, None, grad, 0.5, handle=forward.handle,
                                    step_id="handle", defer_step=True)
    np.testing.assert_array_equal(found[0], expected[0])
    assert found[1] == expected[1]
    staged = runtime.shards[0]._staged
    step = staged[next(key for key in staged if key.endswith(":handle"))]
    stepped = np.sort(np.concatenate([ids for ids, _ in step.in_order()]))
    np.testing.assert_array_equal(stepped, np.unique(forward.ids[forward.ids >= 0]))


def test_a_lone_shard_finishes_the_backward_and_a_retry_after_the_commit_answers_the_same(monkeypatch):
    """The lone shard adds its sums and finishes dL/dq on its own device: the router gets
    (grad_queries, grad_temperature), not the 4x larger partial sums; a retry of the committed step
    (its answer lost) gets the same answer, from the sums remembered before the step, and steps nothing."""
    router, queries, grad = deployment()
    shard = router.runtime.shards[0]
    answered = []
    real = shard.backward_part
    monkeypatch.setattr(shard, "backward_part", lambda *a: answered.append(real(*a)) or answered[-1])
    forward = router.retrieve("ns", queries, K, 0.5)
    args = (forward.queries, forward.ids, forward.alpha, forward.distances, grad, 0.5)
    grad_q, grad_t = router.retrieve_backward("ns", *args, step_id="s")
    assert isinstance(answered[0], tuple) and answered[0][0].shape == (B, DIM)
    stepped = router.get("ns", np.arange(ROWS)).values
    again_q, again_t = router.retrieve_backward("ns", *args, step_id="s")
    np.testing.assert_array_equal(again_q, grad_q)
    assert again_t == grad_t
    np.testing.assert_array_equal(router.get("ns", np.arange(ROWS)).values, stepped)


def test_a_retry_after_a_grow_says_its_gradients_are_gone_and_steps_nothing_twice():
    """A step committed on a lone shard, then a grow to two, then a retry of the step: shard 0's sums
    remembered from before the grow cover the rows now on shard 1 (they are of another placement),
    and sums over the rows as they are now would be over the stepped values: the retry is answered
    FAILED_PRECONDITION (StepAnswerLost, naming the caller's step id), and nothing steps twice."""
    from monim.workers.reshard import reshard

    router, queries, grad = deployment()
    forward = router.retrieve("ns", queries, K, 0.5)
    args = (forward.queries, forward.ids, forward.alpha, forward.distances, grad, 0.5)
    router.retrieve_backward("ns", *args, step_id="s")
    reshard(router, 2, batch_rows=64)
    stepped = router.get("ns", np.arange(ROWS)).values
    with pytest.raises(StepAnswerLost, match="step 's' was committed") as lost:
        router.retrieve_backward("ns", *args, step_id="s")
    assert lost.value.code == "FAILED_PRECONDITION"
    np.testing.assert_array_equal(router.get("ns", np.arange(ROWS)).values, stepped)


def _deferred_step(router, queries, grad, step_id="s"):
    forward = router.retrieve("ns", queries, K, 0.5)
    router.retrieve_backward("ns", forward.queries, forward.ids, forward.alpha, forward.distances, grad, 0.5,
                             step_id=step_id, defer_step=True)
    return forward


def _without_held_rows(monkeypatch):
    from monim.datastore.store import HeldRows
    monkeypatch.setattr(HeldRows, "valid_in", lambda held, row_store: False)


def test_the_commit_of_a_lone_backward_steps_its_rows_as_held_without_looking_an_id_up(monkeypatch):
    """The backward's rows (sorted, distinct) go with its gradients to the commit: no id is looked up
    and nothing is summed again, and the step is the one the lookup makes, bit for bit."""
    router, queries, grad = deployment()
    _deferred_step(router, queries, grad)
    looked = count_lookups(store_of(router), monkeypatch)
    stepped = router.commit_step("ns", "s")
    assert looked == []
    assert stepped > 0
    twin, _, _ = deployment()
    _deferred_step(twin, queries, grad)
    with monkeypatch.context() as patch:
        _without_held_rows(patch)
        looked_twin = count_lookups(store_of(twin), patch)
        assert twin.commit_step("ns", "s") == stepped
        assert looked_twin  # the twin's commit did look its ids up
    np.testing.assert_array_equal(router.get("ns", np.arange(ROWS)).values, twin.get("ns", np.arange(ROWS)).values)


def test_a_delete_between_backward_and_commit_makes_the_commit_look_its_ids_up():
    """A delete fills the hole from the tail: the held rows would name other entries. The commit looks
    the ids up again: the deleted neighbour is skipped (a delete wins over an update) and every other
    row steps as on a twin whose commit came before the delete."""
    router, queries, grad = deployment()
    twin, _, _ = deployment()
    forward = _deferred_step(router, queries, grad)
    _deferred_step(twin, queries, grad)
    victim = int(forward.ids[0, 0])
    assert victim != ROWS - 1
    router.delete("ns", ids=np.array([victim]))
    assert router.commit_step("ns", "s") == twin.commit_step("ns", "s") - 1
    twin.delete("ns", ids=np.array([victim]))
    left = np.setdiff1d(np.arange(ROWS), [victim])
    np.testing.assert_array_equal(router.get("ns", left).values, twin.get("ns", left).values)


def test_held_rows_of_a_store_since_replaced_are_not_taken():
    """A restore replaces the namespace's rows with a RowStore whose removals count afresh: rows held in
    the old one name nothing in the new one (HeldRows keeps the old one weakly and compares it)."""
    import weakref

    from monim.datastore.store import HeldRows
    old, new = store_of(deployment()[0]).rows, store_of(deployment()[0]).rows
    assert old.removals == new.removals
    held = HeldRows(old.ids.new_zeros(0), weakref.ref(old), old.removals)
    assert held.valid_in(old) and not held.valid_in(new)
