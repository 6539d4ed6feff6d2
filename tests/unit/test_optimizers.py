"""The store's sparse optimizers against torch.optim on the same sparse gradients, 20 steps with
repeated ids, in one store and across 3 in-process shards (values and optimizer state to 1e-5)."""

import numpy as np
import pytest
import torch
from monim.datastore import NamespaceConfig, NeighborStore
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime

ROWS, VALUE_DIM, STEPS = 40, 6, 20


def gradient_steps(seed=3):
    """20 steps of (ids with repeats, grads)."""
    rng = np.random.default_rng(seed)
    steps = []
    for _ in range(STEPS):
        ids = rng.integers(0, ROWS, rng.integers(5, 25))
        steps.append((ids.astype(np.int64), rng.standard_normal((ids.size, VALUE_DIM)).astype(np.float32)))
    return steps


def torch_reference(optimizer: str, options: dict, initial: np.ndarray, steps):
    """(values, state by our column names) after torch.optim on sparse gradients."""
    if optimizer == "sgd" and options.get("momentum"):
        # torch's SGD takes no sparse gradient with momentum; one Parameter per row with grad=None on
        # untouched rows is the same sparse semantics (a row's buffer moves only when touched).
        params = [torch.nn.Parameter(torch.tensor(row)) for row in initial]
        opt = torch.optim.SGD(params, lr=options["lr"], momentum=options["momentum"])
        for ids, grads in steps:
            dense = np.zeros_like(initial)
            np.add.at(dense, ids, grads)
            for row, param in enumerate(params):
                param.grad = torch.tensor(dense[row]) if row in set(ids.tolist()) else None
            opt.step()
        buffers = np.stack([opt.state[p]["momentum_buffer"].numpy() if p in opt.state else np.zeros(VALUE_DIM)
                            for p in params])
        return np.stack([p.detach().numpy() for p in params]), {"momentum_buffer": buffers}
    param = torch.nn.Parameter(torch.tensor(initial))
    cls = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "adam": torch.optim.SparseAdam}[optimizer]
    opt = cls([param], **options)
    for ids, grads in steps:
        param.grad = torch.sparse_coo_tensor(torch.from_numpy(ids)[None], torch.from_numpy(grads), initial.shape,
                                             check_invariants=True)
        opt.step()
    state = opt.state[param]
    names = {"adagrad": {"sum": "sum"}, "adam": {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}}.get(optimizer, {})
    return param.detach().numpy(), {ours: state[theirs].numpy() for ours, theirs in names.items()}


CASES = [
    ("sgd", {"lr": 0.05}),
    ("sgd", {"lr": 0.05, "momentum": 0.9}),
    ("adagrad", {"lr": 0.1}),
    ("adagrad", {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1}),
    ("adam", {"lr": 0.01}),
    ("adam", {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6}),
]


def our_options(name, options):
    ours = {k: v for k, v in options.items() if k != "betas"}
    if "betas" in options:
        ours["beta1"], ours["beta2"] = options["betas"]
    return dict(ours, name=name)


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("name, options", CASES)
def test_matches_torch_optim(name, options, shards):
    initial = np.random.default_rng(0).standard_normal((ROWS, VALUE_DIM)).astype(np.float32)
    config = NamespaceConfig("opt", dim=2, value_dim=VALUE_DIM, optimizer=our_options(name, options))
    keys = np.zeros((ROWS, 2), np.float32)
    if shards == 1:
        store = NeighborStore(config)
        store.add(keys, np.arange(ROWS), values=initial)
        apply, get = store.apply_gradients, lambda: store.get(np.arange(ROWS), return_optimizer_state=True)
    else:
        router = Router(LocalRuntime(shards))
        router.create_namespace(config)
        router.add("opt", keys, np.arange(ROWS), values=initial)
        apply = lambda ids, grads: router.apply_gradients("opt", ids, grads)  # noqa: E731
        get = lambda: router.get("opt", np.arange(ROWS), return_optimizer_state=True)  # noqa: E731
    steps = gradient_steps()
    for ids, grads in steps:
        assert apply(ids, grads) == np.unique(ids).size
    expected_values, expected_state = torch_reference(name, options, initial, steps)
    rows = get()
    np.testing.assert_allclose(rows.values, expected_values, atol=1e-5, rtol=1e-5)
    for column, expected in expected_state.items():
        np.testing.assert_allclose(rows.optimizer_state[column], expected, atol=1e-5, rtol=1e-5, err_msg=column)
    assert rows.optimizer_state["step"].tolist() == [STEPS]


def test_untouched_rows_never_change():
    store = NeighborStore(NamespaceConfig("opt", dim=2, value_dim=3, optimizer={"name": "adam", "lr": 0.1}))
    initial = np.ones((5, 3), np.float32)
    store.add(np.zeros((5, 2), np.float32), np.arange(5), values=initial)
    for _ in range(5):
        store.apply_gradients(np.array([1, 3]), np.ones((2, 3), np.float32))
    rows = store.get(np.arange(5), return_optimizer_state=True)
    assert (rows.values[[0, 2, 4]] == 1).all() and (rows.values[[1, 3]] < 1).all()
    assert (rows.optimizer_state["exp_avg"][[0, 2, 4]] == 0).all()


def test_gradient_clipping_bounds_each_row():
    store = NeighborStore(NamespaceConfig("opt", dim=2, value_dim=2,
                                          optimizer={"name": "sgd", "lr": 1.0, "max_grad_norm": 0.5}))
    store.add(np.zeros((2, 2), np.float32), np.arange(2), values=np.zeros((2, 2), np.float32))
    store.apply_gradients(np.array([0, 0, 1]), np.array([[3, 0], [0, 4], [0.1, 0]], np.float32))
    values = store.get(np.arange(2)).values
    np.testing.assert_allclose(np.linalg.norm(values[0]), 0.5, atol=1e-5)  # (3, 4) summed, then clipped
    np.testing.assert_allclose(values[1], [-0.1, 0], atol=1e-6)  # under the bound: unchanged gradient
