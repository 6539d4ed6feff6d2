"""Server-side sparse optimizers for value rows: only the rows a gradient touches change.

Semantics follow PyTorch on sparse gradients, row by row:
- ``sgd``: torch.optim.SGD (dampening 0); with momentum, a row's buffer
  starts at its first gradient and moves only when the row is touched
  (as torch does for a parameter that has a gradient at that step).
- ``adagrad``: torch.optim.Adagrad with sparse gradients (element-wise sum of
  squares, ``lr / (1 + (step - 1) * lr_decay)``).
- ``adam``: torch.optim.SparseAdam (moments updated only at touched rows,
  bias correction from the store's step count).
``step`` counts optimizer steps of the whole namespace, as torch counts steps
of one parameter; every shard takes every step so counts agree.
Gradients of repeated ids are summed first (coalesced); with ``max_grad_norm``
each row's gradient is clipped to that L2 norm.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from datastore.errors import InvalidArgument

OPTIMIZERS = ("sgd", "adagrad", "adam")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """name: sgd | adagrad | adam; lr > 0. momentum: sgd. lr_decay, initial_accumulator_value: adagrad.
    beta1, beta2: adam. eps: adagrad (default 1e-10) and adam (default 1e-8). max_grad_norm: 0 = off."""

    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 0.0
    lr_decay: float = 0.0
    initial_accumulator_value: float = 0.0
    max_grad_norm: float = 0.0

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise InvalidArgument(f"unknown optimizer {self.name!r}; choose one of {', '.join(OPTIMIZERS)}")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name != "name" and (not isinstance(value, (int, float)) or not math.isfinite(value)):
                raise InvalidArgument(f"optimizer option {field.name} must be a finite number, got {value!r}")
        if self.lr <= 0:
            raise InvalidArgument(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise InvalidArgument(f"momentum must be in [0, 1), got {self.momentum}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise InvalidArgument(f"betas must be in [0, 1), got ({self.beta1}, {self.beta2})")
        if self.eps < 0 or self.lr_decay < 0 or self.initial_accumulator_value < 0 or self.max_grad_norm < 0:
            raise InvalidArgument("eps, lr_decay, initial_accumulator_value and max_grad_norm must be >= 0")
        if self.eps == 0:
            object.__setattr__(self, "eps", {"adagrad": 1e-10, "adam": 1e-8}.get(self.name, 0.0))

    def state_columns(self) -> dict[str, float]:
        """Per-row state columns [N, value_dim] and their initial values."""
        if self.name == "sgd":
            return {"momentum_buffer": 0.0} if self.momentum else {}
        if self.name == "adagrad":
            return {"sum": float(self.initial_accumulator_value)}
        return {"exp_avg": 0.0, "exp_avg_sq": 0.0}

    @classmethod
    def from_dict(cls, data: dict | None) -> "OptimizerConfig":
        data = dict(data or {})
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise InvalidArgument(f"unknown optimizer option(s): {', '.join(unknown)}")
        return cls(**data)


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


def apply_step(config: OptimizerConfig, step: int, rows: torch.Tensor, grads: torch.Tensor, values: torch.Tensor,
               state: dict[str, torch.Tensor]) -> None:
    """Updates values[rows] (and the state rows) in place.

    step: the 1-based count of this optimizer step. rows: int64 [U], unique.
    grads: float32 [U, value_dim], coalesced and clipped. values and state
    columns: float32 [capacity, value_dim] on the same device.
    """
    lr = config.lr
    if config.name == "sgd":
        update = grads
        if config.momentum:
            buffer = state["momentum_buffer"][rows] * config.momentum + grads
            state["momentum_buffer"][rows] = buffer
            update = buffer
        values[rows] = values[rows] - lr * update
    elif config.name == "adagrad":
        clr = lr / (1 + (step - 1) * config.lr_decay)
        total = state["sum"][rows] + grads * grads
        state["sum"][rows] = total
        values[rows] = values[rows] - clr * (grads / (total.sqrt() + config.eps))
    else:  # adam, as torch.optim.SparseAdam
        old_avg, old_sq = state["exp_avg"][rows], state["exp_avg_sq"][rows]
        exp_avg = old_avg + (grads - old_avg) * (1 - config.beta1)
        exp_avg_sq = old_sq + (grads * grads - old_sq) * (1 - config.beta2)
        state["exp_avg"][rows], state["exp_avg_sq"][rows] = exp_avg, exp_avg_sq
        step_size = lr * math.sqrt(1 - config.beta2**step) / (1 - config.beta1**step)
        values[rows] = values[rows] - step_size * (exp_avg / (exp_avg_sq.sqrt() + config.eps))
