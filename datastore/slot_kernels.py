"""A backward's sums over a query's slots, on a GPU store with float16 keys, as two Triton kernels.

memory_ops.slot_partials needs, per query b over its slots i (row r_bi, weight a_bi, 0 where empty):
    agv_bi = a_bi * (g_b . v_{r_bi})                 [B, k]
    weighted_keys_b = sum_i agv_bi k_{r_bi}          [B, dim]
    alpha_keys_b = sum_i a_bi k_{r_bi}               [B, dim]
With float16 keys the torch version gathers the slots' keys a block of queries at a time into
float32 [b, k, dim] blocks and multiplies them (two batched products), and takes the dots as a
sampled sparse product: at B=4096, k=1024, dim 768 that was 31 ms of an H100's time, most of a
training step's backward, moving ~45 GB. Here ``_dots_kernel`` reads each slot's value row once
(one program per query and block of slots) and ``_sums_kernel`` each slot's key row once (one
program per query and block of dimensions, accumulating in float32 registers): ~19 GB.
The sums are in float32 (repeated rows count once per slot, as the gathered version); they agree
with it to float32 rounding. Each program keeps a [slots, dims] tile of partial sums in registers and
reduces it across the slots once, at its end: a reduction across the program's warps for every block
of slots (what the first version did) cost more than the loads it followed.

The backward's value gradients (dL/dv_u = sum over the slots holding row u of a_bi g_b) stay the
transposed sparse product (memory_ops._Slots.per_row): a kernel of one program per row (sorted slots)
lost to it, 6.4 against 5.4 ms with its host waits, at B=4096, k=1024 on an H100 (docs/BENCHMARKS.md,
eighteenth session; git history has the kernel).

``value_sum`` is the forward's m_b = sum_i a_bi v_{r_bi} the same way (one program per query and block
of value dimensions), with no sort of the slots and no wait for the host: the sparse product it replaces
on a GPU (memory_ops._Slots) sorted the [B, k] rows and asked the host for the entries' count.
"""

from __future__ import annotations

import torch
from monim.datastore.gpu_select import tl, triton

# Tiles, from a sweep on an H100 at B=4096, k=1024, dim = value_dim = 768 (docs/BENCHMARKS.md, run 28b).
SLOTS = 32        # slots a program takes at a time (_dots_kernel, _sums_kernel)
DOT_DIMS = 128    # value dimensions _dots_kernel loads at a time
SUM_DIMS = 64     # key dimensions of one _sums_kernel program
VALUE_SLOTS = 64  # slots _value_sum_kernel takes at a time
VALUE_DIMS = 64   # value dimensions of one _value_sum_kernel program


def available(keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether the kernels serve these columns: float16 keys on a CUDA device, both contiguous (the
    kernels address a row as row * width), with Triton installed (the tests run them on CPU tensors in
    Triton's interpreter)."""
    return (triton is not None and keys.is_cuda and keys.dtype == torch.float16 and keys.is_contiguous()
            and values.is_contiguous())


if triton is not None:

    @triton.jit
    def _slot_block(rows_ptr, weights_ptr, query, k, slots):
        """A block of a query's slots: (held, their rows (0 where not held), their weights (0 where not held))."""
        in_k = slots < k
        rows = tl.load(rows_ptr + query * k + slots, mask=in_k, other=-1)
        held = rows >= 0
        weights = tl.load(weights_ptr + query * k + slots, mask=in_k & held, other=0.0)
        return held, tl.where(held, rows, 0).to(tl.int64), weights

    @triton.jit
    def _dots_kernel(rows_ptr, weights_ptr, grad_ptr, values_ptr, out_ptr, k, value_dim,
                     SLOTS: tl.constexpr, DIMS: tl.constexpr):
        query = tl.program_id(0).to(tl.int64)
        slots = tl.program_id(1) * SLOTS + tl.arange(0, SLOTS)
        held, safe, weights = _slot_block(rows_ptr, weights_ptr, query, k, slots)
        dots = tl.zeros((SLOTS,), dtype=tl.float32)
        dims = tl.arange(0, DIMS)
        for start in range(0, value_dim, DIMS):
            in_dim = start + dims < value_dim
            grad = tl.load(grad_ptr + query * value_dim + start + dims, mask=in_dim, other=0.0)
            values = tl.load(values_ptr + safe[:, None] * value_dim + start + dims[None, :],
                             mask=held[:, None] & in_dim[None, :], other=0.0)
            dots += tl.sum(values * grad[None, :], axis=1)
        tl.store(out_ptr + query * k + slots, tl.where(held, weights * dots, 0.0), mask=slots < k)

    @triton.jit
    def _sums_kernel(rows_ptr, weights_ptr, agv_ptr, keys_ptr, weighted_ptr, alpha_ptr, k, dim,
                     SLOTS: tl.constexpr, DIMS: tl.constexpr):
        query = tl.program_id(0).to(tl.int64)
        dims = tl.program_id(1) * DIMS + tl.arange(0, DIMS)
        in_dim = dims < dim
        weighted = tl.zeros((SLOTS, DIMS), dtype=tl.float32)
        alpha = tl.zeros((SLOTS, DIMS), dtype=tl.float32)
        slot_range = tl.arange(0, SLOTS)
        for start in range(0, k, SLOTS):
            slots = start + slot_range
            held, safe, weights = _slot_block(rows_ptr, weights_ptr, query, k, slots)
            agv = tl.load(agv_ptr + query * k + slots, mask=(slots < k) & held, other=0.0)
            keys = tl.load(keys_ptr + safe[:, None] * dim + dims[None, :], mask=held[:, None] & in_dim[None, :],
                           other=0.0).to(tl.float32)
            weighted += agv[:, None] * keys
            alpha += weights[:, None] * keys
        tl.store(weighted_ptr + query * dim + dims, tl.sum(weighted, axis=0), mask=in_dim)
        tl.store(alpha_ptr + query * dim + dims, tl.sum(alpha, axis=0), mask=in_dim)

    @triton.jit
    def _value_sum_kernel(rows_ptr, weights_ptr, values_ptr, out_ptr, k, value_dim,
                          SLOTS: tl.constexpr, DIMS: tl.constexpr):
        query = tl.program_id(0).to(tl.int64)
        dims = tl.program_id(1) * DIMS + tl.arange(0, DIMS)
        in_dim = dims < value_dim
        total = tl.zeros((SLOTS, DIMS), dtype=tl.float32)
        slot_range = tl.arange(0, SLOTS)
        for start in range(0, k, SLOTS):
            slots = start + slot_range
            held, safe, weights = _slot_block(rows_ptr, weights_ptr, query, k, slots)
            values = tl.load(values_ptr + safe[:, None] * value_dim + dims[None, :],
                             mask=held[:, None] & in_dim[None, :], other=0.0)
            total += weights[:, None] * values
        tl.store(out_ptr + query * value_dim + dims, tl.sum(total, axis=0), mask=in_dim)


def value_sum_available(values: torch.Tensor) -> bool:
    """Whether ``value_sum`` serves these value rows: float32, contiguous, on a CUDA device, with Triton."""
    return triton is not None and values.is_cuda and values.dtype == torch.float32 and values.is_contiguous()


def value_sum(values: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """m float32 [B, value_dim] = sum_i weights[b, i] values[rows[b, i]] over the slots with rows >= 0.
    values float32 [N, value_dim] (contiguous), rows int64 [B, k], weights float32 [B, k]; one device."""
    batch, k = rows.shape
    value_dim = values.shape[1]
    if not values.is_contiguous():
        raise ValueError("the slot kernels address rows as row * width: values must be contiguous")
    out = torch.empty(batch, value_dim, dtype=torch.float32, device=values.device)
    if batch == 0 or k == 0:
        return out.zero_()
    _value_sum_kernel[(batch, triton.cdiv(value_dim, VALUE_DIMS))](
        rows.contiguous(), weights.contiguous().float(), values, out, k, value_dim,
        SLOTS=VALUE_SLOTS, DIMS=VALUE_DIMS, num_warps=4)
    return out


def slot_sums(keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor,
              grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(agv float32 [B, k], weighted_keys float32 [B, dim], alpha_keys float32 [B, dim]) of the module's
    doc. keys [N, dim] (float16), values float32 [N, value_dim], rows int64 [B, k] (-1: not held),
    weights float32 [B, k] (alpha, 0 at slots not held), grad float32 [B, value_dim]; one device."""
    batch, k = rows.shape
    dim, value_dim = keys.shape[1], values.shape[1]
    if not (keys.is_contiguous() and values.is_contiguous()):
        raise ValueError("the slot kernels address rows as row * width: keys and values must be contiguous")
    rows, weights, grad = rows.contiguous(), weights.contiguous().float(), grad.contiguous().float()
    agv = torch.empty(batch, k, dtype=torch.float32, device=rows.device)
    weighted = torch.empty(batch, dim, dtype=torch.float32, device=rows.device)
    alpha = torch.empty(batch, dim, dtype=torch.float32, device=rows.device)
    if batch == 0 or k == 0:
        return agv, weighted.zero_(), alpha.zero_()
    _dots_kernel[(batch, triton.cdiv(k, SLOTS))](rows, weights, grad, values, agv, k, value_dim,
                                                  SLOTS=SLOTS, DIMS=DOT_DIMS, num_warps=4)
    _sums_kernel[(batch, triton.cdiv(dim, SUM_DIMS))](rows, weights, agv, keys, weighted, alpha, k, dim,
                                                       SLOTS=SLOTS, DIMS=SUM_DIMS, num_warps=4)
    return agv, weighted, alpha
