"""The MoNIM layer's arithmetic, done next to the data.

Forward, for each query b over its top-k neighbours i:
    s_bi = -d_bi / T + log w_i        (d: squared L2, or -<q, k_i> for ip)
    alpha_b = softmax(s_b)            (missing neighbours, id -1, get alpha 0)
    m_b = sum_i alpha_bi v_i
Backward, given g_b = dL/dm_b:
    dL/dv_i   = sum over slots holding i of alpha_bi g_b
    c_bi      = dL/ds_bi = alpha_bi (g_b.v_i - g_b.m_b)
    dL/dq_b   = -(2/T) sum_i c_bi (q_b - k_i)    (l2)     or (1/T) sum_i c_bi k_i   (ip)
    dL/dT     = sum_bi c_bi d_bi / T^2
Every sum over i splits over shards: each shard returns BackwardPartials for
the slots it holds, and ``combine_backward`` adds them and finishes the
formula. Only [B, dim] and [B] arrays leave a shard, never [B, k, dim].
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

# Floats of one gathered [chunk, k, width] block.
_GATHER_BLOCK_FLOATS = 1 << 26


def attention(distances: np.ndarray, weights: np.ndarray, ids: np.ndarray, temperature: float) -> np.ndarray:
    """alpha float32 [B, k] = softmax(-d/T + log w) over the present neighbours; 0 where id is -1
    (and on a row with no neighbours at all)."""
    present = torch.from_numpy(ids >= 0)
    scores = -torch.from_numpy(distances).float() / temperature + torch.from_numpy(weights).float().clamp_min(1e-30).log()
    scores = scores.masked_fill(~present, float("-inf"))
    alpha = torch.softmax(scores, dim=1)
    return torch.nan_to_num(alpha, nan=0.0).masked_fill(~present, 0.0).numpy()


def _chunks(batch: int, k: int, width: int):
    step = max(1, _GATHER_BLOCK_FLOATS // max(1, k * width))
    for start in range(0, batch, step):
        yield slice(start, min(batch, start + step))


def value_sum(values: torch.Tensor, rows: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """m [B, value_dim] = sum_i alpha_bi values[rows_bi] over slots with rows >= 0.

    values: float32 [N, value_dim]; rows: int64 [B, k] (-1: not held here); alpha: float32 [B, k].
    """
    batch, k = rows.shape
    out = torch.zeros(batch, values.shape[1], dtype=torch.float32, device=values.device)
    held = rows >= 0
    if values.shape[0] == 0:  # nothing stored: -1 slots cannot even borrow row 0
        return out
    for part in _chunks(batch, k, values.shape[1]):
        gathered = values[rows[part].clamp_min(0)]                       # [b, k, vd]
        weights = (alpha[part] * held[part]).unsqueeze(1)                 # [b, 1, k]
        out[part] = torch.bmm(weights, gathered).squeeze(1)
    return out


def weighted_rows(alpha: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """m float32 [B, width] = sum_i alpha_bi rows_bi: alpha float32 [B, k], rows float32 [B, k, width]
    (the neighbours' value rows, as a search returns them; alpha is 0 at empty slots)."""
    return np.matmul(alpha[:, None, :], rows)[:, 0].astype(np.float32, copy=False)


@dataclasses.dataclass
class BackwardPartials:
    """Sums over the slots one shard holds (a: alpha, gv: g.v_i, d: distance, k: key).

    weighted_keys [B, dim] = sum a*gv*k;  alpha_keys [B, dim] = sum a*k;
    grad_dot [B] = sum a*gv;  grad_dot_dist [B] = sum a*gv*d;  alpha_dist [B] = sum a*d.
    """

    weighted_keys: np.ndarray
    alpha_keys: np.ndarray
    grad_dot: np.ndarray
    grad_dot_dist: np.ndarray
    alpha_dist: np.ndarray

    def __add__(self, other: "BackwardPartials") -> "BackwardPartials":
        return BackwardPartials(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)))


def slot_partials(keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, alpha: torch.Tensor,
                  distances: torch.Tensor, grad_memory: torch.Tensor):
    """One shard's part of the backward, before any value changes.

    keys [N, dim], values [N, value_dim]: the store's columns. rows int64 [B, k] (-1: not held here).
    alpha, distances float32 [B, k]; grad_memory float32 [B, value_dim].
    Returns (BackwardPartials in float64, unique rows [U], value gradients float32 [U, value_dim]).
    """
    batch, k = rows.shape
    held = rows >= 0
    device = values.device
    dim = keys.shape[1]
    sums = {name: torch.zeros(batch, width, dtype=torch.float64, device=device)
            for name, width in (("weighted_keys", dim), ("alpha_keys", dim), ("grad_dot", 1),
                                ("grad_dot_dist", 1), ("alpha_dist", 1))}
    unique_rows, inverse = torch.unique(rows[held], return_inverse=True)
    # dL/dv_u = sum over the slots holding row u of alpha * g_b: one sparse [U, B] x dense [B, vd]
    # product (cuSPARSE / MKL), instead of materializing the [B, k, vd] outer products.
    query_of_slot = torch.arange(batch, device=device).unsqueeze(1).expand(batch, k)[held]
    slot_weights = torch.sparse_coo_tensor(torch.stack([inverse, query_of_slot]), alpha[held],
                                           (unique_rows.shape[0], batch), check_invariants=False)
    value_grads = torch.sparse.mm(slot_weights, grad_memory)
    # Nothing stored here: every partial sum stays zero.
    parts = _chunks(batch, k, max(dim, values.shape[1])) if values.shape[0] else ()
    for part in parts:
        # Empty slots (-1) borrow row 0 for the gather; their alpha is 0 and `held` masks them.
        safe = rows[part].clamp_min(0)
        a = alpha[part] * held[part]                                      # [b, k]
        d = torch.where(held[part], distances[part], torch.zeros((), device=device))
        g = grad_memory[part]                                             # [b, vd]
        gv = torch.bmm(values[safe], g.unsqueeze(2)).squeeze(2)           # [b, k]
        gathered_keys = keys[safe].float()                                # [b, k, dim]
        agv = a * gv
        sums["weighted_keys"][part] = torch.bmm(agv.unsqueeze(1), gathered_keys).squeeze(1).double()
        sums["alpha_keys"][part] = torch.bmm(a.unsqueeze(1), gathered_keys).squeeze(1).double()
        sums["grad_dot"][part] = agv.double().sum(1, keepdim=True)
        sums["grad_dot_dist"][part] = (agv.double() * d.double()).sum(1, keepdim=True)
        sums["alpha_dist"][part] = (a.double() * d.double()).sum(1, keepdim=True)
    partials = BackwardPartials(
        weighted_keys=sums["weighted_keys"].cpu().numpy(), alpha_keys=sums["alpha_keys"].cpu().numpy(),
        grad_dot=sums["grad_dot"][:, 0].cpu().numpy(), grad_dot_dist=sums["grad_dot_dist"][:, 0].cpu().numpy(),
        alpha_dist=sums["alpha_dist"][:, 0].cpu().numpy())
    return partials, unique_rows, value_grads


def combine_backward(partials: BackwardPartials, queries: np.ndarray, alpha: np.ndarray, metric: str,
                     temperature: float) -> tuple[np.ndarray, float]:
    """(grad_queries float32 [B, dim], grad_temperature) from the summed partials of all shards."""
    grad_m_dot_m = partials.grad_dot                                      # g_b . m_b
    alpha_total = alpha.astype(np.float64).sum(1)
    sum_c_keys = partials.weighted_keys - grad_m_dot_m[:, None] * partials.alpha_keys
    sum_c_dist = partials.grad_dot_dist - grad_m_dot_m * partials.alpha_dist
    if metric == "l2":
        sum_c = grad_m_dot_m * (1.0 - alpha_total)                         # 0 up to rounding
        grad_queries = -(2.0 / temperature) * (queries.astype(np.float64) * sum_c[:, None] - sum_c_keys)
    else:
        grad_queries = sum_c_keys / temperature
    grad_temperature = float(sum_c_dist.sum() / temperature**2)
    return grad_queries.astype(np.float32), grad_temperature
