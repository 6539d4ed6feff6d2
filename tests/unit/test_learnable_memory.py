"""Retrieve forward/backward against a dense PyTorch autograd reference of the same formula,
in one store and across 3 in-process shards, for l2 and ip (acceptance: 1e-5 in float32)."""

import numpy as np
import pytest
import torch
from monim.datastore import NamespaceConfig, NeighborStore
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime

N, DIM, VALUE_DIM, BATCH, K, TEMPERATURE, LR = 600, 16, 8, 24, 12, 2.5, 0.1


def dense_reference(queries, keys, values, weights, ids, metric, temperature, grad_memory):
    """m, dL/dq, dL/dT, dL/dV by torch autograd over the given neighbour ids (all entries as Parameters)."""
    q = torch.tensor(queries, dtype=torch.float32, requires_grad=True)
    t = torch.tensor(temperature, dtype=torch.float32, requires_grad=True)
    v = torch.tensor(values, requires_grad=True)
    index = torch.from_numpy(ids)
    k = torch.tensor(keys)[index]
    d = ((q[:, None, :] - k) ** 2).sum(-1) if metric == "l2" else -(q[:, None, :] * k).sum(-1)
    alpha = torch.softmax(-d / t + torch.log(torch.tensor(weights)[index]), dim=1)
    memory = (alpha[:, :, None] * v[index]).sum(1)
    (memory * torch.tensor(grad_memory)).sum().backward()
    return memory.detach().numpy(), alpha.detach().numpy(), q.grad.numpy(), t.grad.item(), v.grad.numpy()


def make_data(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((N, DIM)).astype(np.float32), rng.standard_normal((N, VALUE_DIM)).astype(np.float32),
            rng.uniform(1, 4, N).astype(np.float32), rng.standard_normal((BATCH, DIM)).astype(np.float32),
            rng.standard_normal((BATCH, VALUE_DIM)).astype(np.float32))


class Sharded:
    def __init__(self, config, shards):
        self.router = Router(LocalRuntime(shards))
        self.router.create_namespace(config)
        self.name = config.name

    def add(self, *args, **kwargs):
        return self.router.add(self.name, *args, **kwargs).ids

    def retrieve(self, *args):
        return self.router.retrieve(self.name, *args)

    def backward(self, *args):
        return self.router.retrieve_backward(self.name, *args)

    def values(self):
        return self.router.get(self.name, np.arange(N)).values


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_forward_and_backward_match_autograd(metric, shards):
    keys, values, weights, queries, grad_memory = make_data()
    config = NamespaceConfig("mem", dim=DIM, metric=metric, value_dim=VALUE_DIM, optimizer={"name": "sgd", "lr": LR})
    memory = Sharded(config, shards)
    memory.add(keys, np.arange(N), values=values, weights=weights)
    result = memory.retrieve(queries, K, TEMPERATURE)
    ref_m, ref_alpha, ref_gq, ref_gt, ref_gv = dense_reference(queries, keys, values, weights, result.ids, metric,
                                                               TEMPERATURE, grad_memory)
    np.testing.assert_allclose(result.memory, ref_m, atol=1e-5)
    np.testing.assert_allclose(result.alpha, ref_alpha, atol=1e-5)
    grad_queries, grad_temperature = memory.backward(queries, result.ids, result.alpha, result.distances,
                                                     grad_memory, TEMPERATURE)
    np.testing.assert_allclose(grad_queries, ref_gq, atol=1e-5)
    assert abs(grad_temperature - ref_gt) <= 1e-5 * max(1.0, abs(ref_gt))
    # SGD with lr 0.1: every touched row moved by -lr * its summed gradient, the others not at all.
    np.testing.assert_allclose(memory.values(), values - LR * ref_gv, atol=1e-5)
    assert (np.abs(ref_gv).sum(1) > 0).sum() < N  # some rows untouched, so sparsity is being checked


def test_rows_with_fewer_neighbours_than_k_get_zero_weight_slots():
    store = Sharded(NamespaceConfig("mem", dim=4, value_dim=2), 1)
    store.add(np.eye(4, dtype=np.float32)[:2], np.arange(2), values=np.array([[1, 0], [0, 1]], np.float32))
    result = store.retrieve(np.ones((3, 4), np.float32), 5, 1.0)
    assert (result.ids[:, 2:] == -1).all() and (result.alpha[:, 2:] == 0).all()
    np.testing.assert_allclose(result.alpha.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(result.memory, 0.5, atol=1e-6)  # two equidistant neighbours


def test_empty_store_gives_zero_memory_and_zero_gradients():
    store = Sharded(NamespaceConfig("mem", dim=4, value_dim=2), 2)
    result = store.retrieve(np.ones((2, 4), np.float32), 3, 1.0)
    assert (result.memory == 0).all() and (result.alpha == 0).all()
    grad_q, grad_t = store.backward(result.queries, result.ids, result.alpha, result.distances,
                                    np.ones((2, 2), np.float32), 1.0)
    assert (grad_q == 0).all() and grad_t == 0.0


def test_weights_enter_scores_as_log_w():
    store = Sharded(NamespaceConfig("mem", dim=2, value_dim=1), 1)
    store.add(np.array([[1, 0], [-1, 0]], np.float32), np.arange(2), values=np.array([[1], [0]], np.float32),
              weights=np.array([3.0, 1.0], np.float32))
    result = store.retrieve(np.zeros((1, 2), np.float32), 2, 1.0)  # equidistant: alpha = w / sum w
    np.testing.assert_allclose(result.memory, [[0.75]], atol=1e-6)


def test_updates_and_searches_at_the_same_time_never_show_torn_rows():
    """Every update moves all elements of a row together, so a reader that sees a row whose
    elements differ has seen a half-written row."""
    import threading

    store = NeighborStore(NamespaceConfig("mem", dim=4, value_dim=64, optimizer={"name": "sgd", "lr": 1.0}))
    store.add(np.random.default_rng(0).standard_normal((500, 4)).astype(np.float32), np.arange(500),
              values=np.zeros((500, 64), np.float32))
    stop = threading.Event()
    torn = []

    def writer():
        while not stop.is_set():
            store.step(np.arange(500), np.ones((500, 64), np.float32))

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(200):
            values = store.search(np.ones((8, 4), np.float32), 50, return_values=True).values
            torn.append(int((values.max(axis=2) != values.min(axis=2)).sum()))
    finally:
        stop.set()
        thread.join()
    assert sum(torn) == 0
    assert store.get(np.array([0])).values[0, 0] < 0  # the writer did run
