"""The fused optimizer step of GPU stores (datastore/fused_step.py) against the torch step of
datastore/optimizers.py, which is checked against torch.optim (tests/unit/test_optimizers.py): every
optimizer, widths under and over one block of the kernel, unsorted rows, rows left alone; and all or
nothing: a step that would overflow float32 changes nothing. Compiled on a GPU; on CPU tensors in
Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1); skipped without Triton."""

import os

import pytest
import torch
from monim.datastore import fused_step, optimizers
from monim.protos.config import OptimizerConfig
from monim.protos.errors import InvalidArgument

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(fused_step.triton is None or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
                                reason="needs Triton: compiled on a GPU, or its interpreter on CPU")

CONFIGS = {
    "sgd": OptimizerConfig("sgd", lr=0.3),
    "sgd_momentum": OptimizerConfig("sgd", lr=0.3, momentum=0.9),
    "adagrad": OptimizerConfig("adagrad", lr=0.1, lr_decay=0.01),
    "adam": OptimizerConfig("adam", lr=0.01),
}
STATE = {"sgd": (), "sgd_momentum": ("momentum_buffer",), "adagrad": ("sum",), "adam": ("exp_avg", "exp_avg_sq")}


def columns(kind: str, capacity: int, width: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(capacity, width, generator=generator)
    state = {name: torch.rand(capacity, width, generator=generator) for name in STATE[kind]}
    steps = torch.randint(0, 5, (capacity,), generator=generator)
    return values, state, steps


def on(device, values, state, steps):
    return values.to(device), {name: column.to(device) for name, column in state.items()}, steps.to(device)


def fused(config, steps, rows, grads, values, state, dry_run=False):
    """apply_step as it runs on a GPU (the fused path), on whatever device the tensors are."""
    step = steps[rows] + 1
    optimizers._fused_step(config, step, rows, grads, values, state, dry_run)
    if not dry_run:
        steps[rows] = step


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("width", [20, 1100])  # under one block of the kernel; over it (two passes of its loop)
def test_the_fused_step_equals_the_torch_step(kind, width):
    config = CONFIGS[kind]
    capacity = 64
    values, state, steps = columns(kind, capacity, width)
    rows = torch.randperm(capacity, generator=torch.Generator().manual_seed(1))[:37]  # unique, unsorted
    grads = torch.randn(37, width, generator=torch.Generator().manual_seed(2))

    want_values, want_state, want_steps = on("cpu", values.clone(), {n: c.clone() for n, c in state.items()}, steps.clone())
    optimizers.apply_step(config, want_steps, rows, grads, want_values, want_state)  # the torch path (CPU)

    got_values, got_state, got_steps = on(DEVICE, values, state, steps)
    fused(config, got_steps, rows.to(DEVICE), grads.to(DEVICE), got_values, got_state)
    torch.testing.assert_close(got_values.cpu(), want_values, rtol=1e-6, atol=1e-7)
    for name in want_state:
        torch.testing.assert_close(got_state[name].cpu(), want_state[name], rtol=1e-6, atol=1e-7)
    assert torch.equal(got_steps.cpu(), want_steps)
    untouched = torch.ones(capacity, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(got_values.cpu()[untouched], values[untouched])  # rows not in the step: as they were


@pytest.mark.filterwarnings("ignore:overflow encountered")  # the interpreter computes with numpy
@pytest.mark.parametrize("kind", ["adam", "adagrad", "sgd_momentum"])
def test_a_step_that_would_overflow_changes_nothing(kind):
    config = CONFIGS[kind]
    values, state, steps = on(DEVICE, *columns(kind, 16, 40))
    rows = torch.arange(0, 16, 2, device=DEVICE)
    grads = torch.ones(8, 40, device=DEVICE)
    if kind == "sgd_momentum":  # 0.9 b + g overflows
        grads[5, 17] = state["momentum_buffer"][10, 17] = 3e38
    else:  # g * g does
        grads[5, 17] = 2e19
    before = (values.clone(), {name: column.clone() for name, column in state.items()}, steps.clone())
    for dry_run in (True, False):
        with pytest.raises(InvalidArgument, match="overflow float32.*nothing was stepped"):
            fused(config, steps, rows, grads, values, state, dry_run=dry_run)
        assert torch.equal(values, before[0]) and torch.equal(steps, before[2])
        assert all(torch.equal(state[name], before[1][name]) for name in state)


def test_a_dry_run_checks_and_writes_nothing():
    config = CONFIGS["adam"]
    values, state, steps = on(DEVICE, *columns("adam", 16, 24))
    before = values.clone(), {name: column.clone() for name, column in state.items()}, steps.clone()
    fused(config, steps, torch.arange(8, device=DEVICE), torch.randn(8, 24, device=DEVICE), values, state, dry_run=True)
    assert torch.equal(values, before[0]) and torch.equal(steps, before[2])
    assert all(torch.equal(state[name], before[1][name]) for name in state)


@pytest.mark.skipif(DEVICE != "cuda", reason="a CUDA store takes the fused path")
def test_a_cuda_store_steps_through_the_fused_kernel(monkeypatch):
    calls = []
    real = fused_step.step_rows
    monkeypatch.setattr(fused_step, "step_rows", lambda *a, **k: calls.append(k["write"]) or real(*a, **k))
    values, state, steps = on("cuda", *columns("adam", 16, 24))
    optimizers.apply_step(CONFIGS["adam"], steps, torch.arange(8, device="cuda"), torch.randn(8, 24, device="cuda"),
                          values, state)
    assert calls == [False, True]
