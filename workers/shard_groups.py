"""Where the shard actors run: Ray placement groups, one bundle per shard (docs/OPERATIONS.md, "Multi-node").

A shard's bundle holds what its actor asks for (``--shard-cpus`` CPUs, one GPU on GPU shards). The
shards created together (a new deployment, or the shards a reshard adds) get one placement group,
named ``<deployment>-shards-<first>-<end>``, placed by the deployment's strategy:

    spread         (default) the bundles on as many nodes as can take them, best effort
    strict_spread  every bundle on another node, or the shards are not created
    pack           on as few nodes as possible, best effort
    strict_pack    all on one node, or the shards are not created

Ray reserves a group's bundles all at once or not at all, so a deployment never starts with part
of its shards; ``reserve`` waits up to ``wait_s`` and then answers UNAVAILABLE with what the
cluster has free. A durable deployment's groups are detached, as its actors are: when a node dies,
Ray moves the group's bundles from it to nodes with room, and the shard actors restart there and
recover from the data dir (which must then be one every node reaches: a shared folder or a
pyarrow.fs URI). A shard that a reshard removes gives its bundle back with its group once every
shard of the group is gone; until then a later reshard that adds that shard again reuses it.
"""

from __future__ import annotations

import dataclasses
import logging
import re

from monim.protos.errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

STRATEGIES = {"spread": "SPREAD", "strict_spread": "STRICT_SPREAD", "pack": "PACK", "strict_pack": "STRICT_PACK"}
DEFAULT_STRATEGY = "spread"
# How long a new group may wait for the cluster to have room for it.
DEFAULT_WAIT_S = 120.0


class _QuietRestartWarning(logging.Filter):
    """Ray warns, for every restartable detached actor in a placement group, that removing the group
    kills it for good: a durable deployment's groups are removed only with their shards (release_from)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "restartable detached actor with a placement group" not in record.getMessage()


logging.getLogger("ray.actor").addFilter(_QuietRestartWarning())


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise InvalidArgument(f"unknown placement {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    return strategy


@dataclasses.dataclass(frozen=True)
class Group:
    """A placement group of shards [first, end)."""

    name: str
    first: int
    end: int

    def holds(self, shard: int) -> bool:
        return self.first <= shard < self.end


class ShardGroups:
    """The deployment's placement groups; ``scheduling(shards)`` gives each shard's Ray scheduling
    strategy, reserving a group for the shards no group holds yet."""

    def __init__(self, ray, deployment: str, strategy: str, bundle: dict[str, float], detached: bool,
                 wait_s: float = DEFAULT_WAIT_S):
        self._ray, self.deployment, self.strategy = ray, deployment, check_strategy(strategy)
        self.bundle = {name: amount for name, amount in bundle.items() if amount > 0}
        self.detached, self.wait_s = detached, wait_s
        self._pattern = re.compile(rf"{re.escape(deployment)}-shards-(\d+)-(\d+)")

    def scheduling(self, shards: list[int]) -> dict[int, object]:
        """shard -> the scheduling strategy its actor is created with."""
        if not self.bundle:  # shards that hold no resources have nothing to reserve: Ray's spread or default
            return {shard: "SPREAD" if self.strategy.endswith("spread") else "DEFAULT" for shard in shards}
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        groups = self.groups()
        unplaced = [shard for shard in shards if not any(group.holds(shard) for group in groups)]
        for run in _runs(unplaced):
            groups.append(self._reserve(run[0], run[-1] + 1))
        handles = {group.name: self._ray.util.get_placement_group(group.name) for group in groups
                   if any(group.holds(shard) for shard in shards)}
        out = {}
        for shard in shards:
            group = next(group for group in groups if group.holds(shard))
            out[shard] = PlacementGroupSchedulingStrategy(
                handles[group.name], placement_group_bundle_index=shard - group.first,
                placement_group_capture_child_tasks=False)
        return out

    def groups(self) -> list[Group]:
        """The deployment's groups that Ray holds (created or being placed), by first shard."""
        found = []
        for info in self._ray.util.placement_group_table().values():
            match = self._pattern.fullmatch(info.get("name", ""))
            if match and info.get("state") != "REMOVED":
                found.append(Group(info["name"], int(match.group(1)), int(match.group(2))))
        return sorted(found, key=lambda group: group.first)

    def nodes(self) -> dict[int, str]:
        """shard -> the id of the node its bundle is on (shards whose group is placed)."""
        table = self._ray.util.placement_group_table()
        by_name = {info.get("name"): info for info in table.values() if info.get("state") != "REMOVED"}
        out = {}
        for group in self.groups():
            for index, node in by_name[group.name].get("bundles_to_node_id", {}).items():
                out[group.first + int(index)] = node
        return out

    def release_from(self, count: int) -> None:
        """After a shrink to ``count`` shards: the groups of shards that are all gone are removed (their
        bundles go back to the cluster); a group holding shards below count keeps its other bundles."""
        for group in self.groups():
            if group.first >= count:
                self._ray.util.remove_placement_group(self._ray.util.get_placement_group(group.name))
                log.info("placement group %s removed (its shards were retired)", group.name)
            elif group.end > count:
                log.info("placement group %s keeps the bundles of retired shards %d-%d until all its shards go",
                         group.name, count, group.end - 1)

    def _reserve(self, first: int, end: int) -> Group:
        name = f"{self.deployment}-shards-{first}-{end}"
        group = self._ray.util.placement_group([dict(self.bundle) for _ in range(first, end)],
                                               strategy=STRATEGIES[self.strategy], name=name,
                                               lifetime="detached" if self.detached else None)
        try:
            self._ray.get(group.ready(), timeout=self.wait_s)
        except self._ray.exceptions.GetTimeoutError:
            self._ray.util.remove_placement_group(group)
            free = {name: amount for name, amount in sorted(self._ray.available_resources().items())
                    if name in ("CPU", "GPU")}
            nodes = sum(1 for node in self._ray.nodes() if node.get("Alive"))
            hint = "add nodes or lower --shard-cpus" + (", or use --placement spread or pack"
                                                        if self.strategy.startswith("strict") else "")
            raise Unavailable(
                f"the Ray cluster has no room for shards {first}-{end - 1} placed {self.strategy} (one bundle of "
                f"{self.bundle} each) within {self.wait_s:g} s: {nodes} node(s) alive, {free} free; {hint}") from None
        log.info("placement group %s: shards %d-%d placed %s", name, first, end - 1, self.strategy)
        return Group(name, first, end)


def _runs(shards: list[int]) -> list[list[int]]:
    """Sorted shard indices split into runs of consecutive ones."""
    runs: list[list[int]] = []
    for shard in sorted(shards):
        if runs and runs[-1][-1] == shard - 1:
            runs[-1].append(shard)
        else:
            runs.append([shard])
    return runs
