"""The write-ahead log: records round-trip; a torn tail is cut at the last whole record; a bad
record in the middle is refused with its file and offset; a full disk refuses the write and
leaves the log as it was."""

from __future__ import annotations

import errno
import os
import threading
import time

import numpy as np
import pytest
from monim.datastore import wal as wal_module
from monim.datastore.wal import ALIGNMENT, WalCorrupted, WriteAheadLog, read_segment
from monim.protos.errors import InvalidArgument, ResourceExhausted, Unavailable


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


def last_record(segment) -> tuple[int, int]:
    """(offset, end without padding) of a segment's last record."""
    offset, payload, _ = list(read_segment(segment, last=True))[-1]
    return offset, offset + 12 + len(payload)


def test_records_are_block_aligned_for_direct_io(tmp_path):
    write(tmp_path, records())
    segment = next(tmp_path.glob("*.wal"))
    assert segment.stat().st_size % ALIGNMENT == 0
    assert all(offset % ALIGNMENT == 0 for offset, _, _ in read_segment(segment, last=True))


def test_a_torn_tail_is_cut_at_the_last_whole_record_and_appends_go_on(tmp_path):
    items = records()
    write(tmp_path, items)
    segment = next(tmp_path.glob("*.wal"))
    _, end = last_record(segment)
    with open(segment, "r+b") as file:
        file.truncate(end - 5)  # the last record, cut short by a crash
    wal = WriteAheadLog(tmp_path)
    assert_same(list(wal.replay()), items[:-1])
    wal.append(*items[-1])
    wal.close()
    assert_same(list(WriteAheadLog(tmp_path).replay()), items)


def test_a_bad_checksum_on_the_last_record_is_a_torn_tail(tmp_path):
    items = records()
    write(tmp_path, items)
    segment = next(tmp_path.glob("*.wal"))
    _, end = last_record(segment)
    data = bytearray(segment.read_bytes())
    data[end - 2] ^= 0xFF
    segment.write_bytes(bytes(data))
    assert_same(list(WriteAheadLog(tmp_path).replay()), items[:-1])


def test_zero_blocks_at_the_end_are_a_torn_tail(tmp_path):
    """The file grew (its size reached the disk) but the last record's blocks did not."""
    items = records()
    write(tmp_path, items)
    segment = next(tmp_path.glob("*.wal"))
    offset, _ = last_record(segment)
    data = bytearray(segment.read_bytes())
    data[offset:] = bytes(len(data) - offset)
    segment.write_bytes(bytes(data))
    assert_same(list(WriteAheadLog(tmp_path).replay()), items[:-1])


def test_a_log_written_before_records_were_padded_still_replays(tmp_path):
    items = records()
    write(tmp_path, items)
    segment = next(tmp_path.glob("*.wal"))
    data = segment.read_bytes()
    unpadded = b"".join(bytes(data[offset:offset + 12 + len(payload)]) for offset, payload, _ in
                        read_segment(segment, last=True))
    segment.write_bytes(unpadded)
    assert_same(list(WriteAheadLog(tmp_path).replay()), items)


def test_records_are_checksummed_with_crc32c():
    """CRC-32C (Castagnoli): the standard check value of "123456789" is 0xE3069283."""
    assert wal_module.crc32c(b"123456789") == 0xE3069283
    record = wal_module.encode_record(*records(1)[0])
    magic, length, checksum = wal_module._HEADER.unpack(bytes(record[:wal_module._HEADER.size]))
    payload = bytes(record[wal_module._HEADER.size:wal_module._HEADER.size + length])
    assert magic == b"MWCC" and checksum == wal_module.crc32c(payload)


def as_legacy_log(segment):
    """Rewrites each record of the segment as logs before CRC-32C were written (magic MWAL, zlib's CRC-32)."""
    import zlib

    data = bytearray(segment.read_bytes())
    for offset, payload, _ in read_segment(segment, last=True):
        data[offset:offset + 12] = wal_module._HEADER.pack(b"MWAL", len(payload), zlib.crc32(payload))
    segment.write_bytes(bytes(data))


def damage_record(segment, record: int, damage) -> int:
    """damage(data, offset) changes the bytes of the segment's record number ``record`` (from 0) in
    place; returns that record's offset."""
    offset = [offset for offset, _, _ in read_segment(segment, last=True)][record]
    data = bytearray(segment.read_bytes())
    damage(data, offset)
    segment.write_bytes(bytes(data))
    return offset


def flip_a_payload_byte(data, offset):
    data[offset + 40] ^= 0x01  # inside the record's payload


def refused_replay(directory, match=None) -> WalCorrupted:
    with pytest.raises(WalCorrupted, match=match) as raised:
        list(WriteAheadLog(directory).replay())
    return raised.value


def test_a_log_written_with_crc32_records_still_replays_and_a_flipped_byte_is_refused(tmp_path):
    items = records()
    write(tmp_path, items)
    segment = next(tmp_path.glob("*.wal"))
    as_legacy_log(segment)
    assert_same(list(WriteAheadLog(tmp_path).replay()), items)
    offset = damage_record(segment, 1, flip_a_payload_byte)
    assert refused_replay(tmp_path, "checksum mismatch").offset == offset


def test_a_record_with_an_unknown_magic_in_the_middle_is_refused(tmp_path):
    write(tmp_path, records())
    segment = next(tmp_path.glob("*.wal"))
    offset = damage_record(segment, 1, lambda data, offset: data.__setitem__(slice(offset, offset + 4), b"MWXX"))
    assert refused_replay(tmp_path, "bad magic").offset == offset


def test_a_flipped_byte_in_the_middle_is_refused_with_file_and_offset(tmp_path):
    write(tmp_path, records())
    segment = next(tmp_path.glob("*.wal"))
    offset = damage_record(segment, 2, flip_a_payload_byte)  # the third record
    refused = refused_replay(tmp_path)
    assert refused.offset == offset and str(segment) in refused.message
    assert refused.code == "FAILED_PRECONDITION"


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


def test_a_full_disk_refuses_the_write_and_leaves_the_log_whole(tmp_path, monkeypatch):
    items = records()
    wal = WriteAheadLog(tmp_path, fsync="never")
    wal.append(*items[0])
    real_pwrite = os.pwrite

    def full_disk(descriptor, data, offset):
        real_pwrite(descriptor, data[:ALIGNMENT], offset)  # part of the record reaches the disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full_disk)
    with pytest.raises(ResourceExhausted, match="No space left"):
        wal.append(*items[1])
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    wal.append(*items[2])
    wal.close()
    assert_same(list(WriteAheadLog(tmp_path).replay()), [items[0], items[2]])


@pytest.mark.parametrize("policy", ["sometimes", "batch_ms=0", "batch_ms=x", ""])
def test_an_unknown_fsync_policy_is_refused(tmp_path, policy):
    with pytest.raises(InvalidArgument, match="fsync"):
        WriteAheadLog(tmp_path, fsync=policy)


def counting_fdatasync(monkeypatch, delay_s=0.0):
    """Replaces the log's fdatasync with one that counts its calls (and takes delay_s)."""
    calls = []
    real = wal_module._fdatasync

    def fdatasync(descriptor):
        time.sleep(delay_s)
        calls.append(descriptor)
        real(descriptor)

    monkeypatch.setattr(wal_module, "_fdatasync", fdatasync)
    return calls


@pytest.mark.parametrize("policy", ["always", "batch_ms=20"])
def test_concurrent_appends_share_fdatasyncs(tmp_path, monkeypatch, policy):
    calls = counting_fdatasync(monkeypatch, delay_s=0.02)
    wal = WriteAheadLog(tmp_path, fsync=policy)
    items = records(40)[:40]
    numbers = []

    def writer(chunk):
        for item in chunk:
            number = wal.append(*item)
            deadline = time.monotonic() + 10
            while not wal.check(number):
                assert time.monotonic() < deadline
                time.sleep(0.001)
            numbers.append(number)

    threads = [threading.Thread(target=writer, args=(items[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(numbers) == list(range(1, 41)) and wal.synced == 40
    assert len(calls) < 40 / 2, f"{len(calls)} fdatasyncs for 40 records: not grouped"
    wal.close()
    assert sorted(args["request_id"] for _, args, _ in WriteAheadLog(tmp_path).replay()) == \
        sorted(args["request_id"] for _, args, _ in items)


def wait_durable(wal, number, within_s=10.0) -> float:
    started = time.monotonic()
    while not wal.check(number):
        assert time.monotonic() - started < within_s
        time.sleep(0.0005)
    return time.monotonic() - started


def test_batch_ms_does_not_delay_a_lone_writer(tmp_path):
    """The syncer waits (up to N ms) only for writers still encoding or writing: with none in
    flight, a record is synced at once."""
    wal = WriteAheadLog(tmp_path, fsync="batch_ms=2000")
    waits = [wait_durable(wal, wal.append(*item)) for item in records(3)[:3]]
    assert max(waits) < 1.0, f"a lone writer waited {max(waits):.2f} s for its sync (batch_ms=2000)"
    wal.close()


def test_batch_ms_waits_for_a_writer_in_mid_encode_to_share_the_sync(tmp_path, monkeypatch):
    calls = counting_fdatasync(monkeypatch)
    encoding, release = threading.Event(), threading.Event()
    real = wal_module.encode_record

    def slow_encode(op, args, columns):
        if args.get("request_id") == "r1":
            encoding.set()
            release.wait(10)
        return real(op, args, columns)

    monkeypatch.setattr(wal_module, "encode_record", slow_encode)
    wal = WriteAheadLog(tmp_path, fsync="batch_ms=5000")
    items = records(2)
    slow = threading.Thread(target=lambda: wal.append(*items[1]))
    slow.start()
    assert encoding.wait(5)
    first = wal.append(*items[0])
    time.sleep(0.2)
    assert not wal.check(first), "synced while another writer was still encoding its record"
    release.set()
    slow.join()
    assert wait_durable(wal, 2) < 5.0 and wal.check(first)
    assert len(calls) == 1 and wal.sync_stats["records"] == 2, (calls, wal.sync_stats)
    wal.close()


def test_a_record_is_durable_only_after_an_fdatasync_that_started_after_it(tmp_path, monkeypatch):
    started, release = threading.Event(), threading.Event()
    real = wal_module._fdatasync

    def slow_fdatasync(descriptor):
        started.set()
        release.wait(10)
        real(descriptor)

    monkeypatch.setattr(wal_module, "_fdatasync", slow_fdatasync)
    wal = WriteAheadLog(tmp_path, fsync="always")
    first = wal.append(*records(1)[0])
    assert started.wait(5)  # the syncer is inside the fdatasync for the first record
    second = wal.append(*records(2)[1])
    assert not wal.check(first) and not wal.check(second)
    release.set()
    deadline = time.monotonic() + 5
    while not wal.check(second):
        assert time.monotonic() < deadline
        time.sleep(0.001)
    wal.close()


def test_a_failed_fdatasync_refuses_every_later_write(tmp_path, monkeypatch):
    def broken(descriptor):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(wal_module, "_fdatasync", broken)
    wal = WriteAheadLog(tmp_path, fsync="always")
    number = wal.append(*records(1)[0])
    deadline = time.monotonic() + 5
    while wal.failed is None:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    with pytest.raises(Unavailable, match="could not be made durable"):
        wal.check(number)
    with pytest.raises(Unavailable, match="takes no more writes"):
        wal.append(*records(1)[0])
