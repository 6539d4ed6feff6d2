"""A data dir in any filesystem pyarrow.fs opens: a local folder given as a file:// URI, a
SubTreeFileSystem over a local folder, and the in-memory _MockFileSystem, which stands for an
object store (no appends, no fsync: every group commit uploads one segment object). Whatever was
acknowledged is there after a restart; the objects' failures are refused as the log's are."""

from __future__ import annotations

import numpy as np
import pyarrow.fs as pafs
import pytest
from monim.datastore import NamespaceConfig
from monim.datastore import wal as wal_module
from monim.datastore.location import Location
from monim.datastore.wal import WriteAheadLog, read_segment
from monim.protos.errors import InvalidArgument, Unavailable
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime

from tests.unit.test_durability import DIM, feed, state

Mock = getattr(pafs, "_MockFileSystem", None)
needs_mock = pytest.mark.skipif(Mock is None, reason="this pyarrow has no in-memory filesystem")


def data_dir_of(kind: str, tmp_path):
    if kind == "file-uri":
        return tmp_path.as_uri()
    if kind == "subtree":
        return pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    return Mock()


def deployment(data_dir, fsync="always", snapshot_every=0, shards=2):
    return Router(LocalRuntime(shards, data_dir=data_dir, fsync=fsync, snapshot_every=snapshot_every))


@pytest.mark.parametrize("snapshot_every", [0, 7], ids=["log only", "snapshots and log"])
@pytest.mark.parametrize("kind", ["file-uri", "subtree", pytest.param("in-memory", marks=needs_mock)])
def test_a_restarted_deployment_has_every_acknowledged_change(tmp_path, kind, snapshot_every):
    data_dir = data_dir_of(kind, tmp_path)
    first = deployment(data_dir, snapshot_every=snapshot_every)
    feed(first)
    before = state(first)
    first.runtime.shutdown()
    location = Location.of(data_dir)
    assert (location / "registry.json").exists()
    if snapshot_every:
        assert any(name.startswith("snapshot-") for name in (location / "shard-0").names())
    if kind == "in-memory":
        assert location.local is None  # the object path, not the local files
    else:
        assert location.local is not None
    again = deployment(data_dir)
    assert state(again) == before
    again.runtime.shutdown()


@needs_mock
def test_on_an_object_store_every_group_commit_is_one_segment_object(tmp_path):
    filesystem = Mock()
    wal = WriteAheadLog(Location(filesystem, "wal"), fsync="always")
    for i in range(3):
        number = wal.append("add", {"request_id": f"r{i}"}, {"ids": np.arange(4)})
        while not wal.check(number):
            pass
    wal.close()
    assert len(wal.segments()) == 3
    replayed = [args["request_id"] for _, args, _ in WriteAheadLog(Location(filesystem, "wal")).replay()]
    assert replayed == ["r0", "r1", "r2"]


@needs_mock
def test_a_torn_last_object_is_cut_at_its_last_whole_record():
    filesystem = Mock()
    location = Location(filesystem, "wal")
    wal = WriteAheadLog(location, fsync="batch_ms=50")
    numbers = [wal.append("add", {"request_id": f"r{i}"}, {"ids": np.arange(4)}) for i in range(3)]
    while not wal.check(numbers[-1]):
        pass
    wal.close()
    segment = location / location.names(".wal")[-1]
    data = segment.read_bytes()
    offset, payload, _ = list(read_segment(segment, True, data))[-1]
    segment.write_bytes(data[:offset + 12 + len(payload) - 3])
    assert [args["request_id"] for _, args, _ in WriteAheadLog(location).replay()] == ["r0", "r1"]


@needs_mock
def test_fsync_never_is_refused_where_only_uploads_make_records_durable():
    with pytest.raises(InvalidArgument, match="fsync=never needs a local data dir"):
        WriteAheadLog(Location(Mock(), "wal"), fsync="never")


@needs_mock
def test_a_failed_upload_refuses_the_write_and_what_was_acknowledged_stays(monkeypatch):
    filesystem = Mock()
    router = deployment(filesystem, shards=1)
    router.create_namespace(NamespaceConfig("ns", dim=DIM))
    rng = np.random.default_rng(0)
    router.add("ns", rng.standard_normal((10, DIM)).astype(np.float32), np.arange(10))

    def unreachable(self):
        def upload():
            raise OSError("connection reset by peer")
        self._records.clear()
        return upload

    monkeypatch.setattr(wal_module._ObjectSegments, "start_sync", unreachable)
    with pytest.raises(Unavailable, match="could not be made durable"):
        router.add("ns", rng.standard_normal((5, DIM)).astype(np.float32), np.arange(5))
    assert router.describe_namespace("ns")["rows"] == 10  # nothing of the refused add was applied
    monkeypatch.undo()
    router.runtime.shutdown()
    again = deployment(filesystem, shards=1)
    assert again.describe_namespace("ns")["rows"] == 10
    again.runtime.shutdown()
