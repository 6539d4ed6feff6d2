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
import warnings

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


def _sparse_csr(crow: torch.Tensor, columns: torch.Tensor, weights: torch.Tensor, shape) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # "Sparse CSR tensor support is in beta state"
        return torch.sparse_csr_tensor(crow, columns, weights, shape, check_invariants=False)


def _slot_matrix(rows: torch.Tensor, weights: torch.Tensor, columns: int) -> torch.Tensor:
    """CSR [B, columns] whose row b holds weights[b, i] at column rows[b, i]: the slots of a top-k as
    a sparse matrix over the store's rows (k entries a row; an empty slot, -1, points at row 0 and
    must carry weight 0). A product with it sums the neighbours' rows without gathering them."""
    batch, k = rows.shape
    crow = torch.arange(0, batch * k + 1, k, device=rows.device, dtype=torch.int64)
    return _sparse_csr(crow, rows.clamp_min(0).reshape(-1), weights.reshape(-1), (batch, columns))


def value_sum(values: torch.Tensor, rows: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """m [B, value_dim] = sum_i alpha_bi values[rows_bi] over slots with rows >= 0.

    values: float32 [N, value_dim]; rows: int64 [B, k] (-1: not held here); alpha: float32 [B, k].
    One sparse [B, N] x dense [N, value_dim] product: the [B, k, value_dim] gather is never formed.
    """
    if values.shape[0] == 0:  # nothing stored: -1 slots cannot even borrow row 0
        return torch.zeros(rows.shape[0], values.shape[1], dtype=torch.float32, device=values.device)
    held_alpha = torch.where(rows >= 0, alpha, torch.zeros((), device=alpha.device))
    return _slot_matrix(rows, held_alpha, values.shape[0]) @ values


def _sampled_dots(values: torch.Tensor, rows: torch.Tensor, grad_memory: torch.Tensor) -> torch.Tensor:
    """gv [B, k] = grad_memory_b . values[rows_bi] (row 0 where rows is -1): the [B, N] product
    grad_memory @ values.T sampled at the slots only (SDDMM), or whole where N <= k (cheaper then;
    and torch's sampled product refuses a row with more slots than the matrix has columns)."""
    if values.shape[0] <= rows.shape[1]:
        return (grad_memory @ values.t()).gather(1, rows.clamp_min(0))
    pattern = _slot_matrix(rows, torch.zeros(rows.shape, dtype=values.dtype, device=values.device), values.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse.sampled_addmm(pattern, grad_memory, values.t(), beta=0.0).values().reshape(rows.shape)


def _row_gradients(rows: torch.Tensor, held: torch.Tensor, alpha: torch.Tensor, grad_memory: torch.Tensor):
    """(unique rows [U], dL/dv [U, value_dim]): dL/dv_u = sum over the slots holding row u of
    alpha * g_b, one sparse [U, B] x dense [B, value_dim] product over the slots sorted by row."""
    batch, k = rows.shape
    slots = held.reshape(-1)
    slot_rows = rows.reshape(-1)[slots]
    slot_queries = torch.arange(batch, device=rows.device).repeat_interleave(k)[slots]
    ordered, order = torch.sort(slot_rows, stable=True)
    unique_rows, counts = torch.unique_consecutive(ordered, return_counts=True)
    crow = torch.zeros(unique_rows.shape[0] + 1, dtype=torch.int64, device=rows.device)
    torch.cumsum(counts, 0, out=crow[1:])
    per_row = _sparse_csr(crow, slot_queries[order], alpha.reshape(-1)[slots][order], (unique_rows.shape[0], batch))
    return unique_rows, per_row @ grad_memory


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
    The sums over the slots are sparse products over the store's rows (no [B, k, width] gather),
    except with float16 keys, whose weighted sums gather the keys a block of queries at a time.
    """
    batch, k = rows.shape
    held = rows >= 0
    device = values.device
    dim = keys.shape[1]
    unique_rows, value_grads = _row_gradients(rows, held, alpha, grad_memory)
    if values.shape[0] == 0:  # nothing stored here: every partial sum is zero
        zeros = {name: np.zeros((batch, dim) if name.endswith("keys") else batch)
                 for name in ("weighted_keys", "alpha_keys", "grad_dot", "grad_dot_dist", "alpha_dist")}
        return BackwardPartials(**zeros), unique_rows, value_grads
    zero = torch.zeros((), device=device)
    a = torch.where(held, alpha, zero)                                    # empty slots weigh 0
    d = torch.where(held, distances, zero)
    agv = a * _sampled_dots(values, rows, grad_memory)                    # alpha * g.v_i  [B, k]
    if keys.dtype == torch.float32:
        weighted_keys = _slot_matrix(rows, agv, keys.shape[0]) @ keys
        alpha_keys = _slot_matrix(rows, a, keys.shape[0]) @ keys
    else:
        weighted_keys = torch.empty(batch, dim, dtype=torch.float32, device=device)
        alpha_keys = torch.empty(batch, dim, dtype=torch.float32, device=device)
        for part in _chunks(batch, k, dim):
            gathered_keys = keys[rows[part].clamp_min(0)].float()          # [b, k, dim]
            weighted_keys[part] = torch.bmm(agv[part].unsqueeze(1), gathered_keys).squeeze(1)
            alpha_keys[part] = torch.bmm(a[part].unsqueeze(1), gathered_keys).squeeze(1)
    agv, a, d = agv.double(), a.double(), d.double()
    partials = BackwardPartials(
        weighted_keys=weighted_keys.double().cpu().numpy(), alpha_keys=alpha_keys.double().cpu().numpy(),
        grad_dot=agv.sum(1).cpu().numpy(), grad_dot_dist=(agv * d).sum(1).cpu().numpy(),
        alpha_dist=(a * d).sum(1).cpu().numpy())
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
