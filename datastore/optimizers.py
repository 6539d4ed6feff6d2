"""Server-side sparse optimizers for value rows: only the rows a gradient touches change.

Semantics follow PyTorch on sparse gradients, row by row:
- ``sgd``: torch.optim.SGD (dampening 0); with momentum, a row's buffer
  starts at its first gradient and moves only when the row is touched
  (as torch does for a parameter that has a gradient at that step).
- ``adagrad``: torch.optim.Adagrad with sparse gradients (element-wise sum of
  squares, ``lr / (1 + (step - 1) * lr_decay)``).
- ``adam``: torch.optim.SparseAdam (moments updated only at touched rows).
``step`` is counted per row: the number of steps that touched it, as if each
row were its own parameter. Adam's bias correction and Adagrad's lr decay use
it, so a row added late takes the first step torch would give a fresh
parameter (a namespace-wide count would make its first Adam step ~3x larger).
Gradients of repeated ids are summed first (coalesced); with ``max_grad_norm``
each row's gradient is clipped to that L2 norm.
"""

from __future__ import annotations

import torch
from monim.datastore import fused_step
from monim.protos.config import OptimizerConfig
from monim.protos.errors import InvalidArgument


def coalesce(rows: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums the gradients of repeated rows: (unique rows [U], grads [U, value_dim])."""
    unique, inverse = torch.unique(rows, return_inverse=True)
    summed = torch.zeros(unique.shape[0], grads.shape[1], dtype=grads.dtype, device=grads.device)
    summed.index_add_(0, inverse, grads)
    return unique, summed


def clip_rows(grads: torch.Tensor, max_norm: float) -> torch.Tensor:
    if max_norm <= 0:
        return grads
    norms = grads.norm(dim=1, keepdim=True)
    return grads * torch.clamp(max_norm / (norms + 1e-6), max=1.0)


# Rows of one block of a CPU step: each of its temporaries (~1 MB) stays in cache and in the heap
# (a whole-step temporary of 65,536 x 768 floats is 200 MB, mapped and faulted in afresh each time).
_CPU_BLOCK_FLOATS = 1 << 18


def _row_scale(config: OptimizerConfig, step: torch.Tensor) -> torch.Tensor | None:
    """float32 [U]: each row's step size from its step count (computed in float64), Adagrad's decayed
    lr or Adam's bias-corrected one; None for SGD (config.lr for every row)."""
    step_f = step.to(torch.float64)
    if config.name == "adagrad":
        return (config.lr / (1 + (step_f - 1) * config.lr_decay)).float()
    if config.name == "adam":
        return (config.lr * torch.sqrt(1 - config.beta2**step_f) / (1 - config.beta1**step_f)).float()
    return None


def _new_rows(config: OptimizerConfig, step: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor,
              values: torch.Tensor, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(new values, new state columns) of rows [U] after one step with grads [U, value_dim]."""
    lr = config.lr
    new_state = {}
    if config.name == "sgd":
        update = grads
        if config.momentum:
            update = new_state["momentum_buffer"] = state["momentum_buffer"][rows] * config.momentum + grads
        new_values = values[rows] - lr * update
    elif config.name == "adagrad":
        clr = _row_scale(config, step).unsqueeze(1)
        total = new_state["sum"] = state["sum"][rows] + grads * grads
        new_values = values[rows] - clr * (grads / (total.sqrt() + config.eps))
    else:  # adam, as torch.optim.SparseAdam
        old_avg, old_sq = state["exp_avg"][rows], state["exp_avg_sq"][rows]
        exp_avg = new_state["exp_avg"] = old_avg + (grads - old_avg) * (1 - config.beta1)
        exp_avg_sq = new_state["exp_avg_sq"] = old_sq + (grads * grads - old_sq) * (1 - config.beta2)
        step_size = _row_scale(config, step).unsqueeze(1)
        new_values = values[rows] - step_size * (exp_avg / (exp_avg_sq.sqrt() + config.eps))
    return new_values, new_state


def apply_step(config: OptimizerConfig, steps: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor,
               values: torch.Tensor, state: dict[str, torch.Tensor], dry_run: bool = False) -> None:
    """Updates values[rows] (and the state rows) in place; all or nothing: a step whose new values
    or state would not be finite (gradients that overflow float32 when summed or squared) is
    INVALID_ARGUMENT, and nothing changes. dry_run: only that check.

    steps: int64 [capacity], each row's step count; the rows' counts grow by one here.
    rows: int64 [U], unique.
    grads: float32 [U, value_dim], coalesced and clipped. values and state
    columns: float32 [capacity, value_dim] on the same device.
    On CPU the rows are computed a block at a time (_CPU_BLOCK_FLOATS), every block checked before
    any is written.
    """
    step = steps[rows] + 1
    if fused_step.available(values, state):
        _fused_step(config, step, rows, grads, values, state, dry_run)
        if not dry_run:
            steps[rows] = step
        return
    count = rows.shape[0]
    block = count if values.is_cuda else max(1, _CPU_BLOCK_FLOATS // max(1, values.shape[1]))
    computed = [(part, *_new_rows(config, step[part], rows[part], grads[part], values, state))
                for part in (slice(start, min(count, start + block)) for start in range(0, count, block))]
    if not all(bool(torch.isfinite(tensor).all()) for _, new_values, new_state in computed
               for tensor in (new_values, *new_state.values())):
        raise InvalidArgument(_OVERFLOW)
    if dry_run:
        return
    steps[rows] = step
    for part, new_values, new_state in computed:
        for name, column in new_state.items():
            state[name][rows[part]] = column
        values[rows[part]] = new_values


_OVERFLOW = ("these gradients would make value rows (or their optimizer state) overflow float32 (sums or squares "
             "past 3.4e38): nothing was stepped; scale them down or set max_grad_norm")


def _fused_step(config: OptimizerConfig, step: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor,
                values: torch.Tensor, state: dict[str, torch.Tensor], dry_run: bool) -> None:
    """apply_step on a GPU: datastore/fused_step.py's two passes (check, then write in place)."""
    kind = fused_step.kind(config.name, config.momentum)
    scale = _row_scale(config, step)
    if scale is None:  # SGD: the kernel reads config.lr
        scale = torch.empty(0, device=values.device)
    if kind == "adam":
        first, second = state["exp_avg"], state["exp_avg_sq"]
    elif kind == "adagrad":
        first, second = state["sum"], None
    else:
        first, second = state.get("momentum_buffer"), None
    options = dict(lr=config.lr, momentum=config.momentum or 0.0, beta1=config.beta1 or 0.0,
                   beta2=config.beta2 or 0.0, eps=config.eps or 0.0)
    if not fused_step.step_rows(kind, rows, grads, scale, values, first, second, write=False, **options):
        raise InvalidArgument(_OVERFLOW)
    if not dry_run:
        fused_step.step_rows(kind, rows, grads, scale, values, first, second, write=True, **options)
