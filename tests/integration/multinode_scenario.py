"""Multi-node on one machine: a Ray cluster of simulated nodes (``ray.cluster_utils.Cluster``), run
by tests/integration/test_multinode.py in a process of its own (this cluster is not the session's Ray).

    python -m tests.integration.multinode_scenario DATA_DIR   (prints one JSON line: what it saw)

A head without CPUs (the front end's process) and three nodes of 2 CPUs each, all on 127.0.0.1:
1. a durable deployment of 2 shards placed ``spread``: its shards' bundles and actors on two nodes;
   rows added, searches exact against a brute force;
2. ``strict_pack``: both shards of a second deployment on one node;
3. ``strict_spread`` of 4 shards on 3 nodes: refused (UNAVAILABLE, its message), nothing left behind;
4. the node of the first deployment's shard 0 killed (its raylet and workers, SIGKILL): the shard
   restarts on another node, from the data dir, and searches stay exact, with every row;
5. a reshard to 3 shards places the new one in a group of its own, and back to 2 removes that group;
   a reshard to 8, for which the cluster has no room, is refused before anything moves.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

DIM, ROWS, K = 16, 3000, 10


def brute_force(keys: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    distances = ((queries[:, None, :] - keys[None, :, :]) ** 2).sum(-1)
    return np.argsort(distances, axis=1, kind="stable")[:, :k]


def shard_nodes(store) -> dict:
    runtime = store.runtime
    actors = {shard: runtime.shard_host(shard, timeout_s=120)["node_id"] for shard in range(runtime.num_shards)}
    return {"actors": actors, "bundles": runtime.groups.nodes()}


def wait_until_moved(store, victim: str, timeout_s: float = 180.0) -> float:
    """Seconds until shard 0 answers from a node other than the killed one."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if store.runtime.shard_host(0, timeout_s=10)["node_id"] != victim:
                return round(time.monotonic() - started, 1)
        except Exception:  # noqa: BLE001 - dead or restarting: ask again
            pass
        time.sleep(0.5)
    raise TimeoutError(f"shard 0 did not restart off node {victim} within {timeout_s} s")


def exact(client, namespace: str, keys: np.ndarray, ids: np.ndarray, queries: np.ndarray) -> bool | str:
    """True, or what differs from the brute force over keys, whose ids are ids (the first query that differs)."""
    found = client.search(namespace, queries, K)
    expected = ids[brute_force(keys, queries, K)]
    wrong = np.flatnonzero((found.ids != expected).any(axis=1))
    if wrong.size == 0:
        return True
    return f"{wrong.size} queries differ; query {wrong[0]}: {found.ids[wrong[0]].tolist()} != {expected[wrong[0]].tolist()}"


def main(data_dir: str) -> dict:
    import ray
    from monim.model_client import MemoryClient
    from monim.protos.errors import Unavailable
    from monim.workers.embedded import EmbeddedStore
    from monim.workers.reshard import reshard
    from ray.cluster_utils import Cluster

    seen: dict = {}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=2) for _ in range(3)]
    cluster.wait_for_nodes()
    seen["nodes"] = [node.node_id for node in nodes]
    rng = np.random.default_rng(11)
    keys = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    queries = keys[:40] + 0.01 * rng.standard_normal((40, DIM)).astype(np.float32)
    store = EmbeddedStore(shards=2, ray_address=cluster.address, use_gpus=False, deployment="spread",
                          data_dir=data_dir, placement="spread", placement_wait_s=15)
    try:
        with MemoryClient(store.address, timeout_s=180) as client:
            client.create_namespace("docs", dim=DIM)
            ids = client.add("docs", keys, np.arange(ROWS) % 256)
            seen["spread"] = shard_nodes(store)
            seen["exact_before"] = exact(client, "docs", keys, ids, queries)

            packed = EmbeddedStore(shards=2, ray_address=cluster.address, use_gpus=False, deployment="packed",
                                   placement="strict_pack")
            seen["strict_pack"] = shard_nodes(packed)
            packed.stop()
            seen["packed_groups_left"] = [g.name for g in packed.runtime.groups.groups()]

            try:
                EmbeddedStore(shards=4, ray_address=cluster.address, use_gpus=False, deployment="toomany",
                              placement="strict_spread", placement_wait_s=10)
                seen["strict_spread_4"] = "started"
            except Unavailable as error:
                seen["strict_spread_4"] = error.message
            seen["toomany_left"] = [info["name"] for info in ray.util.placement_group_table().values()
                                    if info["name"].startswith("toomany") and info["state"] != "REMOVED"]
            seen["toomany_left"] += [name for name in ray.util.list_named_actors() if name.startswith("toomany")]

            victim_id = seen["spread"]["actors"][0]
            victim = next(node for node in nodes if node.node_id == victim_id)
            cluster.remove_node(victim, allow_graceful=False)
            seen["victim"] = victim_id
            seen["moved_s"] = wait_until_moved(store, victim_id)
            seen["after"] = shard_nodes(store)
            seen["exact_after"] = exact(client, "docs", keys, ids, queries)
            seen["rows_after"] = client.describe_namespace("docs").rows
            more = rng.standard_normal((10, DIM)).astype(np.float32)
            # The registry may have been on the dead node: a restarted one skips to its next id block.
            ids = np.concatenate([ids, client.add("docs", more, np.zeros(10, np.int64))])
            seen["rows_after_add"] = client.describe_namespace("docs").rows
            keys = np.concatenate([keys, more])

            reshard(store.router, 3)  # the new shard gets a group of its own; the shrink gives it back
            seen["groups_at_3"] = [group.name for group in store.runtime.groups.groups()]
            seen["exact_at_3"] = exact(client, "docs", keys, ids, queries)
            reshard(store.router, 2)
            seen["groups_at_2"] = [group.name for group in store.runtime.groups.groups()]
            seen["exact_at_2"] = exact(client, "docs", keys, ids, queries)

            try:  # 6 more shards of 1 CPU where 4 CPUs are free: refused before the move begins
                reshard(store.router, 8)
                seen["reshard_8"] = "moved"
            except Unavailable as error:
                seen["reshard_8"] = error.message
            seen["groups_after_8"] = [group.name for group in store.runtime.groups.groups()]
            seen["shards_after_8"] = len(client.describe_namespace("docs").shards)
            seen["exact_after_8"] = exact(client, "docs", keys, ids, queries)
    finally:
        store.runtime.destroy()
        store.stop()
        ray.shutdown()
        cluster.shutdown()
    return seen


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])), flush=True)
