"""The backward's slot sums of float16-key GPU stores as Triton kernels (datastore/slot_kernels.py)
against memory_ops.slot_partials' torch version (gathered keys, a sampled sparse product), which
tests/unit/test_memory_ops.py checks against the plain formulas: empty slots, a row in several slots
of one query, k and widths that are not multiples of the kernels' tiles. Compiled on a GPU; on CPU
tensors in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1); skipped without Triton."""

import os

import pytest
import torch
from monim.datastore import memory_ops, slot_kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(slot_kernels.triton is None or (DEVICE == "cpu" and not INTERPRETED),
                                reason="needs Triton: compiled on a GPU, or its interpreter on CPU")


def case(batch=5, k=45, dim=150, value_dim=70, stored=30, seed=0):
    generator = torch.Generator().manual_seed(seed)
    keys = (3 * torch.randn(stored, dim, generator=generator)).half()
    values = torch.randn(stored, value_dim, generator=generator)
    rows = torch.randint(0, stored, (batch, k), generator=generator)  # k > stored: rows repeat within a query
    rows[torch.rand(batch, k, generator=generator) < 0.3] = -1
    alpha = torch.softmax(torch.randn(batch, k, generator=generator), 1)
    distances = torch.rand(batch, k, generator=generator)
    grad = torch.randn(batch, value_dim, generator=generator)
    return [t.to(DEVICE) for t in (keys, values, rows, alpha, distances, grad)]


SHAPES = [dict(), dict(batch=3, k=1, dim=8, value_dim=1), dict(batch=2, k=64, dim=256, value_dim=128)]


@pytest.mark.parametrize("shape", SHAPES)
def test_the_kernels_give_the_sums_of_the_torch_path(shape, monkeypatch):
    keys, values, rows, alpha, distances, grad = case(**shape)
    monkeypatch.setattr(slot_kernels, "available", lambda keys, values: False)
    want = memory_ops.slot_partials(keys, values, rows, alpha, distances, grad)
    monkeypatch.setattr(slot_kernels, "available", lambda keys, values: True)
    got = memory_ops.slot_partials(keys, values, rows, alpha, distances, grad)
    torch.testing.assert_close(got[0].cpu(), want[0].cpu(), rtol=1e-5, atol=1e-5)  # the packed sums
    assert torch.equal(got[1].cpu(), want[1].cpu())
    torch.testing.assert_close(got[2].cpu(), want[2].cpu())  # the value gradients (not the kernels')


def test_agv_is_zero_at_slots_not_held():
    keys, values, rows, alpha, distances, grad = case()
    weights = torch.where(rows >= 0, alpha, 0)
    agv, weighted, alpha_keys = slot_kernels.slot_sums(keys, values, rows, weights, grad)
    assert (agv[rows < 0] == 0).all()
    dots = (grad[:, None, :] * values[rows.clamp_min(0)]).sum(-1)
    torch.testing.assert_close(agv, torch.where(rows >= 0, weights * dots, 0), rtol=1e-5, atol=1e-6)


def test_columns_that_are_not_contiguous_take_the_torch_path():
    keys = torch.zeros(8, 6, dtype=torch.float16)
    values = torch.zeros(8, 6)
    assert not slot_kernels.available(keys, values)  # on the CPU: never
    if DEVICE == "cuda":
        keys, values = keys.cuda(), values.cuda()
        assert slot_kernels.available(keys, values)
        assert not slot_kernels.available(keys[:, :3], values) and not slot_kernels.available(keys, values.t())


@pytest.mark.parametrize("shape", SHAPES + [dict(batch=4, k=70, dim=8, value_dim=300)])
def test_the_value_sum_kernel_gives_the_sparse_products_sums(shape):
    """The forward's m (repeated rows once per slot, empty slots weigh nothing, widths and k off the tiles)."""
    keys, values, rows, alpha, distances, grad = case(**shape)
    want = memory_ops._Slots(rows.cpu(), values.shape[0]).times(alpha.cpu(), values.cpu())
    got = slot_kernels.value_sum(values, rows, alpha)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
    assert slot_kernels.value_sum(values, rows[:0], alpha[:0]).shape == (0, values.shape[1])


def test_value_sum_takes_the_kernel_for_float32_rows_on_a_gpu_only():
    values = torch.zeros(8, 6)
    assert not slot_kernels.value_sum_available(values)
    if DEVICE == "cuda":
        assert slot_kernels.value_sum_available(values.cuda())
        assert not slot_kernels.value_sum_available(values.cuda().half())
        assert not slot_kernels.value_sum_available(values.cuda().t())
