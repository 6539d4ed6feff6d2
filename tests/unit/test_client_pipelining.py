"""A call larger than one message goes in chunks, pipelined: while the server processes one chunk
the client sends the next, never more than PIPELINE_DEPTH at once; the answer equals the same call
sent whole. After a chunk fails no further chunk is sent, the first failure is raised, and a split
step steps nothing. A real gRPC server in this process (no Ray) with a small message limit; the
router's methods are wrapped to see what reaches the server, and when."""

import threading
import time

import numpy as np
import pytest
from monim.model_client import MemoryClient
from monim.model_client.client import PIPELINE_DEPTH
from monim.model_client.errors import NotFound
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime
from monim.workers.server import start_server

SMALL = 256 * 1024
DIM, VALUE_DIM, ROWS = 8, 64, 3000


class InFlight:
    """Wraps a router method: counts the calls running at once, and (optionally) holds each a moment."""

    def __init__(self, router, method, hold_s=0.05):
        self.real, self.hold_s = getattr(router, method), hold_s
        self.lock, self.now, self.most, self.parts = threading.Lock(), 0, 0, []
        setattr(router, method, self)

    def __call__(self, *args, **kwargs):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            self.parts.append(kwargs.get("part", 0))
        try:
            time.sleep(self.hold_s)
            return self.real(*args, **kwargs)
        finally:
            with self.lock:
                self.now -= 1


@pytest.fixture
def deployment():
    runtime = LocalRuntime(2)
    router = Router(runtime)
    server, port = start_server(router, port=0, max_message_bytes=SMALL)
    with MemoryClient(f"127.0.0.1:{port}", max_message_bytes=SMALL) as client:
        yield router, client
    server.stop(0)
    runtime.shutdown()


def load(client, name="ns"):
    rng = np.random.default_rng(7)
    client.create_namespace(name, dim=DIM, value_dim=VALUE_DIM, optimizer="adam", lr=0.01)
    return client.add(name, rng.standard_normal((ROWS, DIM)).astype(np.float32), np.arange(ROWS),
                      values=rng.standard_normal((ROWS, VALUE_DIM)).astype(np.float32))


def test_the_chunks_of_an_add_are_pipelined_and_each_row_gets_its_id(deployment):
    router, client = deployment
    client.create_namespace("ns", dim=DIM, value_dim=VALUE_DIM)
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    values = rng.standard_normal((ROWS, VALUE_DIM)).astype(np.float32)
    watch = InFlight(router, "add")
    ids = client.add("ns", keys, np.arange(ROWS), values=values)
    assert len(watch.parts) >= 4 and watch.most == PIPELINE_DEPTH
    assert sorted(ids.tolist()) == list(range(ROWS))  # every row stored once (chunks take ids as they land)
    rows = client.get("ns", ids)
    np.testing.assert_array_equal(rows.keys, keys)
    np.testing.assert_array_equal(rows.values, values)
    np.testing.assert_array_equal(rows.tokens, np.arange(ROWS))


def test_the_chunks_of_an_add_that_merges_go_one_at_a_time(deployment):
    """A row may merge into a row an earlier chunk stored, so those chunks are not pipelined: the
    last chunk's rows, copies of the first chunk's, all merge."""
    router, client = deployment
    client.create_namespace("ns", dim=DIM)
    keys = np.random.default_rng(0).standard_normal((4 * ROWS, DIM)).astype(np.float32)  # keys only: 4x the rows
    keys[-100:] = keys[:100]
    tokens = np.arange(4 * ROWS)
    tokens[-100:] = tokens[:100]
    watch = InFlight(router, "add")
    result = client.add("ns", keys, tokens, merge_eps=1e-3, details=True)
    assert len(watch.parts) >= 4 and watch.most == 1
    assert result.merged[-100:].all() and not result.merged[:-100].any()
    np.testing.assert_array_equal(result.ids[-100:], result.ids[:100])


@pytest.mark.parametrize("method", ["get", "search"])
def test_the_chunks_of_a_large_read_are_pipelined_and_answer_as_one_call(deployment, method):
    router, client = deployment
    ids = load(client)
    rng = np.random.default_rng(1)
    if method == "get":
        order = rng.permutation(ids)
        whole = router.get("ns", order, return_optimizer_state=True)
        watch = InFlight(router, "get")
        got = client.get("ns", order, return_optimizer_state=True)
        names = ("ids", "keys", "tokens", "values", "weights")
    else:
        queries = rng.standard_normal((2000, DIM)).astype(np.float32)
        whole = router.search("ns", queries, 16, return_keys=True)
        watch = InFlight(router, "search")
        got = client.search("ns", queries, 16, return_keys=True)
        names = ("ids", "tokens", "keys")
        np.testing.assert_allclose(got.distances, whole.distances, rtol=1e-5)  # a smaller batch's GEMM rounds apart
    assert len(watch.parts) >= 4 and watch.most == PIPELINE_DEPTH
    for name in names:
        np.testing.assert_array_equal(getattr(got, name), getattr(whole, name), err_msg=name)


def test_a_split_apply_gradients_is_pipelined_and_is_one_step(deployment):
    router, client = deployment
    ids = load(client)
    grads = np.random.default_rng(2).standard_normal((ids.size, VALUE_DIM)).astype(np.float32)
    watch = InFlight(router, "apply_gradients")
    assert client.apply_gradients("ns", ids, grads) == ROWS
    assert len(watch.parts) >= 4 and watch.most == PIPELINE_DEPTH
    assert sorted(watch.parts) == list(range(len(watch.parts)))  # each part once
    assert (client.get("ns", ids, return_optimizer_state=True).optimizer_state["step"] == 1).all()


def test_after_a_chunk_fails_no_further_chunk_is_sent_and_nothing_is_stepped(deployment):
    router, client = deployment
    ids = load(client)
    before = client.get("ns", ids, return_optimizer_state=True)
    targets = ids.copy()
    targets[len(targets) // 8] = 10_000_000  # in the second part (of 10 or more): not stored
    grads = np.random.default_rng(3).standard_normal((targets.size, VALUE_DIM)).astype(np.float32)
    watch = InFlight(router, "apply_gradients", hold_s=0.2)
    aborted = InFlight(router, "abort_step", hold_s=0)
    with pytest.raises(NotFound, match="10000000"):
        client.apply_gradients("ns", targets, grads)
    # Parts 0 to PIPELINE_DEPTH - 1 were in flight when 1 failed; one more at most was started before
    # the failure was seen (of 10 or more parts).
    assert set(watch.parts) <= set(range(PIPELINE_DEPTH + 1)) and 1 in watch.parts, watch.parts
    assert len(aborted.parts) == 1 and watch.now == 0  # aborted once, after every part had ended
    after = client.get("ns", ids, return_optimizer_state=True)
    np.testing.assert_array_equal(after.values, before.values)
    for name in before.optimizer_state:
        np.testing.assert_array_equal(after.optimizer_state[name], before.optimizer_state[name], err_msg=name)
