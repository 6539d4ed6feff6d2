"""The learnable-memory operations through MemoryClient -> gRPC -> router -> 2 shard actors:
the same numbers as the dense autograd / torch.optim references, and admission and merge."""

import numpy as np
import pytest
from monim.model_client import MemoryClient

from tests.unit.test_learnable_memory import BATCH, DIM, LR, TEMPERATURE, VALUE_DIM, K, N, dense_reference, make_data
from tests.unit.test_optimizers import ROWS, gradient_steps, torch_reference


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_retrieve_and_backward_match_autograd(remote_client, namespace_name, metric):
    keys, values, weights, queries, grad_memory = make_data(seed=1)
    remote_client.create_namespace(namespace_name, dim=DIM, metric=metric, value_dim=VALUE_DIM, optimizer="sgd", lr=LR)
    try:
        remote_client.add(namespace_name, keys, np.arange(N), values=values, weights=weights)
        result = remote_client.retrieve(namespace_name, queries, k=K, temperature=TEMPERATURE)
        ref_m, ref_alpha, ref_gq, ref_gt, ref_gv = dense_reference(queries, keys, values, weights, result.ids, metric,
                                                                   TEMPERATURE, grad_memory)
        np.testing.assert_allclose(result.memory, ref_m, atol=1e-5)
        np.testing.assert_allclose(result.alpha, ref_alpha, atol=1e-5)
        np.testing.assert_array_equal(result.tokens, result.ids.astype(np.int32))
        grad_queries, grad_temperature = remote_client.retrieve_backward(namespace_name, result, grad_memory)
        np.testing.assert_allclose(grad_queries, ref_gq, atol=1e-5)
        assert abs(grad_temperature - ref_gt) <= 1e-5 * max(1.0, abs(ref_gt))
        np.testing.assert_allclose(remote_client.get(namespace_name, np.arange(N)).values, values - LR * ref_gv,
                                   atol=1e-5)
        assert result.memory.shape == (BATCH, VALUE_DIM)
    finally:
        remote_client.drop_namespace(namespace_name)


def test_adam_through_the_service_matches_sparse_adam(remote_client, namespace_name):
    initial = np.random.default_rng(0).standard_normal((ROWS, 6)).astype(np.float32)
    remote_client.create_namespace(namespace_name, dim=2, value_dim=6, optimizer="adam", lr=0.01)
    try:
        remote_client.add(namespace_name, np.zeros((ROWS, 2), np.float32), np.arange(ROWS), values=initial)
        steps = gradient_steps()
        for ids, grads in steps:
            remote_client.apply_gradients(namespace_name, ids, grads)
        expected_values, expected_state, expected_steps = torch_reference("adam", {"lr": 0.01}, initial, steps)
        rows = remote_client.get(namespace_name, np.arange(ROWS), return_optimizer_state=True)
        np.testing.assert_allclose(rows.values, expected_values, atol=1e-5, rtol=1e-5)
        for column, expected in expected_state.items():
            np.testing.assert_allclose(rows.optimizer_state[column], expected, atol=1e-5, rtol=1e-5)
        assert rows.optimizer_state["step"].tolist() == expected_steps.tolist()
    finally:
        remote_client.drop_namespace(namespace_name)


@pytest.mark.parametrize("kind", ["remote", "in-process"])
def test_admission_and_merge(remote_client, namespace_name, kind):
    client = remote_client if kind == "remote" else MemoryClient(":memory:")
    client.create_namespace(namespace_name, dim=8, value_dim=4)
    try:
        rng = np.random.default_rng(2)
        keys = rng.standard_normal((200, 8)).astype(np.float32)
        logp = -rng.uniform(0, 3, 200).astype(np.float32)
        result = client.add(namespace_name, keys, np.arange(200), logp=logp, admit_below=-1.5, details=True)
        hard = logp < -1.5
        np.testing.assert_array_equal(result.admitted, hard)
        assert (result.ids[~hard] == -1).all()
        assert client.describe_namespace(namespace_name).rows == hard.sum()
        again = client.add(namespace_name, keys[hard] + 1e-3, np.arange(200)[hard], merge_eps=1e-3, details=True)
        assert again.merged.all() and (again.ids == result.ids[hard]).all()
        assert client.describe_namespace(namespace_name).rows == hard.sum()
        assert (client.get(namespace_name, result.ids[hard]).weights == 2).all()
    finally:
        client.drop_namespace(namespace_name)
