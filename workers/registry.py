"""NamespaceRegistry: namespace configs and id allocation for a deployment.

Runs as one named Ray actor so that several front ends share it. Ids are a
per-namespace counter: an Add of N rows takes the block [next_id, next_id+N),
so ids are unique across shards and front ends and stay an entry's for life.
"""

from __future__ import annotations

from monim.datastore import NamespaceConfig
from monim.protos.errors import AlreadyExists, InvalidArgument, NamespaceNotFound


class NamespaceRegistry:
    def __init__(self, num_shards: int):
        if num_shards < 1:
            raise InvalidArgument(f"a deployment needs at least one shard, got {num_shards}")
        self.num_shards = num_shards
        self.configs: dict[str, dict] = {}
        self.next_ids: dict[str, int] = {}

    def shard_count(self) -> int:
        return self.num_shards

    def create(self, config: dict) -> dict:
        name = NamespaceConfig.from_dict(config).name
        if name in self.configs:
            raise AlreadyExists(f"namespace {name!r} already exists")
        self.configs[name] = dict(config)
        self.next_ids[name] = 0
        return self.configs[name]

    def drop(self, name: str) -> None:
        if self.configs.pop(name, None) is None:
            raise NamespaceNotFound(name)
        self.next_ids.pop(name, None)

    def config(self, name: str) -> dict:
        config = self.configs.get(name)
        if config is None:
            raise NamespaceNotFound(name)
        return config

    def list(self) -> list[dict]:
        return [self.configs[name] for name in sorted(self.configs)]

    def allocate_ids(self, name: str, count: int) -> int:
        """Reserves ``count`` ids; returns the first."""
        if name not in self.configs:
            raise NamespaceNotFound(name)
        start = self.next_ids[name]
        self.next_ids[name] = start + count
        return start

    def next_id(self, name: str) -> int:
        self.config(name)
        return self.next_ids[name]
