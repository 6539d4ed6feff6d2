"""Plain result containers shared by the store, the service and the client."""

from __future__ import annotations

import dataclasses

import numpy as np
from monim.protos.validation import is_tensor

MISSING_ID = -1


@dataclasses.dataclass
class SearchResult:
    """Top-k neighbours of a batch of queries, nearest first.

    ids: int64 [B, k]; -1 in slots beyond the rows that exist.
    distances: float32 [B, k]; squared L2, or negative inner product for ip;
        +inf in missing slots. Smaller is nearer.
    tokens: int32 [B, k]; -1 in missing slots.
    keys: float32 [B, k, dim], values: float32 [B, k, value_dim],
    weights: float32 [B, k]: only when asked for (zeros in missing slots).
    generation: of the namespace the ids belong to (see NamespaceConfig).
    """

    ids: np.ndarray
    distances: np.ndarray
    tokens: np.ndarray
    keys: np.ndarray | None = None
    values: np.ndarray | None = None
    weights: np.ndarray | None = None
    generation: int = 0

    @property
    def tensors(self) -> bool:
        """Whether the arrays are torch tensors (a result of as_tensors)."""
        return is_tensor(self.ids)

    def to_tensors(self, device) -> "SearchResult":
        """This result with its arrays as torch tensors on device (tensors_on)."""
        return dataclasses.replace(self, **tensors_on(device, {field: getattr(self, field) for field in (
            "ids", "distances", "tokens", "keys", "values", "weights")}))


def tensors_on(device, arrays: dict) -> dict:
    """{name: torch tensor on device} of {name: numpy array, tensor or None} (None stays out): numpy
    arrays on the host as they are (no copy), to a GPU in one copy of them all (a decoding step's six
    small arrays: one transfer, not six, each of which would wait for the host)."""
    import torch  # only asked for by a caller that has torch

    device = torch.device(device)
    tensors = {name: array.to(device) for name, array in arrays.items() if isinstance(array, torch.Tensor)}
    host = {name: np.ascontiguousarray(array) for name, array in arrays.items()
            if array is not None and name not in tensors}
    if device.type != "cuda":
        tensors.update({name: torch.from_numpy(array).to(device) for name, array in host.items()})
    elif host:
        offsets, end = {}, 0
        for name, array in host.items():
            offsets[name] = end
            end += -(-array.nbytes // 8) * 8  # each array 8-byte aligned: a view of any dtype
        staged = torch.empty(end, dtype=torch.uint8, pin_memory=True)
        for name, array in host.items():
            staged.numpy()[offsets[name]:offsets[name] + array.nbytes] = array.reshape(-1).view(np.uint8)
        moved = staged.to(device, non_blocking=True)  # (the host allocator keeps the buffer until it is done)
        for name, array in host.items():
            part = moved[offsets[name]:offsets[name] + array.nbytes]
            tensors[name] = part.view(torch.from_numpy(array[:0].reshape(-1)).dtype).reshape(array.shape)
    return tensors


@dataclasses.dataclass
class Rows:
    """Stored entries, in the order of the ids asked for.

    ids int64 [N], keys float32 [N, dim], tokens int32 [N],
    values float32 [N, value_dim] or None, weights float32 [N], sources list[str].
    """

    ids: np.ndarray
    keys: np.ndarray
    tokens: np.ndarray
    values: np.ndarray | None
    weights: np.ndarray
    sources: list
    optimizer_state: dict | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])


# A RetrieveResult's arrays, in the answer's order: the memory, then the neighbours' columns.
RETRIEVED = ("memory", "ids", "alpha", "distances", "tokens", "weights")


@dataclasses.dataclass
class RetrieveResult:
    """The memory output of a MoNIM layer and what its backward needs.

    memory: float32 [B, value_dim] = sum_i alpha_i v_i.
    ids int64 [B, k], alpha float32 [B, k], distances float32 [B, k],
    tokens int32 [B, k], weights float32 [B, k] of the global top-k (None, all five, for a Retrieve
    with memory_only).
    queries and temperature are the forward's inputs, kept for the backward;
    generation: of the namespace the ids belong to (the backward carries it).
    handle: names the forward's state kept at the front end ("" if none: the backward sends the arrays).
    With ``as_tensors`` (MemoryClient.retrieve) the arrays are torch tensors on the queries' device.
    """

    memory: np.ndarray
    ids: np.ndarray | None = None
    alpha: np.ndarray | None = None
    distances: np.ndarray | None = None
    tokens: np.ndarray | None = None
    weights: np.ndarray | None = None
    queries: np.ndarray | None = None
    temperature: float = 1.0
    generation: int = 0
    handle: str = ""

    @property
    def tensors(self) -> bool:
        """Whether the arrays are torch tensors (a result of as_tensors)."""
        return is_tensor(self.memory)

    def to_tensors(self, device, queries=None) -> "RetrieveResult":
        """This result with its arrays as torch tensors on device (tensors_on). queries: the tensor the
        forward was given, kept as it is (else this result's queries go there too)."""
        arrays = {field: getattr(self, field) for field in (*RETRIEVED, "queries")}
        if queries is not None:
            arrays["queries"] = None
        tensors = tensors_on(device, arrays)
        if queries is not None:
            tensors["queries"] = queries
        return dataclasses.replace(self, **tensors)

    @property
    def rows(self) -> int:
        return int(self.memory.shape[0])

    @property
    def has_neighbours(self) -> bool:
        """Whether it carries the neighbours (ids, alpha, ...): not a Retrieve's with memory_only."""
        return self.ids is not None


@dataclasses.dataclass
class AddResult:
    """What an Add with admission did to each row.

    ids int64 [N]: the new entry's id; for a merged row the id of the entry
    whose weight grew; -1 for a row that was not admitted.
    admitted bool [N]: log p < threshold (all True without log p).
    merged bool [N]: admitted, and merged into an existing entry.
    generation: of the namespace the rows went to.
    """

    ids: np.ndarray
    admitted: np.ndarray
    merged: np.ndarray
    generation: int = 0
