"""The MoNIM arithmetic next to the data (datastore/memory_ops.py) as sparse products over the store's
rows, against the plain formulas over gathered [B, k, width] neighbours, on generated shapes: empty
slots (-1), a row taken by several slots of one query, more slots than stored rows, nothing stored,
float16 keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monim.datastore import memory_ops


def gathered_reference(keys, values, rows, alpha, distances, grad):
    """The formulas of memory_ops' docstring, in float64 over gathered neighbours."""
    held = (rows >= 0).double()
    safe = torch.where(rows >= 0, rows, values.shape[0])        # an empty slot reads an appended zero row
    a = alpha.double() * held
    d = distances.double() * held
    v = torch.cat([values.double(), torch.zeros(1, values.shape[1], dtype=torch.float64)])[safe]   # [B, k, vd]
    kk = torch.cat([keys.double(), torch.zeros(1, keys.shape[1], dtype=torch.float64)])[safe]      # [B, k, dim]
    g = grad.double()
    gv = (v * g[:, None, :]).sum(-1)                            # [B, k]
    memory = (a[:, :, None] * v).sum(1)
    row_grads = torch.zeros(values.shape[0] + 1, values.shape[1], dtype=torch.float64)
    row_grads.index_add_(0, safe.reshape(-1), (a[:, :, None] * g[:, None, :]).reshape(-1, values.shape[1]))
    partials = {"weighted_keys": ((a * gv)[:, :, None] * kk).sum(1), "alpha_keys": (a[:, :, None] * kk).sum(1),
                "grad_dot": (a * gv).sum(1), "grad_dot_dist": (a * gv * d).sum(1), "alpha_dist": (a * d).sum(1),
                "alpha_sum": a.sum(1)}
    return memory, row_grads, partials


@st.composite
def slots(draw):
    stored = draw(st.integers(0, 40))
    batch, k = draw(st.integers(1, 6)), draw(st.integers(1, 50))
    dim, value_dim = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    empty_share = draw(st.sampled_from([0.0, 0.3, 1.0]))
    key_dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    return stored, batch, k, dim, value_dim, seed, empty_share, key_dtype


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=150, deadline=None)
@given(slots())
def test_sparse_products_equal_the_gathered_formulas(device, case):
    stored, batch, k, dim, value_dim, seed, empty_share, key_dtype = case
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(stored, dim, generator=gen).to(key_dtype)
    values = torch.randn(stored, value_dim, generator=gen)
    rows = torch.randint(0, max(stored, 1), (batch, k), generator=gen)   # repeats within a query too
    rows[(torch.rand(batch, k, generator=gen) < empty_share) | (stored == 0)] = -1
    alpha = torch.softmax(torch.randn(batch, k, generator=gen), 1)
    distances = 10 * torch.rand(batch, k, generator=gen)
    grad = torch.randn(batch, value_dim, generator=gen)

    memory, row_grads, expected = gathered_reference(keys, values, rows, alpha, distances, grad)
    on = [tensor.to(device) for tensor in (keys, values, rows, alpha, distances, grad)]
    summed = memory_ops.value_sum(on[1], on[2], on[3])
    assert summed.device.type == device
    np.testing.assert_allclose(summed.cpu().numpy(), memory.numpy(), rtol=1e-5, atol=1e-5)

    packed, unique_rows, value_grads = memory_ops.slot_partials(*on)
    assert packed.device.type == device and packed.dtype == torch.float64 and packed.shape == (batch, 2 * dim + 4)
    partials = memory_ops.BackwardPartials.unpack(packed.cpu().numpy())
    held_rows = torch.unique(rows[rows >= 0])
    assert torch.equal(unique_rows.cpu(), held_rows)
    np.testing.assert_allclose(value_grads.cpu().numpy(), row_grads[held_rows].numpy(), rtol=1e-5, atol=1e-5)
    if stored:  # the slot matrix as chosen for the device, and canonical (the CUDA default), give the same products
        for canonical in (None, True):
            slots = memory_ops._Slots(on[2], stored, canonical=canonical)
            held_alpha = torch.where(on[2] >= 0, on[3], 0)
            np.testing.assert_allclose(slots.times(held_alpha, on[1]).cpu().numpy(), memory.numpy(), rtol=1e-5, atol=1e-5)
            gathered_dots = (on[5][:, None, :] * on[1][on[2].clamp_min(0)]).sum(-1) * (on[2] >= 0)
            np.testing.assert_allclose(slots.sampled_dots(on[5], on[1]).cpu().numpy(), gathered_dots.cpu().numpy(),
                                       rtol=1e-5, atol=1e-5)
            unique, per_row = slots.per_row(held_alpha, on[5])
            assert torch.equal(unique.cpu(), held_rows)
            np.testing.assert_allclose(per_row.cpu().numpy(), row_grads[held_rows].numpy(), rtol=1e-5, atol=1e-5)
    for name, want in expected.items():
        got = getattr(partials, name)
        assert got.dtype == np.float64 and got.shape == tuple(want.shape), name
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-4, err_msg=name)


def test_more_slots_than_stored_rows_and_a_row_repeated_in_one_query():
    """k = 20 over 10 stored rows (the sampled product refuses more slots than columns)."""
    values = torch.arange(20, dtype=torch.float32).reshape(10, 2)
    rows = torch.tensor([[3] * 10 + [-1] * 5 + list(range(5))])
    alpha = torch.full((1, 20), 0.05)
    grad = torch.ones(1, 2)
    packed, unique_rows, value_grads = memory_ops.slot_partials(values, values, rows, alpha, torch.ones(1, 20), grad)
    partials = memory_ops.BackwardPartials.unpack(packed.numpy())
    assert unique_rows.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(value_grads[3].numpy(), [0.55, 0.55], rtol=1e-6)            # 10 slots + 1 of range(5)
    gv = values.sum(1)[rows.clamp_min(0)] * (rows >= 0)
    np.testing.assert_allclose(partials.grad_dot, [(0.05 * gv).sum().item()], rtol=1e-6)
