"""NamespaceRegistry: namespace configs, generations and id allocation for a deployment.

Runs as one named Ray actor so that several front ends share it. Ids are a
per-namespace counter: an Add of N new rows takes the block [next_id, next_id+N),
so ids are unique across shards and front ends and stay an entry's for life.

Each incarnation of a name gets a random 62-bit generation when it is created,
so a namespace dropped and created again (even by a registry that restarted
and forgot the old one) never shares a generation with its predecessor; shards
refuse requests for a generation they do not hold.

Create and the id block of an Add are remembered by request id, so a front
end that retries a request gets the same generation and the same ids.
"""

from __future__ import annotations

import collections
import secrets

import numpy as np
from monim.datastore import NamespaceConfig
from monim.protos.errors import AlreadyExists, InvalidArgument, NamespaceChanged, NamespaceNotFound

REMEMBERED_REQUESTS = 100_000
REMEMBERED_TARGETS = 10_000_000  # merge targets of remembered Add plans, at most


def new_generation() -> int:
    """A random non-zero generation (0 means "not created" / "whichever is current")."""
    return secrets.randbits(62) | 1


class NamespaceRegistry:
    def __init__(self, num_shards: int):
        if num_shards < 1:
            raise InvalidArgument(f"a deployment needs at least one shard, got {num_shards}")
        self.num_shards = num_shards
        self.configs: dict[str, dict] = {}
        self.next_ids: dict[str, int] = {}
        self.created_by: dict[str, str] = {}
        self._plans: collections.OrderedDict = collections.OrderedDict()  # request id -> (targets or N, first id)
        self._kept_targets = 0

    def shard_count(self) -> int:
        return self.num_shards

    def create(self, config: dict, request_id: str = "") -> dict:
        """Registers the namespace with a new generation; returns its config. A retry of the
        request that created it answers the same config; anything else: ALREADY_EXISTS."""
        name = NamespaceConfig.from_dict(config).name
        if name in self.configs:
            if request_id and self.created_by.get(name) == request_id:
                return self.configs[name]
            raise AlreadyExists(f"namespace {name!r} already exists")
        self.configs[name] = dict(config, generation=new_generation())
        self.next_ids[name] = 0
        self.created_by[name] = request_id
        return self.configs[name]

    def drop(self, name: str, generation: int = 0) -> dict:
        """Unregisters the namespace (of this generation, if given); returns its config."""
        config = self.config(name, generation)
        del self.configs[name]
        self.next_ids.pop(name, None)
        self.created_by.pop(name, None)
        return config

    def config(self, name: str, generation: int = 0) -> dict:
        config = self.configs.get(name)
        if config is None:
            raise NamespaceNotFound(name)
        if generation and config["generation"] != generation:
            raise NamespaceChanged(name, generation, config["generation"])
        return config

    def list(self) -> list[dict]:
        return [self.configs[name] for name in sorted(self.configs)]

    def plan_add(self, name: str, generation: int, request_id: str, targets: np.ndarray) -> tuple[np.ndarray, int]:
        """Records an Add's merge plan (targets int64 [N]: the entry a row merges into, or -1 for a
        new row) and reserves ids for its new rows; returns (targets, first id). A retry of the
        request answers the first plan, so the retry adds and merges exactly the same rows."""
        self.config(name, generation)
        if request_id and request_id in self._plans:
            kept, start = self._plans[request_id]
            return (np.full(kept, -1, np.int64) if isinstance(kept, int) else kept), start
        start = self.next_ids[name]
        self.next_ids[name] = start + int((targets < 0).sum())
        if request_id:
            # A plan without merges is remembered as its length only.
            self._plans[request_id] = (targets.size if (targets < 0).all() else targets, start)
            self._kept_targets += 0 if (targets < 0).all() else targets.size
            while len(self._plans) > REMEMBERED_REQUESTS or self._kept_targets > REMEMBERED_TARGETS:
                kept, _ = self._plans.popitem(last=False)[1]
                self._kept_targets -= 0 if isinstance(kept, int) else kept.size
        return targets, start

    def next_id(self, name: str) -> int:
        self.config(name)
        return self.next_ids[name]
