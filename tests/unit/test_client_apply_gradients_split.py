"""MemoryClient.apply_gradients of more rows than one message holds: the ids and gradients go in
parts that wait on the shards, then one commit applies them as ONE optimizer step (Adam's step
count rises by one, repeated ids across parts sum), equal to the same step sent whole. A part that
fails leaves nothing stepped. A Get whose reply would not fit is split too. A real gRPC server in
this process (no Ray), with a small limit."""

import numpy as np
import pytest
from monim.model_client import MemoryClient
from monim.model_client.errors import NotFound
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime
from monim.workers.server import start_server

SMALL = 256 * 1024
DIM, VALUE_DIM, ROWS = 8, 64, 3000
ADAM = dict(optimizer="adam", lr=0.01)


@pytest.fixture
def clients():
    runtime = LocalRuntime(3)
    router = Router(runtime)
    small, small_port = start_server(router, port=0, max_message_bytes=SMALL)
    large, large_port = start_server(router, port=0)
    with MemoryClient(f"127.0.0.1:{small_port}", max_message_bytes=SMALL) as split, \
            MemoryClient(f"127.0.0.1:{large_port}") as whole:
        yield split, whole
    small.stop(0)
    large.stop(0)
    runtime.shutdown()


def load(client, rng, name):
    """ROWS rows, the same for every name (rng is re-seeded)."""
    rng = np.random.default_rng(7)
    client.create_namespace(name, dim=DIM, value_dim=VALUE_DIM, **ADAM)
    values = rng.standard_normal((ROWS, VALUE_DIM)).astype(np.float32)
    return client.add(name, rng.standard_normal((ROWS, DIM)).astype(np.float32), np.arange(ROWS), values=values)


def test_an_apply_gradients_larger_than_a_message_is_one_step(rng, clients, monkeypatch):
    split, whole = clients
    ids_a, ids_b = load(whole, rng, "a"), load(whole, rng, "b")
    np.testing.assert_array_equal(ids_a, ids_b)
    targets = np.concatenate([ids_a, ids_a[:500]])  # repeated ids, in different parts
    grads = rng.standard_normal((targets.size, VALUE_DIM)).astype(np.float32)
    assert targets.size * (8 + 4 * VALUE_DIM) > SMALL  # one message would not fit
    sent = []
    real = split._store.apply_gradients
    monkeypatch.setattr(split._store, "apply_gradients",
                        lambda *args, **kwargs: (sent.append(kwargs), real(*args, **kwargs))[1])
    assert split.apply_gradients("a", targets, grads) == ROWS
    assert len(sent) > 1 and all(kwargs["defer_step"] for kwargs in sent)
    assert whole.apply_gradients("b", targets, grads) == ROWS
    a = whole.get("a", ids_a, return_optimizer_state=True)
    b = whole.get("b", ids_b, return_optimizer_state=True)
    np.testing.assert_allclose(a.values, b.values, rtol=1e-6, atol=1e-7)
    for name in b.optimizer_state:
        np.testing.assert_allclose(a.optimizer_state[name], b.optimizer_state[name], rtol=1e-6, atol=1e-7)


def test_a_failed_part_steps_nothing(rng, clients):
    split, whole = clients
    ids = load(whole, rng, "c")
    before = whole.get("c", ids, return_optimizer_state=True)
    targets = np.concatenate([ids, [10_000_000]])  # the last part names an id that is not stored
    grads = rng.standard_normal((targets.size, VALUE_DIM)).astype(np.float32)
    with pytest.raises(NotFound):
        split.apply_gradients("c", targets, grads)
    after = whole.get("c", ids, return_optimizer_state=True)
    np.testing.assert_array_equal(after.values, before.values)
    for name in before.optimizer_state:
        np.testing.assert_array_equal(after.optimizer_state[name], before.optimizer_state[name])


def test_a_get_whose_reply_is_larger_than_a_message_is_split_and_equals_one_call(rng, clients, monkeypatch):
    split, whole = clients
    ids = load(whole, rng, "d")
    whole.apply_gradients("d", ids, rng.standard_normal((ids.size, VALUE_DIM)).astype(np.float32))
    assert ids.size * (4 * VALUE_DIM * 4) > SMALL  # values and Adam state would not fit in one reply
    calls = []
    real = split._store.get
    monkeypatch.setattr(split._store, "get", lambda *args, **kwargs: (calls.append(1), real(*args, **kwargs))[1])
    order = rng.permutation(ids)
    got, want = split.get("d", order, return_optimizer_state=True), whole.get("d", order, return_optimizer_state=True)
    assert len(calls) > 1
    for name in ("ids", "keys", "tokens", "values", "weights"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    assert got.sources == want.sources and sorted(got.optimizer_state) == sorted(want.optimizer_state)
    for name in want.optimizer_state:
        np.testing.assert_array_equal(got.optimizer_state[name], want.optimizer_state[name], err_msg=name)
