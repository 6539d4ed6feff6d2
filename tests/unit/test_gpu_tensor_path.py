"""The device path on a GPU: with an in-process store on the model's GPU, Retrieve and its backward take
and give tensors there, nothing goes through the host but the finite check's one flag, and a decoding
step's forward replays one CUDA graph. Skipped without a GPU (run on the GPU machine)."""

import warnings

import numpy as np
import pytest
import torch
from monim.datastore import search_graphs
from monim.model_client.client import MemoryClient
from monim.model_client.layer import MoNIMLayer

from tests.unit.test_learnable_memory import BATCH, DIM, LR, TEMPERATURE, VALUE_DIM, N, dense_reference, make_data

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")]

K = 12


def on_gpu(metric="l2", seed=4):
    keys, values, weights, queries, grad_memory = make_data(seed)
    client = MemoryClient(":memory:", device="cuda")
    client.create_namespace("g", dim=DIM, metric=metric, value_dim=VALUE_DIM, key_dtype="float32", optimizer="sgd",
                            lr=LR)  # float32 keys: the reference is float32
    client.add("g", keys, np.arange(N), values=values, weights=weights)
    return client, (keys, values, weights, queries, grad_memory)


def synchronizations(call):
    """(call's result, the number of times it made the host wait for the GPU)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # (torch's first warning in this mode says the mode is a prototype: not a wait)
    return result, sum("called a synchronizing CUDA operation" in str(w.message) for w in caught)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_a_training_step_on_the_gpu_matches_autograd_and_stays_there(metric):
    client, (keys, values, weights, queries, grad_memory) = on_gpu(metric)
    q, g = torch.from_numpy(queries).cuda(), torch.from_numpy(grad_memory).cuda()
    result = client.retrieve("g", q, K, TEMPERATURE, keep_state=True, as_tensors=True)
    assert all(getattr(result, name).is_cuda for name in ("memory", "ids", "alpha", "distances", "tokens", "weights"))
    ref_m, _, ref_gq, ref_gt, ref_gv = dense_reference(queries, keys, values, weights, result.ids.cpu().numpy(),
                                                       metric, TEMPERATURE, grad_memory)
    np.testing.assert_allclose(result.memory.cpu().numpy(), ref_m, atol=1e-5)
    assert client._store.forwards.bytes > 0
    grad_queries, grad_temperature = client.retrieve_backward("g", result, g)
    assert grad_queries.is_cuda and len(client._store.forwards) == 0  # the state on the GPU went with its step
    assert type(grad_temperature) is float  # (the shard's is a tensor until the step is committed)
    np.testing.assert_allclose(grad_queries.cpu().numpy(), ref_gq, atol=1e-5)
    assert abs(grad_temperature - ref_gt) <= 1e-5 * max(1.0, abs(ref_gt))
    np.testing.assert_allclose(client.get("g", np.arange(N)).values, values - LR * ref_gv, atol=1e-5)


def test_a_decoding_steps_forward_replays_a_graph_waits_once_and_sees_updates():
    client, (keys, values, weights, queries, _) = on_gpu()
    store = client._store.runtime.shards[0].stores["g"]
    steps = [torch.from_numpy(queries[i:i + 1]).cuda() for i in range(6)]
    answers = [client.retrieve("g", q, K, TEMPERATURE, as_tensors=True) for q in steps]
    assert store.graphs.captures == 1 and store.graphs.replays == len(steps) - 1
    answer, waits = synchronizations(lambda: client.retrieve("g", steps[0], K, 0.5, as_tensors=True))
    assert waits == 1  # the finite check's flag; the answer is queued on the GPU, not waited for
    expected = client.retrieve("g", queries[:1], K, 0.5)  # the numpy path (another graph: search only)
    np.testing.assert_allclose(answer.memory.cpu().numpy(), expected.memory, atol=1e-5)  # T is the graph's input
    np.testing.assert_array_equal(answer.ids.cpu().numpy(), expected.ids)
    for q, found in zip(steps, answers):  # each answer its own, not the graph's last output
        ref_m, *_ = dense_reference(q.cpu().numpy(), keys, values, weights, found.ids.cpu().numpy(), "l2",
                                    TEMPERATURE, np.zeros((1, VALUE_DIM), np.float32))
        np.testing.assert_allclose(found.memory.cpu().numpy(), ref_m, atol=1e-5)
    # A value row stepped in place: the next replay reads it.
    first = int(answer.ids[0, 0])
    client.apply_gradients("g", np.array([first]), np.ones((1, VALUE_DIM), np.float32))
    stepped = client.retrieve("g", steps[0], K, 0.5, as_tensors=True)
    assert not torch.equal(stepped.memory, answer.memory)
    eager = search_graphs.ENABLED
    try:
        search_graphs.ENABLED = False
        again = client.retrieve("g", steps[0], K, 0.5, as_tensors=True)
    finally:
        search_graphs.ENABLED = eager
    torch.testing.assert_close(stepped.memory, again.memory, atol=1e-5, rtol=0)


def test_the_layer_reads_the_gpu_store_without_leaving_the_gpu():
    client, (keys, values, weights, queries, grad_memory) = on_gpu()
    layer = MoNIMLayer(client, "g", k=K, temperature=TEMPERATURE).cuda()
    hidden = torch.from_numpy(queries).cuda().reshape(2, BATCH // 2, DIM).requires_grad_(True)
    memory = layer(hidden)
    (memory * torch.from_numpy(grad_memory).cuda().reshape(memory.shape)).sum().backward()
    ids = client.search("g", queries, K).ids  # the forward's neighbours (m alone came back: memory_only)
    ref_m, _, ref_gq, ref_gt, _ = dense_reference(queries, keys, values, weights, ids, "l2", TEMPERATURE, grad_memory)
    np.testing.assert_allclose(memory.detach().reshape(BATCH, VALUE_DIM).cpu().numpy(), ref_m, atol=1e-5)
    np.testing.assert_allclose(hidden.grad.reshape(BATCH, DIM).cpu().numpy(), ref_gq, atol=1e-5)
    with torch.no_grad():  # decoding: one token's hidden state
        for _ in range(3):
            _, waits = synchronizations(lambda: layer(hidden[:1, :1]))
        assert waits == 1
    knnlm = MoNIMLayer(client, "g", k=K, temperature=TEMPERATURE, mode="knnlm").cuda()
    with torch.no_grad():
        for _ in range(3):
            p_knn, waits = synchronizations(lambda: knnlm.knn_distribution(hidden[:1, :1], 1000))
        assert waits == 1 and p_knn.is_cuda
        torch.testing.assert_close(p_knn.sum(), torch.tensor(1.0, device="cuda"))


def test_a_servers_answer_goes_to_the_gpu_in_one_copy_with_every_dtype_intact():
    client, (_, _, _, queries, _) = on_gpu()
    expected = client.retrieve("g", queries[:3], K, TEMPERATURE)  # numpy, as a server's answer comes
    mine = torch.from_numpy(queries[:3]).cuda()
    moved = expected.to_tensors("cuda", mine)
    assert moved.queries is mine
    for name in ("memory", "ids", "alpha", "distances", "tokens", "weights"):
        column = getattr(moved, name)
        assert column.is_cuda and column.dtype == torch.from_numpy(getattr(expected, name)).dtype, name
        np.testing.assert_array_equal(column.cpu().numpy(), getattr(expected, name), err_msg=name)


def test_a_decoding_steps_search_replays_a_graph_of_its_own_and_waits_once():
    client, (_, _, _, queries, _) = on_gpu()
    store = client._store.runtime.shards[0].stores["g"]
    columns = dict(return_keys=True, return_values=True, return_weights=True)
    expected = [client.search("g", queries[i:i + 1], K, **columns) for i in range(4)]  # the host's graph
    host_graphs = store.graphs.captures
    found = [client.search("g", torch.from_numpy(queries[i:i + 1]).cuda(), K, as_tensors=True, **columns)
             for i in range(4)]
    assert store.graphs.captures == host_graphs + 1  # another graph: the answer stays on the device
    query = torch.from_numpy(queries[:1]).cuda()  # (its copy from pageable memory is a wait of its own)
    last, waits = synchronizations(lambda: client.search("g", query, K, as_tensors=True, **columns))
    assert waits == 1
    for answer, numpy_answer in zip(found + [last], expected + expected[:1]):
        for name in ("ids", "distances", "tokens", "keys", "values", "weights"):
            column = getattr(answer, name)
            assert column.is_cuda, name
            np.testing.assert_array_equal(column.cpu().numpy(), getattr(numpy_answer, name), err_msg=name)


def test_a_numpy_training_batch_at_a_lone_gpu_shard_keeps_its_state_on_the_gpu(monkeypatch):
    """The in-process store and a server over it (what a shard's read endpoint is): a batch of numpy
    queries takes the device path, its state stays on the GPU, and its backward by the handle matches
    autograd."""
    from monim.workers import router as router_module
    from monim.workers.server import start_server

    monkeypatch.setattr(router_module, "ONE_ROUND_VALUE_BYTES", 0)  # every batch a training batch
    client, (keys, _, weights, queries, grad_memory) = on_gpu()
    router = client._store
    server, port = start_server(router, port=0)
    try:
        with MemoryClient(f"127.0.0.1:{port}") as remote:
            for reader, memory_only in ((client, False), (remote, False), (remote, True)):
                values = client.get("g", np.arange(N)).values
                ids = client.search("g", queries, K).ids
                result = reader.retrieve("g", queries, K, TEMPERATURE, keep_state=True, memory_only=memory_only)
                assert isinstance(result.memory, np.ndarray) and (result.ids is None) == memory_only
                state = router.forwards.get(result.handle, "g")
                assert state.ids.is_cuda and state.queries.is_cuda
                ref_m, _, ref_gq, ref_gt, ref_gv = dense_reference(queries, keys, values, weights, ids, "l2",
                                                                   TEMPERATURE, grad_memory)
                np.testing.assert_allclose(result.memory, ref_m, atol=1e-5)
                grad_queries, grad_temperature = reader.retrieve_backward("g", result, grad_memory)
                assert isinstance(grad_queries, np.ndarray) and len(router.forwards) == 0
                assert type(grad_temperature) is float
                np.testing.assert_allclose(grad_queries, ref_gq, atol=1e-5)
                assert abs(grad_temperature - ref_gt) <= 1e-5 * max(1.0, abs(ref_gt))
                np.testing.assert_allclose(client.get("g", np.arange(N)).values, values - LR * ref_gv, atol=1e-5)
    finally:
        server.stop(0)


def test_a_retried_backward_of_a_state_kept_on_the_gpu_steps_once(monkeypatch):
    """Through a server over a lone GPU shard: the first backward's answer is lost after the server
    stepped and released the forward's state on the GPU; the client's retry of the same step gets the
    kept answer (memory_only: there are no arrays to send instead), and the rows step once."""
    from monim.workers import router as router_module
    from monim.workers.server import start_server

    from tests.unit.test_memory_only import lose_the_first_answer

    monkeypatch.setattr(router_module, "ONE_ROUND_VALUE_BYTES", 0)
    client, (keys, _, weights, queries, grad_memory) = on_gpu()
    server, port = start_server(client._store, port=0)
    try:
        with MemoryClient(f"127.0.0.1:{port}") as remote:
            values = client.get("g", np.arange(N)).values
            ids = client.search("g", queries, K).ids
            result = remote.retrieve("g", queries, K, TEMPERATURE, keep_state=True, memory_only=True)
            sent = lose_the_first_answer(remote)
            grad_queries, _ = remote.retrieve_backward("g", result, grad_memory)
            assert len(sent) == 2 and len(client._store.forwards) == 0
            _, _, ref_gq, _, ref_gv = dense_reference(queries, keys, values, weights, ids, "l2", TEMPERATURE,
                                                      grad_memory)
            np.testing.assert_allclose(grad_queries, ref_gq, atol=1e-5)
            np.testing.assert_allclose(client.get("g", np.arange(N)).values, values - LR * ref_gv, atol=1e-5)
    finally:
        server.stop(0)


def test_an_array_in_pinned_host_bytes_goes_to_the_gpu_from_where_it_lies(monkeypatch):
    """transfer.host_bytes (where a GPU shard's server copies request tensors): to_device copies from
    it straight to the GPU, no staging copy, and the block is not handed out again before that copy ends
    (a new array of the same size written at once does not reach the first one's tensor)."""
    from monim.datastore import transfer

    staged = []
    monkeypatch.setattr(transfer, "copy_rows", lambda target, source: staged.append(source))
    size = 256 << 20  # the copy to the GPU takes milliseconds: time for a reuse to show
    first = transfer.host_bytes(size)
    first[:] = 7
    array = first.view(np.float32).reshape(-1, 1024)
    on_gpu = transfer.to_device(array, "cuda")
    del first, array
    second = transfer.host_bytes(size)
    second[:] = 9
    torch.cuda.synchronize()
    assert not staged
    assert bool((on_gpu.view(torch.uint8) == 7).all())
    np.testing.assert_array_equal(second[:8], 9)
    small = transfer.host_bytes(1024)  # below PINNED_MIN_BYTES: plain memory
    assert not torch.is_tensor(small.base)


def test_a_gpu_shard_has_its_servers_requests_copied_into_pinned_memory(monkeypatch):
    """A Shard on a GPU sets copy_requests_into(host_bytes): a Search and an ApplyGradients sent through
    shared memory answer and step as the in-process store does."""
    from monim.datastore.transfer import host_bytes
    from monim.protos import shared_memory
    from monim.workers.router import Router
    from monim.workers.runtime import LocalRuntime
    from monim.workers.server import start_server

    monkeypatch.setattr(shared_memory, "_request_memory", None)  # restored after the test
    runtime = LocalRuntime(1, device="cuda")
    assert shared_memory._request_memory is host_bytes
    local = MemoryClient(":memory:", device="cuda")  # (its shard sets the same allocator again)
    given = []  # the sizes the server's requests took (the queries, the gradients)
    shared_memory.copy_requests_into(lambda size: given.append(size) or host_bytes(size))
    server, port = start_server(Router(runtime), port=0)
    rng = np.random.default_rng(5)
    rows, dim = 8192, 256
    keys = rng.standard_normal((rows, dim)).astype(np.float32)
    values = rng.standard_normal((rows, dim)).astype(np.float32)
    try:
        with MemoryClient(f"127.0.0.1:{port}") as remote, local:
            for client in (remote, local):
                client.create_namespace("p", dim=dim, value_dim=dim, key_dtype="float32", optimizer="sgd", lr=0.5)
                client.add("p", keys, np.arange(rows), values=values)
            queries = keys[rng.integers(0, rows, 2048)] + 0.01  # 2 MiB: through a region, into pinned memory
            found, expected = remote.search("p", queries, K), local.search("p", queries, K)
            np.testing.assert_array_equal(found.ids, expected.ids)
            grads = rng.standard_normal((rows, dim)).astype(np.float32)  # 8 MiB
            for client in (remote, local):
                client.apply_gradients("p", np.arange(rows), grads)
            assert queries.nbytes in given and sum(given) >= queries.nbytes + grads.nbytes, given
            np.testing.assert_allclose(remote.get("p", np.arange(rows)).values,
                                       local.get("p", np.arange(rows)).values, atol=1e-6)
    finally:
        server.stop(0)
        runtime.shutdown()


def test_the_backwards_slot_matrix_waits_for_two_sizes_only():
    """memory_ops._Slots on the GPU (the backward's sparse layout of B x k slots, sorted by query, then by
    row for the value gradients): building it, its entries' weights and the value gradients make the host
    wait for the device twice at most, for the number of entries and the number of distinct rows (a boolean
    index of the held slots waited each time it was taken). The same numbers as on the host."""
    from monim.datastore import memory_ops

    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 50, (64, 16), generator=gen)
    rows[torch.rand(64, 16, generator=gen) < 0.3] = -1
    rows, weights, grad, table = (rows.cuda(), torch.rand(64, 16, generator=gen).cuda(),
                                  torch.randn(64, 8, generator=gen).cuda(), torch.randn(50, 8, generator=gen).cuda())

    def build_and_use():
        slots = memory_ops._Slots(rows, 50)
        return slots, slots.entries(weights), slots.per_row(weights, grad)

    (slots, entries, (unique, per_row)), waits = synchronizations(build_and_use)
    assert waits <= 2, waits
    cpu = memory_ops._Slots(rows.cpu(), 50, canonical=True)
    torch.testing.assert_close(entries.cpu(), cpu.entries(weights.cpu()))
    want_unique, want_per_row = cpu.per_row(weights.cpu(), grad.cpu())
    torch.testing.assert_close(unique.cpu(), want_unique)
    torch.testing.assert_close(per_row.cpu(), want_per_row)
    torch.testing.assert_close(slots.sampled_dots(grad, table).cpu(), cpu.sampled_dots(grad.cpu(), table.cpu()))
