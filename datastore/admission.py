"""What to memorize (SeMem admission) and which rows merge into existing entries.

Admission: a row is stored only if the model found its token hard,
``log p(token) < admit_below`` (default -1.5, the SeMem rule).
Merge: an admitted row whose nearest existing entries include one with the
same token at distance < ``merge_eps`` (the namespace's distance: squared L2,
or negative inner product) adds 1 to that entry's weight instead of becoming a
new row. Rows of one batch are merged only into entries stored before it.
"""

from __future__ import annotations

import numpy as np
from monim.protos.config import DEFAULT_ADMIT_BELOW  # noqa: F401 - re-exported: the rule's default
from monim.protos.results import SearchResult

# Neighbours looked at when searching for a merge target.
MERGE_CANDIDATES = 8


def admitted_mask(logp: np.ndarray | None, admit_below: float) -> np.ndarray:
    """bool [N]: which rows to memorize; all of them when no log-probabilities are given."""
    if logp is None:
        return None
    return logp < admit_below


def merge_targets(neighbours: SearchResult, tokens: np.ndarray, merge_eps: float) -> np.ndarray:
    """int64 [N]: per row, the nearest existing entry with the same token closer than merge_eps, else -1."""
    candidates = (neighbours.ids >= 0) & (neighbours.tokens == tokens[:, None]) & (neighbours.distances < merge_eps)
    first = np.argmax(candidates, axis=1)
    targets = np.take_along_axis(neighbours.ids, first[:, None], axis=1)[:, 0]
    return np.where(candidates.any(axis=1), targets, -1)


def weight_increments(targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct target ids, how many rows merged into each)."""
    ids, counts = np.unique(targets[targets >= 0], return_counts=True)
    return ids, counts.astype(np.float32)
