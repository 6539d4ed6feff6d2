"""One optimizer step over a GPU store's touched rows as two Triton passes (datastore/optimizers.py's math).

The torch version of a step gathers each touched row's value and state into [U, value_dim]
temporaries, runs ten-odd elementwise kernels over them, checks the results for finiteness and
scatters them back: at B=4096, k=1024 (U = 480k rows of 768 floats, 1.5 GB a temporary) that was
32 ms of an H100's time, most of a training step's optimizer. Here one program per row reads its
gradient, value and state once and computes the new ones in registers:

1. ``check``: the new rows are computed and nothing is written; a non-finite result sets a flag
   (all or nothing: a step that would overflow float32 changes nothing, as apply_step promises);
2. ``write``: computed again and stored in place.

The per-row scalars (Adam's bias-corrected step size, Adagrad's decayed lr: functions of the row's
step count) are computed by torch in float64 first, as the torch path does. The arithmetic is
apply_step's, in float32, in the same order; the compiler may fuse a multiply and an add, so results
agree with the torch path to a few float32 ulps, not bit for bit.
"""

from __future__ import annotations

import torch
from monim.datastore.gpu_select import tl, triton

KINDS = {"sgd": 0, "sgd_momentum": 1, "adagrad": 2, "adam": 3}


def available(values: torch.Tensor, state: dict | None = None) -> bool:
    """Whether a step over these value (and state) columns runs here: on a CUDA device, contiguous (the
    kernel addresses a row as row * width), with Triton installed (the tests run the kernel on CPU
    tensors in Triton's interpreter: tests/unit/test_fused_step.py)."""
    return (triton is not None and values.is_cuda and values.is_contiguous()
            and all(column.is_contiguous() for column in (state or {}).values()))


if triton is not None:

    @triton.jit
    def _step_kernel(rows_ptr, grads_ptr, scale_ptr, values_ptr, first_ptr, second_ptr, bad_ptr, width,
                     lr, momentum, keep1, keep2, eps,
                     KIND: tl.constexpr, WRITE: tl.constexpr, BLOCK: tl.constexpr):
        item = tl.program_id(0)
        row = tl.load(rows_ptr + item).to(tl.int64)
        scale = 0.0
        if KIND >= 2:  # adagrad's decayed lr, adam's step size: per row
            scale = tl.load(scale_ptr + item)
        columns = tl.arange(0, BLOCK)
        for start in range(0, width, BLOCK):
            mask = start + columns < width
            at = row * width + start + columns
            grad = tl.load(grads_ptr + item.to(tl.int64) * width + start + columns, mask=mask, other=0.0)
            value = tl.load(values_ptr + at, mask=mask, other=0.0)
            first = grad  # the one state column's new value (unused by plain SGD)
            second = grad
            if KIND == 0:  # sgd
                new_value = value - lr * grad
            elif KIND == 1:  # sgd with momentum: buf = buf * momentum + g
                first = tl.load(first_ptr + at, mask=mask, other=0.0) * momentum + grad
                new_value = value - lr * first
            elif KIND == 2:  # adagrad: sum += g * g; v -= clr * g / (sqrt(sum) + eps)
                first = tl.load(first_ptr + at, mask=mask, other=0.0) + grad * grad
                new_value = value - scale * (grad / (tl.sqrt(first) + eps))
            else:  # adam (SparseAdam): m += (g - m)(1 - b1); s += (g^2 - s)(1 - b2); v -= size m / (sqrt(s) + eps)
                old_first = tl.load(first_ptr + at, mask=mask, other=0.0)
                old_second = tl.load(second_ptr + at, mask=mask, other=0.0)
                first = old_first + (grad - old_first) * keep1
                second = old_second + (grad * grad - old_second) * keep2
                new_value = value - scale * (first / (tl.sqrt(second) + eps))
            if WRITE:
                tl.store(values_ptr + at, new_value, mask=mask)
                if KIND != 0:
                    tl.store(first_ptr + at, first, mask=mask)
                if KIND == 3:
                    tl.store(second_ptr + at, second, mask=mask)
            else:
                finite = (tl.abs(new_value) < float("inf")) & (tl.abs(first) < float("inf")) \
                    & (tl.abs(second) < float("inf"))  # NaN compares false too
                bad = tl.sum(tl.where(mask & ~finite, 1, 0), axis=0)
                if bad > 0:
                    tl.store(bad_ptr, 1)


def kind(name: str, momentum: float) -> str:
    return "sgd_momentum" if name == "sgd" and momentum else name


def step_rows(kind_name: str, rows: torch.Tensor, grads: torch.Tensor, scale: torch.Tensor, values: torch.Tensor,
              first: torch.Tensor | None, second: torch.Tensor | None, *, lr: float, momentum: float = 0.0,
              beta1: float = 0.0, beta2: float = 0.0, eps: float = 0.0, write: bool) -> bool:
    """One pass over rows [U] (unique) with grads [U, width] and per-row scale float32 [U]; values and
    the state columns (first: momentum buffer / sum / exp_avg; second: exp_avg_sq) [capacity, width],
    all contiguous on one device. write=False: only whether every new value and state is finite
    (returns it); write=True: stores them (returns True)."""
    count, width = grads.shape
    if count == 0:
        return True
    if not all(column is None or column.is_contiguous() for column in (values, first, second)):
        raise ValueError("the fused step addresses rows as row * width: the columns must be contiguous")
    bad = torch.zeros(1, dtype=torch.int32, device=values.device)
    first = values if first is None else first  # a pointer the kernel never reads for plain SGD
    second = first if second is None else second
    block = min(1024, triton.next_power_of_2(width))
    _step_kernel[(count,)](rows, grads.contiguous(), scale, values, first, second, bad, width,
                           float(lr), float(momentum), 1.0 - beta1, 1.0 - beta2, float(eps),
                           KIND=KINDS[kind_name], WRITE=write, BLOCK=block, num_warps=4 if block >= 512 else 2)
    return write or int(bad.item()) == 0
