"""A Retrieve with memory_only answers m (and its handle) alone, without the [B, k] neighbour
columns: the same m, and by its handle the same backward, as a whole answer's. A backward with
nothing to send (no handle; a handle gone) is refused and steps nothing; the MoNIM layer asks for m
alone and searches again when its handle is gone. A real gRPC server in this process (no Ray), over
one shard (the forward whole on it) and over two (the router's merge)."""

import grpc
import numpy as np
import pytest
import torch
from monim.model_client.layer import MoNIMLayer
from monim.protos import convert
from monim.protos import memory_pb2 as pb
from monim.protos import memory_pb2_grpc as pb_grpc
from monim.protos.errors import FailedPrecondition, InvalidArgument, Unavailable

from tests.unit.test_forward_handles import served

DIM, VALUE_DIM, ROWS, K, BATCH = 8, 16, 400, 10, 32
NEIGHBOURS = ("ids", "alpha", "distances", "tokens", "weights")


@pytest.fixture(params=[1, 2], ids=["one shard", "two shards"])
def service(request):
    with served(request.param) as deployment:
        yield deployment


def lose_the_first_answer(client) -> list:
    """The client's next RetrieveBackward reaches the server and is answered, but the answer is lost on
    the way (UNAVAILABLE); the calls' keyword arguments are recorded in the list returned."""
    real, sent = client._store.retrieve_backward, []

    def answer_lost(*args, **kwargs):
        sent.append(kwargs)
        answer = real(*args, **kwargs)
        if len(sent) == 1:
            raise Unavailable("the connection dropped after the server answered")
        return answer

    client._store.retrieve_backward = answer_lost
    return sent


def twin_namespaces(client, names=("a", "b")):
    rng = np.random.default_rng(5)
    keys = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    values = rng.standard_normal((ROWS, VALUE_DIM)).astype(np.float32)
    for name in names:
        client.create_namespace(name, dim=DIM, value_dim=VALUE_DIM, optimizer="adam", lr=0.1)
        client.add(name, keys, np.arange(ROWS), values=values)
    rng = np.random.default_rng(1)
    return (rng.standard_normal((BATCH, DIM)).astype(np.float32),
            rng.standard_normal((BATCH, VALUE_DIM)).astype(np.float32))


def stored_values(client, name):
    return client.get(name, np.arange(ROWS)).values


def test_m_alone_comes_back_and_its_backward_by_the_handle_steps_as_the_whole_answers(service):
    _, client, _, address = service
    queries, grad = twin_namespaces(client)
    alone = client.retrieve("a", queries, K, 0.7, keep_state=True, memory_only=True)
    whole = client.retrieve("b", queries, K, 0.7, keep_state=True)
    assert alone.handle and all(getattr(alone, name) is None for name in NEIGHBOURS)
    assert not alone.has_neighbours and whole.has_neighbours
    np.testing.assert_allclose(alone.memory, whole.memory, rtol=1e-6, atol=1e-6)
    got, want = client.retrieve_backward("a", alone, grad), client.retrieve_backward("b", whole, grad)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
    assert got[1] == pytest.approx(want[1], rel=1e-6, abs=1e-7)
    np.testing.assert_array_equal(stored_values(client, "a"), stored_values(client, "b"))
    # On the wire: the answer carries the memory only.
    with grpc.insecure_channel(address) as channel:
        response = pb_grpc.MemoryServiceStub(channel).Retrieve(pb.RetrieveRequest(
            namespace="a", queries=convert.tensor_to_proto(queries), k=K, temperature=0.7, memory_only=True))
    assert response.HasField("memory") and not any(response.HasField(name) for name in NEIGHBOURS)
    assert len(response.SerializeToString()) < BATCH * VALUE_DIM * 4 + 256


def test_a_decode_stream_step_answers_m_alone(service):
    _, client, _, _ = service
    queries, _ = twin_namespaces(client, names=("a",))
    with client.decode() as stream:
        step = stream.retrieve("a", queries[:1], K, 0.7, memory_only=True)
        tensors = stream.retrieve("a", torch.from_numpy(queries[:1]), K, 0.7, memory_only=True, as_tensors=True)
    whole = client.retrieve("a", queries[:1], K, 0.7)
    assert step.ids is None and tensors.ids is None
    np.testing.assert_allclose(step.memory, whole.memory, atol=1e-6)
    np.testing.assert_allclose(tensors.memory.numpy(), whole.memory, atol=1e-6)


def test_a_backward_with_nothing_to_send_is_refused_and_steps_nothing(service):
    router, client, _, _ = service
    queries, grad = twin_namespaces(client, names=("a",))
    before = stored_values(client, "a")
    no_handle = client.retrieve("a", queries, K, 0.7, memory_only=True)
    with pytest.raises(InvalidArgument, match="neither a handle nor neighbours .* keep_state=True"):
        client.retrieve_backward("a", no_handle, grad)
    gone = client.retrieve("a", queries, K, 0.7, keep_state=True, memory_only=True)
    router.forwards.release(gone.handle)
    with pytest.raises(FailedPrecondition, match="retrieve handle .*memory_only.* nothing was stepped; run the "
                                                 "forward again"):
        client.retrieve_backward("a", gone, grad)
    for result in (no_handle, gone):  # the tensors' way says the same
        tensors = client.retrieve("a", torch.from_numpy(queries), K, 0.7, keep_state=bool(result.handle),
                                  memory_only=True, as_tensors=True)
        if result.handle:
            router.forwards.release(tensors.handle)
        with pytest.raises((InvalidArgument, FailedPrecondition), match="memory_only"):
            client.retrieve_backward("a", tensors, torch.from_numpy(grad))
    np.testing.assert_array_equal(stored_values(client, "a"), before)


def test_a_split_forward_that_keeps_state_brings_its_neighbours_for_its_backward(service):
    _, _, split, _ = service
    rng = np.random.default_rng(3)
    split.create_namespace("a", dim=DIM, value_dim=VALUE_DIM, optimizer="sgd", lr=0.1)
    split.add("a", rng.standard_normal((ROWS, DIM)).astype(np.float32), np.arange(ROWS),
              values=rng.standard_normal((ROWS, VALUE_DIM)).astype(np.float32))
    queries = rng.standard_normal((4000, DIM)).astype(np.float32)  # 128 KB of queries: split at 64 KiB
    kept = split.retrieve("a", queries, K, 0.7, keep_state=True, memory_only=True)
    assert not kept.handle and kept.has_neighbours  # split: no state, so the arrays for the backward
    grad_queries, _ = split.retrieve_backward("a", kept, np.ones((4000, VALUE_DIM), np.float32))
    assert grad_queries.shape == (4000, DIM)
    read_only = split.retrieve("a", queries, K, 0.7, memory_only=True)
    assert read_only.ids is None
    np.testing.assert_allclose(read_only.memory[:100], split.retrieve("a", queries[:100], K, 0.7).memory, rtol=1e-5,
                               atol=1e-5)


def test_the_layer_asks_for_m_alone_and_searches_again_when_its_handle_is_gone(service):
    router, client, _, _ = service
    queries, grad = twin_namespaces(client)
    grads = {}
    for name in ("a", "b"):
        layer = MoNIMLayer(client, name, k=K, temperature=0.7)
        assert layer.needs_memory_only
        hidden = torch.from_numpy(queries).reshape(2, BATCH // 2, DIM).requires_grad_(True)
        memory = layer(hidden)
        assert layer.last_result.ids is None and layer.last_result.handle
        if name == "a":
            router.forwards.release(layer.last_result.handle)  # expired, evicted, or its endpoint restarted
        (memory * torch.from_numpy(grad).reshape(memory.shape)).sum().backward()
        grads[name] = (hidden.grad.clone(), layer.log_temperature.grad.clone())
    torch.testing.assert_close(grads["a"][0], grads["b"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads["a"][1], grads["b"][1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stored_values(client, "a"), stored_values(client, "b"), rtol=1e-6, atol=1e-6)
    for options in (dict(mix_knn=True), dict(combiner="adaptive")):  # these read the neighbours too
        assert not MoNIMLayer(client, "a", k=K, **options).needs_memory_only


@pytest.mark.parametrize("memory_only", [True, False])
def test_a_backward_sent_again_after_its_answer_was_lost_gets_it_and_steps_once(service, memory_only):
    """A whole backward by a handle releases the forward's state (it holds the GPU's memory on a device
    path) and keeps its answer: the client's retry of the same step (its first answer lost on the way)
    gets that answer, and nothing steps twice, also where there are no arrays to send instead."""
    router, client, _, _ = service
    queries, grad = twin_namespaces(client)
    once = client.retrieve("b", queries, K, 0.7, keep_state=True)
    want = client.retrieve_backward("b", once, grad)
    assert len(router.forwards) == 0  # released by its backward
    kept = client.retrieve("a", queries, K, 0.7, keep_state=True, memory_only=memory_only)
    real, sent = client._store.retrieve_backward, lose_the_first_answer(client)
    got = client.retrieve_backward("a", kept, grad)
    assert len(sent) == 2 and all(call["handle"] == kept.handle for call in sent)
    assert sent[0]["step_id"] == sent[1]["step_id"]
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
    assert got[1] == pytest.approx(want[1], rel=1e-6, abs=1e-7)
    np.testing.assert_array_equal(stored_values(client, "a"), stored_values(client, "b"))  # stepped once
    assert len(router.forwards) == 0
    client._store.retrieve_backward = real
    if memory_only:  # another step of the same forward: its state went with the first
        with pytest.raises(FailedPrecondition, match="released .its backward was done"):
            client.retrieve_backward("a", kept, grad)
