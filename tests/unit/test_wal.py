"""The write-ahead log: records round-trip; a torn tail is cut at the last whole record; a bad
record in the middle is refused with its file and offset; a full disk refuses the write and
leaves the log as it was."""

from __future__ import annotations

import errno
import os
import time

import numpy as np
import pytest
from monim.datastore.wal import WalCorrupted, WriteAheadLog, read_segment
from monim.protos.errors import InvalidArgument, ResourceExhausted


def records(count=5):
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        out.append(("add", {"namespace": "ns", "generation": 7, "request_id": f"r{i}", "source": ""},
                    {"ids": np.arange(i * 3, i * 3 + 3, dtype=np.int64),
                     "keys": rng.standard_normal((3, 4)).astype(np.float32),
                     "keys16": rng.standard_normal((3, 4)).astype(np.float16),
                     "tokens": np.arange(3, dtype=np.int32)}))
    out.append(("drop", {"namespace": "ns"}, {}))
    return out


def write(directory, items, fsync="never"):
    wal = WriteAheadLog(directory, fsync=fsync)
    for op, args, columns in items:
        wal.append(op, args, columns)
    wal.close()
    return wal


def assert_same(replayed, expected):
    assert len(replayed) == len(expected)
    for (op, args, columns), (op2, args2, columns2) in zip(replayed, expected):
        assert op == op2 and args == args2 and sorted(columns) == sorted(columns2)
        for name in columns:
            assert columns[name].dtype == columns2[name].dtype
            np.testing.assert_array_equal(columns[name], columns2[name])


def test_records_come_back_as_written(tmp_path):
    items = records()
    write(tmp_path, items, fsync="always")
    assert_same(list(WriteAheadLog(tmp_path).replay()), items)


def test_a_torn_tail_is_cut_at_the_last_whole_record_and_appends_go_on(tmp_path):
    items = records()
    write(tmp_path, items)
    segment = next(tmp_path.glob("*.wal"))
    size = segment.stat().st_size
    with open(segment, "r+b") as file:
        file.truncate(size - 5)  # the last record, cut short by a crash
    wal = WriteAheadLog(tmp_path)
    assert_same(list(wal.replay()), items[:-1])
    wal.append(*items[-1])
    wal.close()
    assert_same(list(WriteAheadLog(tmp_path).replay()), items)


def test_a_bad_checksum_on_the_last_record_is_a_torn_tail(tmp_path):
    items = records()
    write(tmp_path, items)
    segment = next(tmp_path.glob("*.wal"))
    data = bytearray(segment.read_bytes())
    data[-2] ^= 0xFF
    segment.write_bytes(bytes(data))
    assert_same(list(WriteAheadLog(tmp_path).replay()), items[:-1])


def test_a_flipped_byte_in_the_middle_is_refused_with_file_and_offset(tmp_path):
    write(tmp_path, records())
    segment = next(tmp_path.glob("*.wal"))
    offsets = [offset for offset, _ in read_segment(segment, last=True)]
    data = bytearray(segment.read_bytes())
    data[offsets[2] + 40] ^= 0x01  # inside the third record's payload
    segment.write_bytes(bytes(data))
    with pytest.raises(WalCorrupted) as raised:
        list(WriteAheadLog(tmp_path).replay())
    assert raised.value.offset == offsets[2] and str(segment) in raised.value.message
    assert raised.value.code == "FAILED_PRECONDITION"


def test_segments_replay_in_order_and_a_snapshot_drops_what_it_covers(tmp_path):
    items = records(6)
    wal = WriteAheadLog(tmp_path, fsync="never")
    for item in items[:3]:
        wal.append(*item)
    covered = wal.rotate()
    for item in items[3:]:
        wal.append(*item)
    wal.close()
    assert_same(list(WriteAheadLog(tmp_path).replay()), items)
    assert_same(list(WriteAheadLog(tmp_path).replay(after=covered)), items[3:])
    wal.drop_through(covered)
    assert len(wal.segments()) == 1


def test_a_full_disk_refuses_the_write_and_leaves_the_log_whole(tmp_path):
    items = records()
    wal = WriteAheadLog(tmp_path, fsync="never")
    wal.append(*items[0])
    real_file = wal._file

    class FullDisk:
        def __getattr__(self, name):
            return getattr(real_file, name)

        def write(self, data):
            real_file.write(data[: len(data) // 2])  # half a record reaches the disk, then ENOSPC
            raise OSError(errno.ENOSPC, "No space left on device")

    wal._file = FullDisk()
    with pytest.raises(ResourceExhausted, match="No space left"):
        wal.append(*items[1])
    wal._file = real_file
    wal.append(*items[2])
    wal.close()
    assert_same(list(WriteAheadLog(tmp_path).replay()), [items[0], items[2]])


@pytest.mark.parametrize("policy", ["sometimes", "batch_ms=0", "batch_ms=x", ""])
def test_an_unknown_fsync_policy_is_refused(tmp_path, policy):
    with pytest.raises(InvalidArgument, match="fsync"):
        WriteAheadLog(tmp_path, fsync=policy)


def test_batched_fsync_syncs_in_the_background(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda descriptor: (synced.append(descriptor), real_fsync(descriptor)))
    wal = WriteAheadLog(tmp_path, fsync="batch_ms=200")
    for item in records(3):
        wal.append(*item)
    assert not synced  # nothing waited for the disk
    deadline = time.monotonic() + 5
    while not synced and time.monotonic() < deadline:
        time.sleep(0.01)
    assert synced
    wal.close()
    assert_same(list(WriteAheadLog(tmp_path).replay()), records(3))
