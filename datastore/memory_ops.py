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
from monim.datastore import slot_kernels
from monim.datastore.transfer import source_tensor, to_device

# Floats of one gathered [chunk, k, width] block.
_GATHER_BLOCK_FLOATS = 1 << 26
# value_sum on a GPU gathers [B, k, value_dim] rows whole up to this many floats (16 MB).
DENSE_GATHER_FLOATS = 1 << 22


def attention(distances: np.ndarray, weights: np.ndarray, ids: np.ndarray, temperature: float) -> np.ndarray:
    """alpha float32 [B, k] = softmax(-d/T + log w) over the present neighbours; 0 where id is -1
    (and on a row with no neighbours at all): attention_tensor over the arrays."""
    return attention_tensor(source_tensor(distances), source_tensor(weights), torch.from_numpy(ids >= 0),
                            temperature).numpy()


def attention_tensor(distances: torch.Tensor, weights: torch.Tensor, present: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """attention's alpha from tensors on any one device (a lone shard's forward: on its GPU). In place
    where it can be: at B=4096, k=1024 each pass over the scores is a few ms on a host, and a batch
    whose slots are all held needs no masks."""
    scores = torch.div(distances.float(), -temperature)
    scores.add_(weights.float().clamp_min(1e-30).log_())
    if not present.is_cuda and bool(present.all()):  # (on a GPU the masks cost less than the wait for this answer)
        return torch.softmax(scores, dim=1)
    missing = ~present
    alpha = torch.softmax(scores.masked_fill_(missing, float("-inf")), dim=1)
    return alpha.nan_to_num_(nan=0.0).masked_fill_(missing, 0.0)


def _chunks(batch: int, k: int, width: int):
    step = max(1, _GATHER_BLOCK_FLOATS // max(1, k * width))
    for start in range(0, batch, step):
        yield slice(start, min(batch, start + step))


def _csr(crow: torch.Tensor, columns: torch.Tensor, weights: torch.Tensor, shape) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # "Sparse CSR tensor support is in beta state"
        return torch.sparse_csr_tensor(crow, columns, weights, shape, check_invariants=False)


class _Slots:
    """The held slots of a top-k, rows int64 [B, k] (-1: empty, or not held here), as a sparse
    [B, N] matrix over the store's N rows. Products with it sum the neighbours' rows without
    gathering them into [B, k, width] blocks.

    canonical (the default on CUDA): each query's columns sorted and distinct, as cuSPARSE assumes
    (a row a query names twice is one entry whose weight is the sum of its slots'). torch's CPU
    kernels take the held slots as they are (repeated columns sum), which spares a sort of B x k,
    unless they outnumber the matrix's cells (its sampled product refuses that)."""

    def __init__(self, rows: torch.Tensor, stored: int, canonical: bool | None = None):
        batch, _ = rows.shape
        self.shape = (batch, stored)
        if canonical is None:
            canonical = rows.is_cuda or int((rows >= 0).sum()) > batch * stored
        if canonical:
            ordered, self.order = torch.sort(rows, dim=1)                  # empty slots (-1) first
            entry = ordered >= 0
            entry[:, 1:] &= ordered[:, 1:] != ordered[:, :-1]
        else:
            ordered, self.order = rows, None
            entry = rows >= 0
        self.held = (ordered >= 0).reshape(-1)                              # of the (ordered) slots
        entry = entry.reshape(-1)
        self.columns = ordered.reshape(-1)[entry]                           # (the one wait for a size here)
        self.nnz = self.columns.shape[0]
        # Each slot's entry (a held slot's own, an empty one's clamped into range): the products below zero
        # the weights of empty slots rather than leave them out, since a boolean index waits for its size.
        self.entry_of_slot = (torch.cumsum(entry, 0) - 1).clamp_(0, max(self.nnz - 1, 0))
        per_query = entry.reshape(batch, -1).sum(1)
        self.crow = torch.zeros(batch + 1, dtype=torch.int64, device=rows.device)
        torch.cumsum(per_query, 0, out=self.crow[1:])
        self.queries = torch.repeat_interleave(torch.arange(batch, device=rows.device), per_query,
                                               output_size=self.nnz)

    def _ordered(self, per_slot: torch.Tensor) -> torch.Tensor:
        return (per_slot if self.order is None else per_slot.gather(1, self.order)).reshape(-1)

    def entries(self, weights: torch.Tensor) -> torch.Tensor:
        """[nnz]: each entry's weight, the sum of weights [B, k] over its slots."""
        if self.order is None:  # one entry a held slot
            return self._ordered(weights)[self.held]
        summed = torch.zeros(self.nnz, dtype=weights.dtype, device=weights.device)
        if not self.nnz:
            return summed
        return summed.index_add_(0, self.entry_of_slot, torch.where(self.held, self._ordered(weights), 0))

    def times(self, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """[B, width] = sum_i weights[b, i] table[rows[b, i]] over the held slots."""
        return _csr(self.crow, self.columns, self.entries(weights), self.shape) @ table

    def sampled_dots(self, grad: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """[B, k] = grad_b . table[rows[b, i]] at held slots (0 at the others): the product
        grad @ table.T sampled at the entries only (SDDMM)."""
        pattern = _csr(self.crow, self.columns, torch.zeros(self.columns.shape, device=grad.device), self.shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dots = torch.sparse.sampled_addmm(pattern, grad, table.t(), beta=0.0).values()
        ordered = torch.where(self.held, dots[self.entry_of_slot], 0) if self.nnz \
            else torch.zeros(self.held.shape, dtype=dots.dtype, device=dots.device)
        ordered = ordered.reshape(self.shape[0], -1)
        return ordered if self.order is None else torch.zeros_like(ordered).scatter_(1, self.order, ordered)

    def per_row(self, weights: torch.Tensor, grad: torch.Tensor):
        """(the rows held, sorted [U]; [U, width] = sum over the slots holding row u of weights * grad_b):
        the transposed product, over the entries sorted by row (a row's queries stay in order)."""
        by_row = torch.sort(self.columns, stable=True)
        unique_rows, counts = torch.unique_consecutive(by_row.values, return_counts=True)
        crow = torch.zeros(unique_rows.shape[0] + 1, dtype=torch.int64, device=grad.device)
        torch.cumsum(counts, 0, out=crow[1:])
        weights = self.entries(weights)[by_row.indices]
        return unique_rows, _csr(crow, self.queries[by_row.indices], weights, (unique_rows.shape[0], self.shape[0])) @ grad


def value_sum(values: torch.Tensor, rows: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """m [B, value_dim] = sum_i alpha_bi values[rows_bi] over slots with rows >= 0.

    values: float32 [N, value_dim]; rows: int64 [B, k] (-1: not held here); alpha: float32 [B, k].
    One sparse [B, N] x dense [N, value_dim] product (on a GPU a Triton kernel of the same sums:
    datastore/slot_kernels.py): the [B, k, value_dim] gather is never formed.
    """
    if values.shape[0] == 0:  # nothing stored: no slot is held
        return torch.zeros(rows.shape[0], values.shape[1], dtype=torch.float32, device=values.device)
    if rows.is_cuda and rows.numel() * values.shape[1] <= DENSE_GATHER_FLOATS:
        # A decoding step's few slots: gathered and summed on the GPU without a wait for the host (the
        # sparse matrix's set-up waits twice for sizes only the GPU knows).
        weights = alpha.masked_fill(rows < 0, 0.0)
        return torch.bmm(weights[:, None, :], values[rows.clamp_min(0)])[:, 0]
    if slot_kernels.value_sum_available(values):  # a training batch on a GPU: one Triton pass, no sort
        return slot_kernels.value_sum(values, rows, alpha)
    return _Slots(rows, values.shape[0]).times(alpha, values)


def weighted_rows(alpha: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """m float32 [B, width] = sum_i alpha_bi rows_bi: alpha float32 [B, k], rows float32 [B, k, width]
    (the neighbours' value rows, as a search returns them; alpha is 0 at empty slots)."""
    return np.matmul(alpha[:, None, :], rows)[:, 0].astype(np.float32, copy=False)


@dataclasses.dataclass
class BackwardPartials:
    """Sums over the slots one shard holds (a: alpha, gv: g.v_i, d: distance, k: key).

    weighted_keys [B, dim] = sum a*gv*k;  alpha_keys [B, dim] = sum a*k;
    grad_dot [B] = sum a*gv;  grad_dot_dist [B] = sum a*gv*d;  alpha_dist [B] = sum a*d;
    alpha_sum [B] = sum a (over every shard: the query's total weight, 1 up to rounding).
    float64 numpy arrays, or tensors on the shard's device (``unpack`` of slot_partials' packed sums).
    """

    weighted_keys: np.ndarray
    alpha_keys: np.ndarray
    grad_dot: np.ndarray
    grad_dot_dist: np.ndarray
    alpha_dist: np.ndarray
    alpha_sum: np.ndarray

    def __add__(self, other: "BackwardPartials") -> "BackwardPartials":
        return BackwardPartials(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)))

    @classmethod
    def unpack(cls, packed) -> "BackwardPartials":
        """The sums as views of one float64 [B, 2 dim + 4] array or tensor (slot_partials' packed form)."""
        dim = (packed.shape[1] - 4) // 2
        return cls(packed[:, :dim], packed[:, dim:2 * dim], *(packed[:, 2 * dim + i] for i in range(4)))


def slot_partials(keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, alpha: torch.Tensor,
                  distances: torch.Tensor, grad_memory: torch.Tensor, rows_found=None):
    """One shard's part of the backward, before any value changes.

    keys [N, dim], values [N, value_dim]: the store's columns. rows int64 [B, k] (-1: not held here).
    alpha, distances float32 [B, k]; grad_memory float32 [B, value_dim].
    Returns (the BackwardPartials packed in one float64 tensor [B, 2 dim + 4] on the device: unpack
    them with BackwardPartials.unpack, after one copy to the host if they go there; unique rows [U];
    value gradients float32 [U, value_dim]). rows_found(unique rows): called as soon as they are known,
    before the sums are queued (a caller that copies their ids to the host then waits for the value
    gradients only, and the GPU sums meanwhile).
    The sums over the slots are sparse products over the store's rows (_Slots), except with float16
    keys, whose weighted sums gather the keys a block of queries at a time, or on a GPU run as two
    Triton kernels (the dots, the keys' sums: datastore/slot_kernels.py; the value gradients stay the
    sparse product there too).
    """
    batch, k = rows.shape
    device = values.device
    dim = keys.shape[1]
    rows_found = rows_found or (lambda unique_rows: None)
    if values.shape[0] == 0:  # nothing stored here: no slot is held, every sum is zero
        unique_rows = torch.zeros(0, dtype=torch.int64, device=device)
        rows_found(unique_rows)
        return (torch.zeros(batch, 2 * dim + 4, dtype=torch.float64, device=device), unique_rows,
                torch.zeros(0, values.shape[1], dtype=torch.float32, device=device))
    held = rows >= 0
    zero = torch.zeros((), device=device)
    a = torch.where(held, alpha, zero)                                    # empty slots weigh 0
    d = torch.where(held, distances, zero)
    slots = _Slots(rows, values.shape[0])
    unique_rows, value_grads = slots.per_row(a, grad_memory)               # dL/dv_u = sum a * g_b
    rows_found(unique_rows)
    if slot_kernels.available(keys, values):  # float16 keys on a GPU: Triton passes (datastore/slot_kernels.py)
        agv, weighted_keys, alpha_keys = slot_kernels.slot_sums(keys, values, rows, a, grad_memory)
        return _packed(weighted_keys, alpha_keys, agv, a, d), unique_rows, value_grads
    if keys.dtype == torch.float32:
        agv = a * slots.sampled_dots(grad_memory, values)                  # alpha * g.v_i  [B, k]
        weighted_keys, alpha_keys = slots.times(agv, keys), slots.times(a, keys)
    else:
        agv = a * slots.sampled_dots(grad_memory, values)
        weighted_keys = torch.empty(batch, dim, dtype=torch.float32, device=device)
        alpha_keys = torch.empty(batch, dim, dtype=torch.float32, device=device)
        for part in _chunks(batch, k, dim):
            gathered_keys = keys[rows[part].clamp_min(0)].float()          # [b, k, dim]
            weighted_keys[part] = torch.bmm(agv[part].unsqueeze(1), gathered_keys).squeeze(1)
            alpha_keys[part] = torch.bmm(a[part].unsqueeze(1), gathered_keys).squeeze(1)
    return _packed(weighted_keys, alpha_keys, agv, a, d), unique_rows, value_grads


def _packed(weighted_keys, alpha_keys, agv, a, d) -> torch.Tensor:
    """The BackwardPartials in one float64 tensor [B, 2 dim + 4], for one copy to the host where the
    sums of several shards are added."""
    agv, a, d = agv.double(), a.double(), d.double()
    return torch.cat([weighted_keys.double(), alpha_keys.double(), agv.sum(1, keepdim=True),
                      (agv * d).sum(1, keepdim=True), (a * d).sum(1, keepdim=True), a.sum(1, keepdim=True)], dim=1)


def combine_backward(partials: BackwardPartials, queries, metric: str,
                     temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_queries float32 [B, dim], grad_temperature float64 []) from the partials summed over all shards,
    on their device: the host's for numpy partials (a router adding several shards'), a lone GPU
    shard's own for its tensors (only grad_queries then leaves the GPU, not the sums: 4x the bytes).
    In float64, in as few passes over the [B, dim] arrays as torch allows (fused multiply-adds in
    place; on the host with torch's threads: numpy's elementwise passes run on one, and a GPU shard's
    endpoint has one CPU). queries: float32 [B, dim], numpy or a tensor. The partials are not changed.
    grad_temperature is a tensor on the partials' device: float() of it waits for the device, so a caller
    with more to queue (a step's commit) queues it first and waits once."""
    weighted_keys, alpha_keys, grad_m_dot_m, grad_dot_dist, alpha_dist, alpha_total = (
        _float64(getattr(partials, f.name)) for f in dataclasses.fields(partials))
    sum_c_keys = torch.addcmul(weighted_keys, grad_m_dot_m[:, None], alpha_keys, value=-1.0)
    sum_c_dist = grad_dot_dist - grad_m_dot_m * alpha_dist
    if metric == "l2":
        sum_c = grad_m_dot_m * (1.0 - alpha_total)                         # 0 up to rounding
        queries = queries.to(sum_c.device) if torch.is_tensor(queries) else to_device(queries, sum_c.device)
        # -(2 / T) (q sum_c - sum_c_keys), in place on sum_c_keys (float32 queries promote exactly).
        grad_queries = sum_c_keys.addcmul_(queries, sum_c[:, None], value=-1.0).mul_(2.0 / temperature)
    else:
        grad_queries = sum_c_keys.div_(temperature)
    return grad_queries.float(), sum_c_dist.sum() / temperature**2


def _float64(array) -> torch.Tensor:
    if torch.is_tensor(array):
        return array.to(torch.float64)
    return source_tensor(np.asarray(array, np.float64))
