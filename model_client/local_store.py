"""The in-process store behind ``MemoryClient(":memory:")``: the router over one in-process shard.

The same code as the service (same validation, same errors, same id
numbering, same steps), as a local Qdrant collection is simply one shard;
no Ray, no network.
"""

from __future__ import annotations

from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime


class LocalMemory(Router):
    """device: where the shard keeps its rows ("cpu", or "cuda" for the torch kernel)."""

    def __init__(self, device: str = "cpu"):
        super().__init__(LocalRuntime(1, device))
        self.device = device
