"""Snapshots through the service: a 2-shard deployment's snapshot restored into a 3-shard one gives
the same answers; the files are plain Parquet; a damaged, newer or misplaced snapshot is refused
and nothing is loaded."""

from __future__ import annotations

import json
import shutil
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
from monim.model_client import MemoryClient
from monim.protos.errors import AlreadyExists, FailedPrecondition, InvalidArgument

DIM, VALUE_DIM = 16, 8


@pytest.fixture(scope="module")
def two_deployments(ray_joined, tmp_path_factory):
    """A 2-shard and a 3-shard durable deployment sharing one snapshot root: (client 2, client 3, root)."""
    from monim.workers.embedded import EmbeddedStore

    root = tmp_path_factory.mktemp("snapshots")
    stores = [EmbeddedStore(shards=shards, ray_address="auto", shard_cpus=0, use_gpus=False,
                            deployment=f"snap{shards}-{uuid.uuid4().hex[:6]}",
                            data_dir=str(tmp_path_factory.mktemp(f"data{shards}")), fsync="never",
                            snapshot_root=str(root))
              for shards in (2, 3)]
    clients = [MemoryClient(store.address, timeout_s=300) for store in stores]
    try:
        yield clients[0], clients[1], root
    finally:
        for client, store in zip(clients, stores):
            client.close()
            store.server.stop(1).wait()
            store.runtime.destroy()


def fill(client, name):
    rng = np.random.default_rng(0)
    client.create_namespace(name, dim=DIM, value_dim=VALUE_DIM, optimizer="adam", lr=0.01)
    for day in range(3):
        client.add(name, rng.standard_normal((1000, DIM)).astype(np.float32), rng.integers(0, 100, 1000),
                   values=rng.standard_normal((1000, VALUE_DIM)).astype(np.float32), source=f"day-{day}")
    client.apply_gradients(name, rng.integers(0, 3000, 500), rng.standard_normal((500, VALUE_DIM)).astype(np.float32))
    client.delete(name, ids=np.arange(0, 3000, 7))
    return rng.standard_normal((200, DIM)).astype(np.float32)


def test_a_snapshot_restores_into_another_shard_count_with_the_same_answers(two_deployments):
    source, target, root = two_deployments
    name = f"ns-{uuid.uuid4().hex[:6]}"
    queries = fill(source, name)
    info = source.create_snapshot(f"s-{name}", name)
    assert info["shards"] == 2 and info["rows"] == {name: source.describe_namespace(name).rows}
    files = sorted((root / f"s-{name}").glob("shard-*/*.parquet"))
    assert len(files) == 2 and sum(pq.read_table(f).num_rows for f in files) == info["rows"][name]
    assert target.restore_snapshot(f"s-{name}") == info["rows"]
    assert target.describe_namespace(name).rows == info["rows"][name]
    assert len(target.describe_namespace(name).shards) == 3
    before, after = source.search(name, queries, 10), target.search(name, queries, 10)
    np.testing.assert_array_equal(after.ids, before.ids)
    # The same distances up to float32 rounding: faiss's BLAS kernel may block 2 and 3 shards' rows
    # differently (seen: 6e-7 relative).
    np.testing.assert_allclose(after.distances, before.distances, rtol=1e-5, atol=1e-6)
    ids = np.unique(before.ids)
    was, now = source.get(name, ids, return_optimizer_state=True), target.get(name, ids, return_optimizer_state=True)
    np.testing.assert_array_equal(now.values, was.values)
    assert now.sources == was.sources
    for column in was.optimizer_state:
        np.testing.assert_array_equal(now.optimizer_state[column], was.optimizer_state[column])
    new = target.add(name, np.ones((2, DIM), np.float32), np.arange(2))
    assert new.min() >= 3000  # ids continue after the snapshot's, never reused
    assert f"s-{name}" in [s["location"] for s in target.list_snapshots()]
    with pytest.raises(AlreadyExists):
        target.restore_snapshot(f"s-{name}")


def damaged(root, name, how):
    copy = root / f"{name}-{how}"
    shutil.copytree(root / name, copy)
    if how == "flipped byte":
        path = sorted(copy.glob("shard-*/*.parquet"))[0]
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    else:
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["format_version"] = 99
        (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy.name


@pytest.mark.parametrize("how", ["flipped byte", "newer format"])
def test_a_damaged_or_newer_snapshot_is_refused_and_nothing_is_loaded(two_deployments, how):
    source, target, root = two_deployments
    name = f"ns-{uuid.uuid4().hex[:6]}"
    fill(source, name)
    source.create_snapshot(f"s-{name}", name)
    with pytest.raises(FailedPrecondition, match="checksum|format version|does not match"):
        target.restore_snapshot(damaged(root, f"s-{name}", how))
    assert name not in [config.name for config in target.list_namespaces()]


@pytest.mark.parametrize("location", ["../elsewhere", "/tmp/outside-the-root", "a/../../b"])
def test_a_location_outside_the_snapshot_root_is_refused(two_deployments, location):
    source, _, _ = two_deployments
    with pytest.raises(InvalidArgument, match=r"outside|\.\.|leave"):
        source.create_snapshot(location)
