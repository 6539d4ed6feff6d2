"""The device path: Retrieve and its backward with torch tensors in and out (``as_tensors``), through the
in-process store's router, and the MoNIM layer on it. Same numbers as the numpy path and the dense
autograd reference, the same errors, and nothing stored changed by a refused call. (The GPU side, where
nothing leaves the device, is tests/unit/test_gpu_tensor_path.py.)"""

import dataclasses

import numpy as np
import pytest
import torch
from monim.datastore import NamespaceConfig, NeighborStore
from monim.model_client.client import MemoryClient
from monim.model_client.layer import MoNIMLayer
from monim.protos.errors import FailedPrecondition, InvalidArgument
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime

from tests.unit.test_learnable_memory import BATCH, DIM, LR, TEMPERATURE, VALUE_DIM, N, dense_reference, make_data

K = 12
COLUMNS = ("memory", "ids", "alpha", "distances", "tokens", "weights")


def in_process(metric="l2", seed=0):
    keys, values, weights, queries, grad_memory = make_data(seed)
    client = MemoryClient(":memory:")
    client.create_namespace("mem", dim=DIM, metric=metric, value_dim=VALUE_DIM, optimizer="sgd", lr=LR)
    client.add("mem", keys, np.arange(N), values=values, weights=weights)
    return client, (keys, values, weights, queries, grad_memory)


def stored_values(client):
    return client.get("mem", np.arange(N)).values


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_tensors_in_and_out_match_the_numpy_path_and_autograd(metric):
    client, (keys, values, weights, queries, grad_memory) = in_process(metric)
    twin, _ = in_process(metric)
    result = client.retrieve("mem", torch.from_numpy(queries), K, TEMPERATURE, keep_state=True, as_tensors=True)
    expected = twin.retrieve("mem", queries, K, TEMPERATURE, keep_state=True)
    assert result.tensors and not expected.tensors and result.handle
    for name in COLUMNS:
        column = getattr(result, name)
        assert isinstance(column, torch.Tensor) and column.dtype == torch.from_numpy(getattr(expected, name)).dtype
        np.testing.assert_allclose(column.numpy(), getattr(expected, name), atol=1e-6, err_msg=name)
    ref_m, ref_alpha, ref_gq, ref_gt, ref_gv = dense_reference(queries, keys, values, weights, expected.ids, metric,
                                                               TEMPERATURE, grad_memory)
    np.testing.assert_allclose(result.memory.numpy(), ref_m, atol=1e-5)
    grad_queries, grad_temperature = client.retrieve_backward("mem", result, torch.from_numpy(grad_memory))
    assert isinstance(grad_queries, torch.Tensor) and grad_queries.dtype == torch.float32
    np.testing.assert_allclose(grad_queries.numpy(), ref_gq, atol=1e-5)
    assert abs(grad_temperature - ref_gt) <= 1e-5 * max(1.0, abs(ref_gt))
    np.testing.assert_allclose(stored_values(client), values - LR * ref_gv, atol=1e-5)  # one SGD step, as autograd's
    twin.retrieve_backward("mem", expected, grad_memory)
    np.testing.assert_allclose(stored_values(client), stored_values(twin), atol=1e-6)


def test_a_backward_whose_handle_is_gone_and_one_that_steps_nothing_go_through_the_host():
    client, (keys, values, weights, queries, grad_memory) = in_process()
    result = client.retrieve("mem", torch.from_numpy(queries), K, TEMPERATURE, keep_state=True, as_tensors=True)
    _, _, ref_gq, ref_gt, ref_gv = dense_reference(queries, keys, values, weights, result.ids.numpy(), "l2",
                                                   TEMPERATURE, grad_memory)
    grad_queries, grad_temperature = client.retrieve_backward("mem", result, torch.from_numpy(grad_memory),
                                                              step_values=False)
    assert isinstance(grad_queries, torch.Tensor)
    np.testing.assert_allclose(grad_queries.numpy(), ref_gq, atol=1e-5)
    np.testing.assert_array_equal(stored_values(client), values)  # read only
    forgotten = dataclasses.replace(result, handle="0" * 16)  # as one the front end forgot (expired, evicted)
    grad_queries, grad_temperature = client.retrieve_backward("mem", forgotten, torch.from_numpy(grad_memory))
    np.testing.assert_allclose(grad_queries.numpy(), ref_gq, atol=1e-5)
    assert abs(grad_temperature - ref_gt) <= 1e-5 * max(1.0, abs(ref_gt))
    np.testing.assert_allclose(stored_values(client), values - LR * ref_gv, atol=1e-5)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_several_shards_answer_tensors_through_the_host(metric):
    keys, values, weights, queries, grad_memory = make_data()
    router = Router(LocalRuntime(3))
    router.create_namespace(NamespaceConfig("mem", dim=DIM, metric=metric, value_dim=VALUE_DIM,
                                            optimizer={"name": "sgd", "lr": LR}))
    router.add("mem", keys, np.arange(N), values=values, weights=weights)
    result = router.retrieve("mem", torch.from_numpy(queries), K, TEMPERATURE, keep_state=True)
    assert isinstance(result.memory, torch.Tensor) and result.handle
    ref_m, _, ref_gq, ref_gt, ref_gv = dense_reference(queries, keys, values, weights, result.ids.numpy(), metric,
                                                       TEMPERATURE, grad_memory)
    np.testing.assert_allclose(result.memory.numpy(), ref_m, atol=1e-5)
    grad_queries, grad_temperature = router.retrieve_backward("mem", None, None, None, None,
                                                              torch.from_numpy(grad_memory), TEMPERATURE,
                                                              handle=result.handle)
    assert isinstance(grad_queries, torch.Tensor)
    np.testing.assert_allclose(grad_queries.numpy(), ref_gq, atol=1e-5)
    assert abs(grad_temperature - ref_gt) <= 1e-5 * max(1.0, abs(ref_gt))
    np.testing.assert_allclose(router.get("mem", np.arange(N)).values, values - LR * ref_gv, atol=1e-5)


def test_the_layer_trains_through_tensors_as_autograd_says():
    client, (keys, values, weights, queries, grad_memory) = in_process()
    layer = MoNIMLayer(client, "mem", k=K, temperature=TEMPERATURE)
    hidden = torch.from_numpy(queries).reshape(2, BATCH // 2, DIM).requires_grad_(True)
    memory = layer(hidden)
    assert layer.last_result.tensors and memory.shape == (2, BATCH // 2, VALUE_DIM)
    assert layer.last_result.ids is None  # m is all the layer reads: it asks for m alone (memory_only)
    (memory * torch.from_numpy(grad_memory).reshape(memory.shape)).sum().backward()
    ids = client.search("mem", queries, K).ids  # the forward's neighbours (the keys did not change)
    ref_m, _, ref_gq, ref_gt, ref_gv = dense_reference(queries, keys, values, weights, ids, "l2", TEMPERATURE,
                                                       grad_memory)
    np.testing.assert_allclose(memory.detach().reshape(BATCH, VALUE_DIM).numpy(), ref_m, atol=1e-5)
    np.testing.assert_allclose(hidden.grad.reshape(BATCH, DIM).numpy(), ref_gq, atol=1e-5)
    # d/d(log T) = T dL/dT
    assert layer.log_temperature.grad.item() == pytest.approx(TEMPERATURE * ref_gt, rel=1e-4, abs=1e-5)
    np.testing.assert_allclose(stored_values(client), values - LR * ref_gv, atol=1e-5)


def test_a_decode_stream_of_the_in_process_store_answers_tensors():
    client, (_, _, _, queries, _) = in_process()
    with client.decode() as stream:
        found = stream.retrieve("mem", torch.from_numpy(queries[:1]), K, TEMPERATURE, as_tensors=True)
    expected = client.retrieve("mem", queries[:1], K, TEMPERATURE)
    assert isinstance(found.memory, torch.Tensor)
    np.testing.assert_allclose(found.memory.numpy(), expected.memory, atol=1e-6)
    np.testing.assert_array_equal(found.ids.numpy(), expected.ids)


def test_bfloat16_and_float64_queries_are_read_in_float32():
    client, (_, _, _, queries, _) = in_process()
    expected = client.retrieve("mem", queries, K, TEMPERATURE)
    wide = client.retrieve("mem", torch.from_numpy(queries).double(), K, TEMPERATURE, as_tensors=True)
    np.testing.assert_allclose(wide.memory.numpy(), expected.memory, atol=1e-6)
    narrow = client.retrieve("mem", torch.from_numpy(queries).bfloat16(), K, TEMPERATURE, as_tensors=True)
    assert narrow.memory.dtype == torch.float32 and narrow.ids.shape == (BATCH, K)


@pytest.mark.parametrize("queries,message", [
    (torch.tensor([[0.0] * DIM, [float("nan")] + [0.0] * (DIM - 1)]), "queries contain NaN or Inf (first at row 1)"),
    (torch.zeros(2, DIM, dtype=torch.int32), "queries have dtype int32; expected float32 or float16"),
    (torch.zeros(2, DIM + 1), f"queries have width {DIM + 1} but the namespace's dim is {DIM}"),
    (torch.zeros(DIM), f"queries must be 2-D [N, dim], got shape [{DIM}]"),
    (torch.zeros(0, DIM), "queries is an empty batch"),
    (np.zeros((2, DIM), np.float32), "as_tensors takes queries as a torch tensor, got ndarray"),
])
def test_bad_queries_on_the_device_path_are_refused_as_on_the_numpy_path(queries, message):
    client, (_, values, _, _, _) = in_process()
    with pytest.raises(InvalidArgument) as refused:
        client.retrieve("mem", queries, K, TEMPERATURE, keep_state=True, as_tensors=True)
    assert refused.value.message == message
    assert refused.value.code == "INVALID_ARGUMENT"
    if isinstance(queries, torch.Tensor) and queries.dtype == torch.float32 and queries.ndim == 2 and len(queries):
        with pytest.raises(InvalidArgument) as on_numpy:  # the numpy path says the same
            client.retrieve("mem", queries.numpy(), K, TEMPERATURE)
        assert on_numpy.value.message == message
    assert len(client._store.forwards) == 0  # no state kept
    np.testing.assert_array_equal(stored_values(client), values)


@pytest.mark.parametrize("grad,message", [
    (torch.full((BATCH, VALUE_DIM), float("inf")), "grad_memory contain NaN or Inf (first at row 0)"),
    (torch.zeros(BATCH, VALUE_DIM + 1), f"grad_memory have width {VALUE_DIM + 1} but the namespace's value_dim is "
                                        f"{VALUE_DIM}"),
    (torch.zeros(BATCH - 1, VALUE_DIM), f"grad_memory has {BATCH - 1} rows but there are {BATCH} queries"),
    (np.zeros((BATCH, VALUE_DIM), np.float32), "the backward of an as_tensors forward takes grad_memory as a torch "
                                               "tensor, got ndarray"),
])
def test_bad_gradients_on_the_device_path_step_nothing(grad, message):
    client, (_, values, _, queries, grad_memory) = in_process()
    result = client.retrieve("mem", torch.from_numpy(queries), K, TEMPERATURE, keep_state=True, as_tensors=True)
    with pytest.raises(InvalidArgument) as refused:
        client.retrieve_backward("mem", result, grad)
    assert refused.value.message == message
    np.testing.assert_array_equal(stored_values(client), values)
    client.retrieve_backward("mem", result, torch.from_numpy(grad_memory))  # the forward's state is still there
    assert not np.array_equal(stored_values(client), values)


def test_a_backward_with_fewer_rows_than_its_forward_is_refused_on_the_numpy_path_too():
    """It was taken as the forward's first rows (a part by row_offset) and stepped them, silently."""
    client, (_, values, _, queries, grad_memory) = in_process()
    result = client.retrieve("mem", queries, K, TEMPERATURE, keep_state=True)
    for grad in (grad_memory[:-1], np.concatenate([grad_memory, grad_memory[:1]])):
        with pytest.raises(InvalidArgument) as refused:
            client.retrieve_backward("mem", result, grad)
        assert refused.value.message == f"grad_memory has {len(grad)} rows but there are {BATCH} queries"
    np.testing.assert_array_equal(stored_values(client), values)


def test_the_layer_reads_a_new_temperature_after_each_change_of_log_t():
    """T goes to the store as a float, read again from the parameter only when it changed (its version)."""
    client, (_, _, _, queries, _) = in_process()
    layer = MoNIMLayer(client, "mem", k=K, temperature=TEMPERATURE)
    hidden = torch.from_numpy(queries[None])
    optimizer = torch.optim.SGD([layer.log_temperature], lr=0.5)
    for _ in range(3):
        memory = layer(hidden)
        expected = client.retrieve("mem", queries, K, float(layer.temperature.detach()))
        np.testing.assert_allclose(memory[0].detach().numpy(), expected.memory, atol=1e-6)
        memory.sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        layer.log_temperature.fill_(0.0)  # in place, as load_state_dict does
    np.testing.assert_allclose(layer(hidden)[0].detach().numpy(), client.retrieve("mem", queries, K, 1.0).memory,
                               atol=1e-6)
    assert layer.temperature_value() == 1.0


def test_the_stores_forward_answers_tensors_where_it_is_given_one():
    """NeighborStore.forward's device branch (the one a GPU store runs; the router sends a host tensor the
    host's way), here on the host: tensors with the numpy branch's numbers, rows kept for a backward."""
    keys, values, weights, queries, _ = make_data()
    store = NeighborStore(NamespaceConfig("mem", dim=DIM, value_dim=VALUE_DIM), backend="torch")
    store.add(keys, np.arange(N), values=values, weights=weights)
    found, alpha, memory = store.forward(torch.from_numpy(queries), K, TEMPERATURE, keep_rows="step")
    expected, expected_alpha, expected_memory = store.forward(queries, K, TEMPERATURE)
    for name in ("ids", "distances", "tokens", "weights"):
        assert isinstance(getattr(found, name), torch.Tensor), name
        np.testing.assert_array_equal(getattr(found, name).numpy(), getattr(expected, name), err_msg=name)
    np.testing.assert_allclose(alpha.numpy(), expected_alpha, atol=1e-7)
    np.testing.assert_allclose(memory.numpy(), expected_memory, atol=1e-6)
    assert store.kept_rows.get("step", store.rows.removals)["rows"].shape == (BATCH, K)
    with pytest.raises(InvalidArgument, match=r"queries contain NaN or Inf \(first at row 3\)"):
        store.forward(torch.from_numpy(queries).index_fill(0, torch.tensor([3]), float("nan")), K, TEMPERATURE)


def test_a_search_with_tensors_answers_as_the_numpy_one():
    client, (_, _, _, queries, _) = in_process()
    expected = client.search("mem", queries, K, return_keys=True, return_values=True, return_weights=True)
    with client.decode() as stream:
        for found in (client.search("mem", torch.from_numpy(queries), K, return_keys=True, return_values=True,
                                    return_weights=True, as_tensors=True),
                      stream.search("mem", torch.from_numpy(queries), K, return_keys=True, return_values=True,
                                    return_weights=True, as_tensors=True)):
            assert found.tensors
            for name in ("ids", "distances", "tokens", "keys", "values", "weights"):
                assert isinstance(getattr(found, name), torch.Tensor), name
                np.testing.assert_array_equal(getattr(found, name).numpy(), getattr(expected, name), err_msg=name)
    with pytest.raises(InvalidArgument, match=r"queries contain NaN or Inf \(first at row 0\)"):
        client.search("mem", torch.full((1, DIM), float("inf")), K, as_tensors=True)
    with pytest.raises(InvalidArgument, match="k must be an integer, got 2.0"):
        client.search("mem", torch.from_numpy(queries), 2.0, as_tensors=True)


def test_the_stores_search_answers_tensors_where_it_is_given_one():
    keys, values, weights, queries, _ = make_data()
    store = NeighborStore(NamespaceConfig("mem", dim=DIM, value_dim=VALUE_DIM), backend="torch")
    for _ in range(2):  # an empty store, then a full one
        columns = dict(return_keys=True, return_values=True, return_weights=True)
        found = store.search(torch.from_numpy(queries), K, **columns)
        expected = store.search(queries, K, **columns)
        for name in ("ids", "distances", "tokens", "keys", "values", "weights"):
            assert isinstance(getattr(found, name), torch.Tensor), name
            np.testing.assert_array_equal(getattr(found, name).numpy(), getattr(expected, name), err_msg=name)
        store.add(keys, np.arange(N), values=values, weights=weights)


def test_a_device_forwards_state_goes_when_its_step_is_done():
    """On a GPU a kept forward's state is the device's memory: released by its backward, not held for
    the handle's 300 s (a host tensor's state is the host's, kept as the numpy path's)."""
    keys, values, weights, queries, grad_memory = make_data()
    router = Router(LocalRuntime(1))
    router.create_namespace(NamespaceConfig("mem", dim=DIM, value_dim=VALUE_DIM, optimizer={"name": "sgd", "lr": LR}))
    router.add("mem", keys, np.arange(N), values=values, weights=weights)
    result = router.retrieve("mem", torch.from_numpy(queries), K, TEMPERATURE, keep_state=True)
    state = router.forwards.get(result.handle, "mem")
    router.forwards.keep("mem", state.generation, torch.from_numpy(state.queries), torch.from_numpy(state.ids),
                         torch.from_numpy(state.alpha), torch.from_numpy(state.distances), state.temperature)
    handle = next(reversed(router.forwards._states))  # the same forward, as a device path keeps it: tensors
    router.retrieve_backward("mem", None, None, None, None, torch.from_numpy(grad_memory), TEMPERATURE,
                             handle=handle)
    assert len(router.forwards) == 1 and router.forwards.bytes == state.nbytes  # the host one stays
    with pytest.raises(FailedPrecondition, match="released"):
        router.retrieve_backward("mem", None, None, None, None, torch.from_numpy(grad_memory), TEMPERATURE,
                                 handle=handle)


def test_a_lone_shards_finished_backward_of_a_device_forward_answers_dl_dt_unwaited():
    """Shard.backward_part with finish (a lone shard's backward, finished where its rows are): for a device
    path's forward (its queries a tensor in this process) dL/dq and dL/dT stay tensors, so that the router
    queues the step's commit before anything waits for the device; for numpy queries, a numpy array and a
    float, as a Ray actor answers. Both the same numbers."""
    client, (_, _, _, queries, grad_memory) = in_process()
    router = client._store
    found = client.retrieve("mem", queries, K, TEMPERATURE)
    shard, generation = router.runtime.shards[0], router.config("mem").generation
    answers = {}
    for name, q in (("numpy", found.queries), ("tensor", torch.from_numpy(found.queries))):
        answers[name] = shard.backward_part("mem", generation, f"step-{name}", 0, q, found.ids, found.alpha,
                                            found.distances, grad_memory, finish=("l2", TEMPERATURE))
        shard.abort_step("mem", generation, f"step-{name}")  # staged only: nothing steps
    (numpy_dq, numpy_dt), (tensor_dq, tensor_dt) = answers["numpy"], answers["tensor"]
    assert isinstance(numpy_dq, np.ndarray) and type(numpy_dt) is float
    assert torch.is_tensor(tensor_dq) and torch.is_tensor(tensor_dt) and tensor_dt.dim() == 0
    np.testing.assert_array_equal(tensor_dq.numpy(), numpy_dq)
    assert float(tensor_dt) == numpy_dt
    result = client.retrieve("mem", torch.from_numpy(queries), K, TEMPERATURE, keep_state=True, as_tensors=True)
    assert type(client.retrieve_backward("mem", result, torch.from_numpy(grad_memory))[1]) is float
