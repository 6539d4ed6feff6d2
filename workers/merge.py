"""Merging per-shard top-k lists into the global top-k."""

from __future__ import annotations

import numpy as np
import torch
from monim.datastore import SearchResult

_FIELDS = ("ids", "tokens", "keys", "values", "weights")


def merge_topk(results: list[SearchResult], k: int) -> SearchResult:
    """Global top-k of per-shard results, each [B, k] and sorted nearest first.

    The shard lists are concatenated to [B, S*k] and the positions of the k
    nearest are found per row:
    - S = 2: numpy's stable argsort. It is a timsort: it finds the two sorted
      runs and merges them in linear time (about 1.5x faster than torch.topk at
      B=4096, k=1024 on 2 CPUs). Equal distances keep shard order.
    - S > 2: torch.topk (multi-threaded). Timsort's merge of more runs is slower
      than topk (2x at S=4, 4x at S=8).
    Every field the shards returned is then gathered with one flat index into
    the concatenated rows; fields not asked for stay None. Missing slots
    (+inf, id -1) sort last.
    """
    if len(results) == 1:
        return results[0]
    distances = np.concatenate([r.distances for r in results], axis=1)
    batch, width = distances.shape
    if len(results) == 2:
        order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    else:
        order = torch.topk(torch.from_numpy(distances), k, dim=1, largest=False, sorted=True).indices.numpy()
    flat = order + (np.arange(batch, dtype=np.int64) * width)[:, None]

    def pick(parts):
        merged = np.concatenate(parts, axis=1)  # [B, S*k, ...]
        return merged.reshape((batch * width,) + merged.shape[2:]).take(flat, axis=0)

    fields = {name: None if getattr(results[0], name) is None else pick([getattr(r, name) for r in results])
              for name in _FIELDS}
    return SearchResult(distances=distances.reshape(-1).take(flat), **fields)
