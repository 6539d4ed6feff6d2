"""Shard snapshots (datastore/snapshot.py): exact round trips, plain Parquet files, refusal of
corrupt, unfinished or newer snapshots and of unsafe paths, any pyarrow filesystem, and restore
into another shard count."""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import threading

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from monim.datastore import NamespaceConfig, NeighborStore, snapshot
from monim.datastore.snapshot import SnapshotError
from monim.protos.errors import AlreadyExists, FailedPrecondition, InvalidArgument, ResourceExhausted

DIM, VALUE_DIM = 8, 6
ADAM = {"name": "adam", "lr": 0.05}


def make_store(name="ns", value_dim=VALUE_DIM, optimizer=None, id_stride=1, id_offset=0) -> NeighborStore:
    config = NamespaceConfig(name, dim=DIM, value_dim=value_dim, max_k=64, optimizer=optimizer or ADAM,
                             generation=3)
    return NeighborStore(config, id_stride=id_stride, id_offset=id_offset)


def fill(store: NeighborStore, rng, rows=300, ids=None) -> np.ndarray:
    """Rows from two sources with weights, some deleted (holes filled from the tail), and optimizer
    steps that touch part of them (some twice). Returns the ids still stored."""
    keys = rng.standard_normal((rows, DIM)).astype(np.float32)
    values = rng.standard_normal((rows, VALUE_DIM)).astype(np.float32) if store.config.value_dim else None
    half = rows // 2
    first = store.add(keys[:half], np.arange(half) % 50, values[:half] if values is not None else None,
                      rng.uniform(0.5, 3, half).astype(np.float32), source="books",
                      ids=None if ids is None else ids[:half])
    second = store.add(keys[half:], np.arange(rows - half) % 50, values[half:] if values is not None else None,
                       rng.uniform(0.5, 3, rows - half).astype(np.float32), source="web",
                       ids=None if ids is None else ids[half:])
    stored = np.concatenate([first, second])
    gone = stored[rng.choice(rows, rows // 10, replace=False)]
    store.delete(ids=gone)
    stored = stored[~np.isin(stored, gone)]
    if store.config.value_dim:
        for _ in range(3):
            touched = rng.choice(stored, stored.size // 3)
            store.step(touched, rng.standard_normal((touched.size, VALUE_DIM)).astype(np.float32))
    return np.sort(stored)


def assert_same_rows(a: NeighborStore, b: NeighborStore, ids: np.ndarray) -> None:
    """Every column equal, bit for bit, optimizer state and per-row step counts included."""
    want = a.get(ids, return_optimizer_state=a.config.value_dim > 0)
    got = b.get(ids, return_optimizer_state=b.config.value_dim > 0)
    for field in ("ids", "keys", "tokens", "values", "weights"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
    assert got.sources == want.sources
    if want.optimizer_state is not None:
        assert got.optimizer_state.keys() == want.optimizer_state.keys()
        for name, column in want.optimizer_state.items():
            np.testing.assert_array_equal(got.optimizer_state[name], column, err_msg=name)


def created_by_id(store: NeighborStore) -> dict[int, int]:
    rows = store.rows
    return dict(zip(rows.ids[: rows.size].tolist(), rows.created[: rows.size].tolist()))


def write(stores, filesystem, directory, **options):
    options.setdefault("shard", 0)
    options.setdefault("num_shards", 1)
    return snapshot.write_shard_snapshot(stores, filesystem, directory, **options)


@pytest.fixture
def local(tmp_path):
    return pafs.LocalFileSystem(), str(tmp_path / "snap")


def test_round_trip_restores_every_column_and_the_optimizer_state(rng, local):
    filesystem, directory = local
    store = make_store()
    ids = fill(store, rng)
    write({"ns": store}, filesystem, directory)
    manifest, loaded = snapshot.load_shard_snapshot(filesystem, directory)
    restored = loaded["ns"]
    assert restored.config == store.config and len(restored) == len(store) == ids.size
    assert_same_rows(store, restored, ids)
    assert created_by_id(restored) == created_by_id(store)
    assert restored.next_id == store.next_id and restored.rows.insertions == store.rows.insertions
    queries = rng.standard_normal((20, DIM)).astype(np.float32)
    want = store.search(queries, 10, return_keys=True, return_values=True, return_weights=True)
    got = restored.search(queries, 10, return_keys=True, return_values=True, return_weights=True)
    for field in ("ids", "distances", "tokens", "keys", "values", "weights"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
    assert manifest["namespaces"]["ns"]["rows"] == ids.size


def test_restored_store_answers_later_writes_and_steps_like_the_original(rng, local):
    filesystem, directory = local
    store = make_store()
    fill(store, rng)
    write({"ns": store}, filesystem, directory)
    restored = snapshot.load_shard_snapshot(filesystem, directory)[1]["ns"]
    keys = rng.standard_normal((5, DIM)).astype(np.float32)
    new_ids = store.add(keys, np.arange(5), source="late")
    np.testing.assert_array_equal(restored.add(keys, np.arange(5), source="late"), new_ids)
    ids = np.sort(store.rows.ids[: store.rows.size].numpy())
    grads = rng.standard_normal((ids.size, VALUE_DIM)).astype(np.float32)
    store.step(ids, grads)
    restored.step(ids, grads)
    assert store.delete(source="books") == restored.delete(source="books") > 0
    assert_same_rows(store, restored, np.sort(store.rows.ids[: store.rows.size].numpy()))
    assert created_by_id(restored) == created_by_id(store)


@pytest.mark.parametrize("value_dim, optimizer", [(0, None), (VALUE_DIM, {"name": "sgd", "momentum": 0.9}),
                                                  (VALUE_DIM, {"name": "adagrad", "lr": 0.1})])
def test_round_trip_of_every_optimizer_and_of_keys_without_values(rng, local, value_dim, optimizer):
    filesystem, directory = local
    store = make_store(value_dim=value_dim, optimizer=optimizer)
    ids = fill(store, rng)
    write({"ns": store}, filesystem, directory)
    restored = snapshot.load_shard_snapshot(filesystem, directory)[1]["ns"]
    assert_same_rows(store, restored, ids)
    columns = pq.read_table(f"{directory}/ns.parquet").column_names
    assert ("value" in columns) == (value_dim > 0)
    assert sorted(c for c in columns if c.startswith("state_")) == sorted(
        "state_" + name for name in store.rows.state_columns)


def test_empty_store_round_trips(local):
    filesystem, directory = local
    store = make_store()
    store.add(np.zeros((3, DIM), np.float32), np.arange(3))
    store.delete(ids=np.arange(3))
    write({"ns": store}, filesystem, directory)
    restored = snapshot.load_shard_snapshot(filesystem, directory)[1]["ns"]
    assert len(restored) == 0 and restored.next_id == 3
    assert pq.read_table(f"{directory}/ns.parquet").num_rows == 0


def test_files_are_plain_parquet_that_match_the_manifest(rng, local):
    filesystem, directory = local
    stores = {"ns": make_store(), "other.v2": make_store("other.v2", value_dim=0)}
    ids = {name: fill(store, rng, rows=200 + 50 * i) for i, (name, store) in enumerate(stores.items())}
    manifest = write(stores, filesystem, directory, shard=1, num_shards=4, extra={"wal": {"segment": 7}})
    on_disk = json.loads(open(f"{directory}/manifest.json").read())
    assert on_disk == manifest
    assert manifest["format_version"] == snapshot.FORMAT_VERSION == 2
    assert (manifest["shard"], manifest["num_shards"], manifest["extra"]) == (1, 4, {"wal": {"segment": 7}})
    assert datetime.datetime.fromisoformat(manifest["created_at"]).utcoffset() == datetime.timedelta(0)
    total = 0
    for name, entry in manifest["namespaces"].items():
        [part] = entry["parts"]  # small: one file, <namespace>.parquet
        path = f"{directory}/{part['file']}"
        assert part["file"] == f"{name}.parquet"
        table = pq.read_table(path)
        assert table.num_rows == entry["rows"] == part["rows"] == ids[name].size
        total += table.num_rows
        raw = open(path, "rb").read()
        assert entry["bytes"] == part["bytes"] == len(raw) and part["sha256"] == hashlib.sha256(raw).hexdigest()
        assert entry["config"] == stores[name].config.to_dict() and entry["next_id"] == stores[name].next_id
        order = np.argsort(table.column("id").to_numpy())
        np.testing.assert_array_equal(table.column("id").to_numpy()[order], ids[name])
        rows = stores[name].get(ids[name])
        keys = np.stack(table.column("key").to_numpy(zero_copy_only=False))[order]
        np.testing.assert_array_equal(keys, rows.keys)
        assert table.column("source").to_pylist() == [rows.sources[i] for i in np.argsort(order)]
        metadata = json.loads(table.schema.metadata[b"monim.snapshot"])
        assert metadata["namespace"] == name and metadata["shard"] == 1
    assert total == sum(len(store) for store in stores.values())


def flip_byte(path, at=0.5):
    data = bytearray(open(path, "rb").read())
    data[int(len(data) * at)] ^= 0xFF
    open(path, "wb").write(bytes(data))


def test_flipped_byte_is_refused_naming_the_file_and_nothing_is_loaded(rng, local, monkeypatch):
    filesystem, directory = local
    stores = {"a": make_store("a"), "b": make_store("b")}
    for store in stores.values():
        fill(store, rng)
    manifest = write(stores, filesystem, directory)
    flip_byte(f"{directory}/b.parquet")
    built = []
    monkeypatch.setattr(snapshot, "store_from_batches", lambda *args, **kwargs: built.append(args))
    with pytest.raises(SnapshotError, match=r"b\.parquet.*corrupt") as caught:
        snapshot.load_shard_snapshot(filesystem, directory)
    assert caught.value.code == "FAILED_PRECONDITION" and isinstance(caught.value, FailedPrecondition)
    assert built == []
    with pytest.raises(SnapshotError, match=r"b\.parquet"):
        snapshot.read_rows(filesystem, f"{directory}/b.parquet", sha256=manifest["namespaces"]["b"]["parts"][0]["sha256"])
    with pytest.raises(SnapshotError, match=r"b\.parquet"):
        snapshot.verify_snapshot(filesystem, directory)
    assert snapshot.verify_snapshot(filesystem, directory, namespaces=["a"]) == manifest


def test_newer_format_version_is_refused_saying_which_is_supported(rng, local):
    filesystem, directory = local
    store = make_store()
    fill(store, rng)
    write({"ns": store}, filesystem, directory)
    path = f"{directory}/manifest.json"
    manifest = json.loads(open(path).read())
    manifest["format_version"] = 99
    open(path, "w").write(json.dumps(manifest))
    with pytest.raises(SnapshotError, match=r"format version 99.*format version 2"):
        snapshot.load_shard_snapshot(filesystem, directory)


def test_missing_or_truncated_files_and_unfinished_snapshots_are_refused(rng, tmp_path):
    filesystem = pafs.LocalFileSystem()
    store = make_store()
    fill(store, rng)
    for case in ("missing", "truncated", "no manifest"):
        directory = str(tmp_path / case.replace(" ", "_"))
        write({"ns": store}, filesystem, directory)
        if case == "missing":
            filesystem.delete_file(f"{directory}/ns.parquet")
            expected = r"ns\.parquet.*missing"
        elif case == "truncated":
            data = open(f"{directory}/ns.parquet", "rb").read()
            open(f"{directory}/ns.parquet", "wb").write(data[:-100])
            expected = r"ns\.parquet has \d+ bytes; the manifest says"
        else:
            filesystem.delete_file(f"{directory}/manifest.json")
            expected = r"manifest\.json is missing"
        with pytest.raises(SnapshotError, match=expected):
            snapshot.load_shard_snapshot(filesystem, directory)


def test_a_snapshot_directory_is_written_once_unless_overwrite(rng, local):
    filesystem, directory = local
    store = make_store()
    fill(store, rng)
    write({"ns": store}, filesystem, directory)
    store.add(np.ones((1, DIM), np.float32), np.array([1]))
    with pytest.raises(SnapshotError, match="already holds a snapshot"):
        write({"ns": store}, filesystem, directory)
    write({"ns": store}, filesystem, directory, overwrite=True)
    assert len(snapshot.load_shard_snapshot(filesystem, directory)[1]["ns"]) == len(store)


def test_load_of_chosen_namespaces(rng, local):
    filesystem, directory = local
    stores = {"a": make_store("a"), "b": make_store("b")}
    for store in stores.values():
        fill(store, rng, rows=50)
    write(stores, filesystem, directory)
    progress = []
    _, loaded = snapshot.load_shard_snapshot(filesystem, directory, namespaces=["b"],
                                             progress=lambda done, total: progress.append((done, total)))
    assert list(loaded) == ["b"] and progress[-1] == (len(stores["b"]), len(stores["b"]))
    with pytest.raises(SnapshotError, match="'c'"):
        snapshot.load_shard_snapshot(filesystem, directory, namespaces=["c"])


@pytest.mark.parametrize("part", ["..", "../x", "a/../../x", "/etc/passwd", "\\\\server\\share", "C:evil",
                                  "s3://bucket/x", "", "a\x00b"])
def test_safe_join_refuses_parent_absolute_and_empty_parts(part):
    with pytest.raises(InvalidArgument):
        snapshot.safe_join("/data/snap", part)


def test_safe_join_keeps_names_inside_the_root():
    assert snapshot.safe_join("/data/snap", "ns.parquet") == "/data/snap/ns.parquet"
    assert snapshot.safe_join("/data/snap/", "a..b.parquet") == "/data/snap/a..b.parquet"
    assert snapshot.safe_join("bucket/prefix", "shard-0", "manifest.json") == "bucket/prefix/shard-0/manifest.json"
    assert snapshot.safe_join("", "x") == "x"


def test_resolve_plain_paths_and_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    filesystem, path = snapshot.resolve("relative/snap")
    assert isinstance(filesystem, pafs.LocalFileSystem) and path == str(tmp_path / "relative" / "snap")
    filesystem, path = snapshot.resolve(f"file://{tmp_path}/snap")
    assert isinstance(filesystem, pafs.LocalFileSystem) and path == f"{tmp_path}/snap"
    for bad in ("", "nosuchscheme://x/y"):
        with pytest.raises(InvalidArgument):
            snapshot.resolve(bad)


def in_memory_filesystem():
    mock = getattr(pafs, "_MockFileSystem", None)
    if mock is None:
        pytest.skip("this pyarrow has no in-memory filesystem (pyarrow.fs._MockFileSystem)")
    return mock()


@pytest.mark.parametrize("kind", ["subtree of local", "in memory"])
def test_round_trip_through_other_pyarrow_filesystems(rng, tmp_path, kind):
    if kind == "in memory":
        filesystem = in_memory_filesystem()
    else:
        filesystem = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    store = make_store()
    ids = fill(store, rng)
    write({"ns": store}, filesystem, "deployment/shard-0/snapshot-1")
    restored = snapshot.load_shard_snapshot(filesystem, "deployment/shard-0/snapshot-1")[1]["ns"]
    assert_same_rows(store, restored, ids)
    if kind != "in memory":
        assert (tmp_path / "deployment/shard-0/snapshot-1/manifest.json").exists()
    path = "deployment/shard-0/snapshot-1/ns.parquet"
    flip_byte_in(filesystem, path)
    for check in (snapshot.load_shard_snapshot, snapshot.verify_snapshot):
        with pytest.raises(SnapshotError, match=r"ns\.parquet"):
            check(filesystem, "deployment/shard-0/snapshot-1")


def flip_byte_in(filesystem, path):
    with filesystem.open_input_file(path) as file:
        data = bytearray(file.read())
    data[len(data) // 2] ^= 0xFF
    with filesystem.open_output_stream(path) as file:
        file.write(bytes(data))


def test_rows_of_two_shards_split_into_three_rebuild_the_same_rows_and_answers(rng, tmp_path):
    """As a restore into another shard count does: read every old shard's file, route the rows by
    id % 3, build each new shard's store."""
    filesystem = pafs.LocalFileSystem()
    ids = rng.permutation(1000)[:400].astype(np.int64)
    old = [make_store(id_stride=2, id_offset=s) for s in range(2)]
    for s, store in enumerate(old):
        fill(store, rng, rows=int((ids % 2 == s).sum()), ids=ids[ids % 2 == s])
    tables, next_id = [], 0
    for s, store in enumerate(old):
        manifest = write({"ns": store}, filesystem, str(tmp_path / f"shard-{s}"), shard=s, num_shards=2)
        entry = manifest["namespaces"]["ns"]
        tables.append(snapshot.read_namespace_rows(filesystem, str(tmp_path / f"shard-{s}"), entry))
        next_id = max(next_id, entry["next_id"])
    parts = [snapshot.split_rows(table, 3) for table in tables]
    new = [snapshot.store_from_table(old[0].config, pa.concat_tables([p[i] for p in parts]), "cpu", i, 3, next_id)
           for i in range(3)]
    for i, store in enumerate(new):
        held = store.rows.ids[: store.rows.size].numpy()
        assert (held % 3 == i).all() and store.next_id == next_id
        assert (store.id_stride, store.id_offset) == (3, i)
    stored = {s: np.sort(store.rows.ids[: store.rows.size].numpy()) for s, store in enumerate(old)}
    assert sum(len(store) for store in new) == sum(len(store) for store in old)
    for s, store in enumerate(old):
        for i, target in enumerate(new):
            mine = stored[s][stored[s] % 3 == i]
            assert_same_rows(store, target, mine)
    queries = rng.standard_normal((30, DIM)).astype(np.float32)
    assert_same_merged_search(old, new, queries, k=10)


def test_append_rows_restores_into_a_serving_store_all_or_nothing(rng, tmp_path):
    """As a restore into a running deployment does: each shard appends its part of the rows to
    the namespace it has just created."""
    filesystem = pafs.LocalFileSystem()
    source = make_store()
    ids = fill(source, rng)
    entry = write({"ns": source}, filesystem, str(tmp_path / "snap"))["namespaces"]["ns"]
    table = snapshot.read_namespace_rows(filesystem, str(tmp_path / "snap"), entry)
    targets = [make_store(id_stride=2, id_offset=i) for i in range(2)]
    for i, part in enumerate(snapshot.split_rows(table, 2)):
        assert snapshot.append_rows(targets[i], part) == part.num_rows
        assert_same_rows(source, targets[i], ids[ids % 2 == i])
        assert targets[i].next_id == int(ids[ids % 2 == i].max()) + 1
    part = snapshot.split_rows(table, 2)[0]
    with pytest.raises(AlreadyExists):
        snapshot.append_rows(targets[0], part)
    with pytest.raises(SnapshotError, match="state_exp_avg"):
        snapshot.append_rows(make_store(), part.drop_columns(["state_exp_avg"]))
    assert len(targets[0]) == part.num_rows


def assert_same_merged_search(old, new, queries, k):
    def merged(stores):
        results = [store.search(queries, k) for store in stores]
        distances = np.concatenate([r.distances for r in results], axis=1)
        ids = np.concatenate([r.ids for r in results], axis=1)
        order = np.lexsort((ids, distances), axis=1)[:, :k]
        return np.take_along_axis(ids, order, 1), np.take_along_axis(distances, order, 1)

    (old_ids, old_d), (new_ids, new_d) = merged(old), merged(new)
    np.testing.assert_array_equal(new_ids, old_ids)
    # The rows are bit for bit the same (above), but faiss's float32 distances depend on how the
    # rows are split into stores, in the last bit (its BLAS blocking).
    np.testing.assert_allclose(new_d, old_d, rtol=1e-6)


def test_writers_wait_only_for_the_copy_not_for_the_files(rng, local, monkeypatch):
    """While the files are written, another thread's add goes through at once, and lands after
    the snapshot's cut: the snapshot holds the rows as they were when it was copied."""
    filesystem, directory = local
    store = make_store()
    ids = fill(store, rng)
    write_file = snapshot._write_namespace
    added = []

    def write_while_adding(*args, **kwargs):
        thread = threading.Thread(target=lambda: added.append(store.add(np.ones((1, DIM), np.float32), np.array([7]))))
        thread.start()
        thread.join(timeout=10)
        assert added, "an add waited for the snapshot's files"
        return write_file(*args, **kwargs)

    monkeypatch.setattr(snapshot, "_write_namespace", write_while_adding)
    write({"ns": store}, filesystem, directory)
    monkeypatch.undo()
    restored = snapshot.load_shard_snapshot(filesystem, directory)[1]["ns"]
    assert len(restored) == ids.size and len(store) == ids.size + 1
    assert not restored.contains(added[0]).any()


class _FullDisk(pafs.FileSystemHandler):
    """A local filesystem whose disk fills up after ``limit`` bytes written to any one file."""

    def __init__(self, root: str, limit: int):
        self.base, self.limit = pafs.SubTreeFileSystem(root, pafs.LocalFileSystem()), limit

    def open_output_stream(self, path, metadata):
        handler = self

        class Stream:
            closed, written = False, 0

            def __init__(self):
                self.stream = handler.base.open_output_stream(path)

            def write(self, data):
                if self.written + len(data) > handler.limit:
                    raise OSError(errno.ENOSPC, "No space left on device")
                self.written += len(data)
                return self.stream.write(data)

            def flush(self):
                self.stream.flush()

            def close(self):
                self.closed = True
                self.stream.close()

        return pa.PythonFile(Stream(), mode="w")

    def get_type_name(self):
        return "full-disk"

    def equals(self, other):
        return self is other

    def normalize_path(self, path):
        return path

    def get_file_info_selector(self, selector):
        return self.base.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.base.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.base.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.base.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.base.delete_dir_contents("", accept_root_dir=True)

    def delete_file(self, path):
        self.base.delete_file(path)

    def move(self, src, dest):
        self.base.move(src, dest)

    def copy_file(self, src, dest):
        self.base.copy_file(src, dest)

    def get_file_info(self, paths):
        return self.base.get_file_info(paths)

    def open_input_stream(self, path):
        return self.base.open_input_stream(path)

    def open_input_file(self, path):
        return self.base.open_input_file(path)

    def open_append_stream(self, path, metadata):
        return self.base.open_append_stream(path)


def test_full_disk_is_resource_exhausted_and_leaves_no_snapshot(rng, tmp_path):
    filesystem = pafs.PyFileSystem(_FullDisk(str(tmp_path), limit=4096))
    store = make_store()
    fill(store, rng)
    with pytest.raises(ResourceExhausted, match="ns.parquet"):
        write({"ns": store}, filesystem, "snap")
    assert not (tmp_path / "snap" / "ns.parquet").exists()
    with pytest.raises(SnapshotError, match="manifest.json is missing"):
        snapshot.read_manifest(filesystem, "snap")


def test_bad_arguments_are_refused_before_anything_is_written(rng, local):
    filesystem, directory = local
    store = make_store()
    with pytest.raises(InvalidArgument, match="shard"):
        write({"ns": store}, filesystem, directory, shard=2, num_shards=2)
    with pytest.raises(InvalidArgument, match="JSON"):
        write({"ns": store}, filesystem, directory, extra={"position": object()})
    with pytest.raises(InvalidArgument, match="num_shards"):
        snapshot.split_rows(pa.table({"id": pa.array([1, 2], pa.int64())}), 0)
    assert filesystem.get_file_info(directory).type == pafs.FileType.NotFound


def test_a_large_namespace_is_written_as_part_files_in_parallel_and_loads_whole(rng, local, monkeypatch):
    monkeypatch.setattr(snapshot, "_PART_BYTES", 1 << 10)  # parts of 1 KB: as many as there are CPUs
    monkeypatch.setattr(snapshot.os, "cpu_count", lambda: 4)
    filesystem, directory = local
    store = make_store()
    ids = fill(store, rng)
    manifest = write({"ns": store}, filesystem, directory)
    parts = manifest["namespaces"]["ns"]["parts"]
    assert len(parts) == 4 and [part["file"] for part in parts] == [f"ns.parts/{k:05d}.parquet" for k in range(4)]
    assert sum(part["rows"] for part in parts) == len(store)
    assert pq.read_table(f"{directory}/ns.parts").num_rows == len(store)  # plain pyarrow reads the folder
    _, loaded = snapshot.load_shard_snapshot(filesystem, directory)
    assert_same_rows(store, loaded["ns"], ids)
    flip_byte(f"{directory}/ns.parts/00002.parquet")
    with pytest.raises(SnapshotError, match=r"ns\.parts/00002\.parquet.*corrupt"):
        snapshot.load_shard_snapshot(filesystem, directory)


def test_a_format_1_snapshot_with_one_file_per_namespace_still_loads(rng, local):
    filesystem, directory = local
    store = make_store()
    ids = fill(store, rng)
    manifest = write({"ns": store}, filesystem, directory)
    [part] = manifest["namespaces"]["ns"].pop("parts")
    manifest["namespaces"]["ns"].update(file=part["file"], sha256=part["sha256"], bytes=part["bytes"])
    manifest["format_version"] = 1
    with open(f"{directory}/manifest.json", "w") as file:
        json.dump(manifest, file)
    _, loaded = snapshot.load_shard_snapshot(filesystem, directory)
    assert_same_rows(store, loaded["ns"], ids)
