"""The store's sparse optimizers against torch.optim on the same sparse gradients, 20 steps with
repeated ids, on 1 and 3 in-process shards (values, optimizer state and per-row steps to 1e-5)."""

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
    """(values, state by our column names, steps per row) after torch.optim with one Parameter per
    row: a row untouched by a step has grad None, so its state and its step count stay (the store
    counts steps per row, as if each row were its own parameter)."""
    params = [torch.nn.Parameter(torch.tensor(row)) for row in initial]
    cls = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "adam": torch.optim.SparseAdam}[optimizer]
    opt = cls(params, **options)
    for ids, grads in steps:
        dense = np.zeros_like(initial)
        np.add.at(dense, ids, grads)
        touched = set(ids.tolist())
        for row, param in enumerate(params):
            grad = torch.tensor(dense[row]) if row in touched else None
            if grad is not None and optimizer == "adam":  # SparseAdam takes sparse gradients only
                grad = torch.sparse_coo_tensor(torch.arange(VALUE_DIM)[None], grad, (VALUE_DIM,))
            param.grad = grad
        opt.step()
    names = {"sgd": {"momentum_buffer": "momentum_buffer"} if options.get("momentum") else {},
             "adagrad": {"sum": "sum"}, "adam": {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}}[optimizer]
    state = {ours: np.stack([opt.state[p][theirs].numpy() if p in opt.state else np.zeros(VALUE_DIM, np.float32)
                             for p in params]) for ours, theirs in names.items()}
    touched_steps = np.zeros(len(params), np.int64)
    for ids, _ in steps:
        touched_steps[np.unique(ids)] += 1
    return np.stack([p.detach().numpy() for p in params]), state, touched_steps


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
    router = Router(LocalRuntime(shards))
    router.create_namespace(config)
    router.add("opt", np.zeros((ROWS, 2), np.float32), np.arange(ROWS), values=initial)
    steps = gradient_steps()
    for ids, grads in steps:
        assert router.apply_gradients("opt", ids, grads) == np.unique(ids).size
    expected_values, expected_state, expected_steps = torch_reference(name, options, initial, steps)
    rows = router.get("opt", np.arange(ROWS), return_optimizer_state=True)
    np.testing.assert_allclose(rows.values, expected_values, atol=1e-5, rtol=1e-5)
    for column, expected in expected_state.items():
        np.testing.assert_allclose(rows.optimizer_state[column], expected, atol=1e-5, rtol=1e-5, err_msg=column)
    assert rows.optimizer_state["step"].tolist() == expected_steps.tolist()


def test_a_row_added_late_takes_the_first_step_of_a_fresh_parameter():
    """Adam's bias correction counts the row's own steps: after 10 steps of other rows, a new
    row's first update equals torch.optim.SparseAdam's first step on a fresh parameter."""
    router = Router(LocalRuntime(2))
    router.create_namespace(NamespaceConfig("late", dim=2, value_dim=VALUE_DIM, optimizer={"name": "adam", "lr": 0.01}))
    router.add("late", np.zeros((4, 2), np.float32), np.arange(4), values=np.zeros((4, VALUE_DIM), np.float32))
    grads = np.random.default_rng(1).standard_normal((1, VALUE_DIM)).astype(np.float32)
    for _ in range(10):
        router.apply_gradients("late", np.array([0]), grads)
    late = router.add("late", np.zeros((1, 2), np.float32), np.array([9]), values=np.zeros((1, VALUE_DIM), np.float32)).ids
    router.apply_gradients("late", late, grads)
    fresh = torch.nn.Parameter(torch.zeros(VALUE_DIM))
    opt = torch.optim.SparseAdam([fresh], lr=0.01)
    fresh.grad = torch.sparse_coo_tensor(torch.arange(VALUE_DIM)[None], torch.from_numpy(grads[0]), (VALUE_DIM,))
    opt.step()
    np.testing.assert_allclose(router.get("late", late).values[0], fresh.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_untouched_rows_never_change():
    store = NeighborStore(NamespaceConfig("opt", dim=2, value_dim=3, optimizer={"name": "adam", "lr": 0.1}))
    initial = np.ones((5, 3), np.float32)
    store.add(np.zeros((5, 2), np.float32), np.arange(5), values=initial)
    for _ in range(5):
        store.step(np.array([1, 3]), np.ones((2, 3), np.float32))
    rows = store.get(np.arange(5), return_optimizer_state=True)
    assert (rows.values[[0, 2, 4]] == 1).all() and (rows.values[[1, 3]] < 1).all()
    assert (rows.optimizer_state["exp_avg"][[0, 2, 4]] == 0).all()


def test_gradient_clipping_bounds_each_row():
    store = NeighborStore(NamespaceConfig("opt", dim=2, value_dim=2,
                                          optimizer={"name": "sgd", "lr": 1.0, "max_grad_norm": 0.5}))
    store.add(np.zeros((2, 2), np.float32), np.arange(2), values=np.zeros((2, 2), np.float32))
    store.step(np.array([0, 0, 1]), np.array([[3, 0], [0, 4], [0.1, 0]], np.float32))
    values = store.get(np.arange(2)).values
    np.testing.assert_allclose(np.linalg.norm(values[0]), 0.5, atol=1e-5)  # (3, 4) summed, then clipped
    np.testing.assert_allclose(values[1], [-0.1, 0], atol=1e-6)  # under the bound: unchanged gradient


def _apply_in_parts(router, ids, grads, step_id):
    """A step sent as a client sends one larger than a message: deferred parts, then one commit."""
    for part, rows in enumerate(np.array_split(np.arange(ids.size), 3)):
        router.apply_gradients("opt", ids[rows], grads[rows], step_id=step_id, part=part, defer_step=True)
    return router.commit_step("opt", step_id)


@pytest.mark.parametrize("parts", [False, True], ids=["whole", "deferred-parts"])
@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("name", ["sgd", "adagrad", "adam"])
def test_a_step_that_would_overflow_in_its_last_block_changes_no_row(monkeypatch, name, shards, parts):
    """A CPU step is computed a block of rows at a time (here 4 rows a block); one overflowing row in
    the last block refuses the whole step (INVALID_ARGUMENT), on one shard (whose commit is the only
    check: a step staged on one shard is not checked at staging, also when it comes in deferred
    parts) and on three; nothing changes, and the same step without that row then matches torch.optim."""
    from monim.datastore import optimizers
    from monim.protos.errors import InvalidArgument

    monkeypatch.setattr(optimizers, "_CPU_BLOCK_FLOATS", 4 * VALUE_DIM)
    initial = np.random.default_rng(1).standard_normal((ROWS, VALUE_DIM)).astype(np.float32)
    options = {"sgd": {"lr": 10.0, "momentum": 0.9}, "adagrad": {"lr": 0.1}, "adam": {"lr": 0.01}}[name]
    router = Router(LocalRuntime(shards))
    router.create_namespace(NamespaceConfig("opt", dim=2, value_dim=VALUE_DIM, optimizer=dict(options, name=name)))
    router.add("opt", np.zeros((ROWS, 2), np.float32), np.arange(ROWS), values=initial)
    before = router.get("opt", np.arange(ROWS), return_optimizer_state=True)
    ids = np.arange(ROWS, dtype=np.int64)
    grads = np.random.default_rng(2).standard_normal((ROWS, VALUE_DIM)).astype(np.float32)
    hostile = grads.copy()
    hostile[-1] = 3e38  # squared (adagrad, adam), or times lr 10 (sgd), past float32
    with pytest.raises(InvalidArgument, match="overflow float32"):
        if parts:
            _apply_in_parts(router, ids, hostile, "hostile")
        else:
            router.apply_gradients("opt", ids, hostile, request_id="hostile")
    after = router.get("opt", np.arange(ROWS), return_optimizer_state=True)
    np.testing.assert_array_equal(after.values, before.values)
    for column, values in before.optimizer_state.items():
        np.testing.assert_array_equal(after.optimizer_state[column], values, err_msg=column)
    steps = [(ids[:-1], grads[:-1])]
    if parts:
        assert _apply_in_parts(router, *steps[0], "hostile-without-the-row") == ROWS - 1
    else:
        assert router.apply_gradients("opt", *steps[0], request_id="hostile-without-the-row") == ROWS - 1
    torch_options = dict(options, betas=(0.9, 0.999)) if name == "adam" else options
    expected_values, _, expected_steps = torch_reference(name, torch_options, initial, steps)
    rows = router.get("opt", np.arange(ROWS), return_optimizer_state=True)
    np.testing.assert_allclose(rows.values, expected_values, atol=1e-5, rtol=1e-5)
    assert rows.optimizer_state["step"].tolist() == expected_steps.tolist()


@pytest.mark.parametrize("name", ["sgd", "adagrad", "adam"])
def test_a_step_in_parts_is_the_same_whatever_order_its_parts_arrive_in(name):
    """A client sends a large step's parts several at a time, so they may reach a shard in any order;
    the step sums repeated ids' gradients in the parts' order, not their arrival's: the same values,
    bit for bit, as the parts sent in order."""
    rng = np.random.default_rng(4)
    initial = rng.standard_normal((ROWS, VALUE_DIM)).astype(np.float32)
    ids = rng.integers(0, ROWS, 20 * ROWS)  # every row many times, in every part
    grads = rng.standard_normal((ids.size, VALUE_DIM)).astype(np.float32)
    parts = np.array_split(np.arange(ids.size), 4)
    values = []
    for order in ([0, 1, 2, 3], [3, 1, 0, 2]):
        router = Router(LocalRuntime(1))
        router.create_namespace(NamespaceConfig("opt", dim=2, value_dim=VALUE_DIM, optimizer={"name": name, "lr": 0.1}))
        router.add("opt", np.zeros((ROWS, 2), np.float32), np.arange(ROWS), values=initial)
        for part in order:
            router.apply_gradients("opt", ids[parts[part]], grads[parts[part]], step_id="s", part=part,
                                   defer_step=True)
        router.commit_step("opt", "s")
        values.append(router.get("opt", np.arange(ROWS)).values)
    np.testing.assert_array_equal(values[1], values[0])
