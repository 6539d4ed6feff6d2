"""Write-ahead log of one shard: every change is appended (and made durable) before it is applied.

A log is a folder of segments ``<seq>.wal`` (12-digit sequence numbers); every start of the log
and every snapshot begin a new segment, and the segments a snapshot covers are deleted once it is
written. Each record is

    magic b"MWCC" | payload length (u32, little-endian) | CRC-32C of the payload (u32) | payload
    | zero padding to the next 4096-byte boundary

(CRC-32C, Castagnoli, as iSCSI, ext4 and RocksDB use it, by google-crc32c with the CPU's crc32
instruction: 0.5 ms a 12.6 MB record where zlib's CRC-32 took 3 ms. Records of logs written
before it have the magic b"MWAL" and zlib's CRC-32; they are read as they were.)

and the payload is an Arrow IPC stream of one record batch: the operation and its scalar
arguments in the schema's metadata (``op``, ``args`` as JSON), its arrays as columns (a 2-D array
[N, W] as a fixed-size list of W). With fsync always or batch_ms, records are written with direct
I/O (O_DIRECT: past the page cache, straight to the device, which the fdatasync needs anyway)
where the filesystem allows it; the padding keeps every write block-aligned. Reading stops
at a torn tail (a record cut short, or a bad checksum, on the last record of the last segment: a
crash in mid-append) and the writer cuts the file there; a bad record with whole records after
it is corruption, reported with the file and offset, never skipped.

On a local (or mounted) filesystem a segment is a file that grows by appends. On any other
filesystem pyarrow.fs opens (an object store: s3://, gs://, ...), where objects are written whole,
every group commit writes one new segment object holding the records of the group; the upload's
completion is what makes them durable there, and "never" is refused.
fsync: "always" (a call is acknowledged once an fdatasync covers its record; calls that arrive
while one runs share the next: group commit); "batch_ms=N" (the same, and while other writers are
still encoding or writing their records the syncer waits for them, up to N ms, so that they share
the fdatasync: fewer syncs under concurrent writers, up to N ms more latency; a lone writer is
synced at once, as PostgreSQL's commit_delay applies only with commit_siblings active); "never"
(acknowledged once written; the OS flushes when it likes: a killed process loses nothing, a
machine that loses power may lose recent writes).
"""

from __future__ import annotations

import json
import mmap
import os
import pathlib
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator

import google_crc32c
import numpy as np
import pyarrow as pa
from monim.datastore.location import Location
from monim.protos.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable

MAGIC = b"MWCC"  # records written now: CRC-32C
LEGACY_MAGIC = b"MWAL"  # records of older logs: zlib's CRC-32


def crc32c(view) -> int:
    """CRC-32C of a bytes-like object, without copying it (google-crc32c takes read-only buffers)."""
    data = np.frombuffer(view, np.uint8)
    data.flags.writeable = False
    return google_crc32c.value(data)


_CHECKSUMS = {MAGIC: crc32c, LEGACY_MAGIC: zlib.crc32}
_HEADER = struct.Struct("<4sII")
ALIGNMENT = 4096  # records start and end on this boundary (direct I/O needs block-aligned writes)
_fdatasync = getattr(os, "fdatasync", os.fsync)


def parse_fsync(policy: str) -> float | None:
    """"always" -> 0.0; "batch_ms=N" -> N / 1000 seconds; "never" -> None."""
    if policy == "always":
        return 0.0
    if policy == "never":
        return None
    if isinstance(policy, str) and policy.startswith("batch_ms="):
        try:
            milliseconds = float(policy.split("=", 1)[1])
        except ValueError:
            milliseconds = -1
        if milliseconds > 0:
            return milliseconds / 1000
    raise InvalidArgument(f"unknown fsync policy {policy!r}; choose always, batch_ms=N (N > 0) or never")


class WalCorrupted(FailedPrecondition):
    def __init__(self, path, offset: int, reason: str):
        super().__init__(f"write-ahead log {path} is corrupt at byte {offset}: {reason}; "
                         "the shard will not serve until it is repaired or restored from a snapshot")
        self.path, self.offset = str(path), offset


def _batch(op: str, args: dict, columns: dict[str, np.ndarray]) -> pa.RecordBatch:
    arrays, names = [], []
    for name, array in columns.items():
        if array is None:
            continue
        array = np.ascontiguousarray(array)
        if array.ndim == 2:
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), array.shape[1]))
        else:
            arrays.append(pa.array(array))
        names.append(name)
    metadata = {"op": op, "args": json.dumps(args)}
    if arrays:
        return pa.RecordBatch.from_arrays(arrays, names=names).replace_schema_metadata(metadata)
    return pa.RecordBatch.from_pydict({}, metadata=metadata)


def _write_stream(batch: pa.RecordBatch, sink) -> None:
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)


_thread = threading.local()  # each writer thread's record buffer


def encode_record(op: str, args: dict, columns: dict[str, np.ndarray]) -> memoryview:
    """The whole record (header, payload, padding) in this thread's page-aligned buffer (direct I/O
    needs aligned memory): the arrays are copied once, straight into it. Valid until this thread
    encodes its next record."""
    batch = _batch(op, args, columns)
    counter = pa.MockOutputStream()
    _write_stream(batch, counter)
    size = _HEADER.size + counter.size()
    total = _aligned(size)
    buffer = getattr(_thread, "buffer", None)
    if buffer is None or len(buffer) < total:
        buffer = _thread.buffer = mmap.mmap(-1, max(total, ALIGNMENT))
    record = memoryview(buffer)[:total]
    _write_stream(batch, pa.FixedSizeBufferWriter(pa.py_buffer(record[_HEADER.size:size])))
    record[:_HEADER.size] = _HEADER.pack(MAGIC, size - _HEADER.size, crc32c(record[_HEADER.size:size]))
    record[size:] = bytes(total - size)
    return record


def decode(payload: bytes | memoryview) -> tuple[str, dict, dict[str, np.ndarray]]:
    batch = pa.ipc.open_stream(pa.py_buffer(payload)).read_next_batch()
    metadata = batch.schema.metadata
    columns = {}
    for name, column in zip(batch.schema.names, batch.columns):
        if pa.types.is_fixed_size_list(column.type):
            columns[name] = column.values.to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)
        else:
            columns[name] = column.to_numpy(zero_copy_only=False)
    return metadata[b"op"].decode(), json.loads(metadata[b"args"]), columns


def _aligned(size: int) -> int:
    return -(-size // ALIGNMENT) * ALIGNMENT


def _zeros(view: memoryview) -> bool:
    return not np.frombuffer(view, np.uint8).any()


def read_segment(path, last: bool, data: bytes | None = None) -> Iterator[tuple[int, memoryview, int]]:
    """(offset, payload, offset after its padding) of each whole record of the segment at path (a
    local path, or a Location's, with its bytes in data). A torn tail of the last segment ends the
    iteration; anything else that is not a whole record raises WalCorrupted."""
    data = memoryview(pathlib.Path(path).read_bytes() if data is None else data)
    offset = 0
    while offset < len(data):
        header = bytes(data[offset:offset + _HEADER.size])
        if header[:4] == bytes(4) and last and _zeros(data[offset:]):
            return  # zero blocks at the end: the file grew, the record never reached it
        torn = len(header) < _HEADER.size
        if not torn:
            magic, length, checksum = _HEADER.unpack(header)
            end = offset + _HEADER.size + length
            torn = end > len(data)
            checksum_of = _CHECKSUMS.get(magic)
            if not torn and (checksum_of is None or checksum_of(data[offset + _HEADER.size:end]) != checksum):
                if last and _aligned(end) >= len(data):
                    return  # the last record was being written when the process died
                raise WalCorrupted(path, offset, "bad magic" if checksum_of is None else "checksum mismatch")
        if torn:
            if last:
                return
            raise WalCorrupted(path, offset, "record cut short in a segment that is not the last")
        padded = min(_aligned(end), len(data))
        if not _zeros(data[end:padded]):
            padded = end  # a log written before records were padded
        yield offset, data[offset + _HEADER.size:end], padded
        offset = padded


def _open_for_appends(path: str, direct: bool) -> tuple[int, bool]:
    """(file descriptor, direct I/O?) of a new segment: O_DIRECT if asked and the filesystem takes it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    direct = getattr(os, "O_DIRECT", 0) if direct else 0
    if direct:
        try:
            return os.open(path, flags | direct, 0o644), True
        except OSError:  # tmpfs and some network filesystems refuse O_DIRECT
            pass
    return os.open(path, flags, 0o644), False


class _FileSegments:
    """Segments as local files that grow by appends (pwrite at the end), made durable by fdatasync.
    direct: write with direct I/O (the records go to the device now, so the fdatasync after them is
    short; used when every record is synced anyway; with fsync=never the page cache takes them)."""

    def __init__(self, folder: str, direct: bool):
        self.folder = folder
        self.direct = direct
        self.direct_io = False
        self._fd: int | None = None
        self._offset = 0

    def write(self, sequence: int, record: memoryview) -> bool:
        """Appends the record to segment ``sequence`` (a new file if none is open). True if it
        opened a new segment."""
        opened = self._fd is None
        if opened:
            self._fd, self.direct_io = _open_for_appends(os.path.join(self.folder, f"{sequence:012d}.wal"),
                                                         self.direct)
            self._offset = 0
        try:
            written = os.pwrite(self._fd, record, self._offset)
            if written != len(record):
                raise OSError(f"short write: {written} of {len(record)} bytes")
        except OSError:
            os.ftruncate(self._fd, self._offset)
            raise
        self._offset += len(record)
        return opened

    def start_sync(self):
        """Under the log's lock: what makes every record written so far durable, to run outside it."""
        if self._fd is None:
            return lambda: None
        descriptor = os.dup(self._fd)  # the segment may be closed while the fdatasync runs

        def sync():
            try:
                _fdatasync(descriptor)
            finally:
                os.close(descriptor)

        return sync

    def end_segment(self, durable: bool) -> None:
        if self._fd is not None:
            try:
                if durable:
                    _fdatasync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None


class _ObjectSegments:
    """Segments as whole objects: the records written since the last sync are uploaded together as
    one new segment (an object store has no appends and no fsync)."""

    direct_io = False

    def __init__(self, folder: Location):
        self.folder = folder
        self._records: list[bytes] = []
        self._sequence = 0

    def write(self, sequence: int, record: memoryview) -> bool:
        self._records.append(bytes(record))  # the record buffer is reused by the next append
        self._sequence = sequence
        return True  # every group is its own segment

    def start_sync(self):
        records, self._records = self._records, []
        if not records:
            return lambda: None
        target = self.folder / f"{self._sequence:012d}.wal"

        def upload():
            try:
                with self.folder.filesystem.open_output_stream(target.path) as stream:
                    for record in records:
                        stream.write(record)
            except BaseException:
                try:
                    target.delete()  # a partial object would read as corruption before later segments
                finally:
                    raise

        return upload

    def end_segment(self, durable: bool) -> None:
        self.start_sync()()


class WriteAheadLog:
    """location: the shard's log folder (a local path, or a Location; created if missing).
    on_durable: called (from the syncer thread) each time ``synced`` advances or the log fails,
    so that writers waiting for their record can look again.

    ``append`` returns the record's log sequence number (1, 2, ... since this object was made);
    ``synced`` is the highest number known to be on disk; ``failed`` is set when making records
    durable failed, after which the log takes no more (what it holds is replayed at the next start).
    """

    def __init__(self, location, fsync: str = "always", on_durable: Callable[[], None] = None):
        self.sync_delay = parse_fsync(fsync)
        self.fsync = fsync
        self.location = Location.of(location)
        self.location.make_dir()
        local = self.location.local
        if local is None and self.sync_delay is None:
            raise InvalidArgument(f"fsync=never needs a local data dir; {self.location} is written in whole "
                                  "objects, each made durable by its upload: choose always or batch_ms=N")
        self._segments = (_FileSegments(local, direct=self.sync_delay is not None) if local is not None
                          else _ObjectSegments(self.location))
        self.sequence = max(self.segments(), default=0)  # the segment being written (new at the first append)
        self.on_durable = on_durable or (lambda: None)
        self.written = 0
        self.synced = 0
        self.failed: BaseException | None = None
        self._lock = threading.Lock()  # the open segment: appends, rotation
        self._pending = threading.Condition()  # the syncer sleeps on it until written > synced
        self._in_flight = 0  # appends between their start and their record's write
        self._segment_open = False
        self._closed = False
        # Group commit at work: syncs made, seconds spent in them, records they made durable.
        self.sync_stats = {"syncs": 0, "seconds": 0.0, "records": 0}
        if self.sync_delay is not None:
            threading.Thread(target=self._sync_forever, name="monim-wal-sync", daemon=True).start()

    @property
    def direct_io(self) -> bool:
        return self._segments.direct_io

    # ----- reading ----------------------------------------------------------------------------------
    def segments(self) -> list[int]:
        return [int(name[:-4]) for name in self.location.names(".wal") if name[:-4].isdigit()]

    def _segment(self, sequence: int) -> Location:
        return self.location / f"{sequence:012d}.wal"

    def replay(self, after: int = 0) -> Iterator[tuple[str, dict, dict[str, np.ndarray]]]:
        """Every whole record of the segments after ``after`` (the last one a snapshot covers), in
        order; then cuts a torn tail off the last segment, so that it is whole when a later segment
        follows it."""
        segments = [s for s in self.segments() if s > after]
        for sequence in segments:
            segment = self._segment(sequence)
            data = segment.read_bytes()
            end = 0
            for _, payload, end in read_segment(segment, sequence == segments[-1], data):  # noqa: B007 - used after
                yield decode(payload)
            if end < len(data):
                if segment.local is not None:
                    os.truncate(segment.local, end)
                else:
                    segment.write_bytes(data[:end])

    # ----- writing ----------------------------------------------------------------------------------
    def append(self, op: str, args: dict, columns: dict[str, np.ndarray] | None = None) -> int:
        """Writes one record; returns its log sequence number. It is durable once ``synced`` reaches
        that number (at once with "never"). A full disk: RESOURCE_EXHAUSTED, and the segment is cut
        back to where it was."""
        with self._pending:
            self._in_flight += 1  # batch_ms: the syncer waits for this record
        try:
            record = encode_record(op, args, columns or {})  # outside the lock: writers encode in parallel
            with self._lock:
                if self.failed is not None:
                    raise self.failure()
                sequence = self.sequence if self._segment_open else self.sequence + 1
                try:
                    if self._segments.write(sequence, record):
                        self.sequence = sequence
                    self._segment_open = True
                except OSError as error:
                    raise ResourceExhausted(f"could not write the write-ahead log {self._segment(sequence)}: "
                                            f"{error.strerror or error}") from error
                self.written += 1
                number = self.written
        finally:
            with self._pending:
                self._in_flight -= 1
                self._pending.notify_all()
        if self.sync_delay is None:
            self.synced = number
        return number

    def failure(self) -> Unavailable:
        return Unavailable(f"the write-ahead log {self.location} could not be made durable ({self.failed}); "
                           "this shard takes no more writes until it restarts")

    def check(self, number: int) -> bool:
        """True once record ``number`` is durable; raises if the log failed before it was."""
        if self.synced >= number:
            return True
        if self.failed is not None:
            raise self.failure()
        return False

    def _sync_forever(self) -> None:
        """Group commit: one fdatasync (or upload) covers every record written before it started."""
        while True:
            with self._pending:
                self._pending.wait_for(lambda: self.written > self.synced or self._closed)
                if self._closed:
                    return
                if self.sync_delay:  # let the writers still encoding or writing join this sync
                    self._pending.wait_for(lambda: not self._in_flight or self._closed, timeout=self.sync_delay)
            with self._lock:
                target = self.written
                sync = self._segments.start_sync()
                if isinstance(self._segments, _ObjectSegments):
                    self._segment_open = False  # the next group goes to a new object
            try:
                started = time.perf_counter()
                sync()
                self.sync_stats["seconds"] += time.perf_counter() - started
                self.sync_stats["syncs"] += 1
                self.sync_stats["records"] += target - self.synced
                self.synced = max(self.synced, target)
            except Exception as error:  # noqa: BLE001 - every waiting writer gets it
                self.failed = error
            self.on_durable()
            if self.failed is not None:
                return

    def rotate(self) -> int:
        """Ends the segment being written (durable: a snapshot may drop its predecessors); the next
        append starts a new one. Returns the sequence number of the last segment before it. When the
        group commit has synced every record written (a shard's snapshot: it applies records only
        once they are durable), the segment is closed without another sync: a caller that holds
        its shard's lock must not wait for a slow disk."""
        with self._lock:
            self._segments.end_segment(durable=self.sync_delay is not None and self.synced < self.written)
            self._segment_open = False
            self.synced = self.written
            return self.sequence

    def drop_through(self, sequence: int) -> None:
        """Deletes the segments a snapshot covers (up to and including ``sequence``)."""
        for old in self.segments():
            if old <= sequence:
                self._segment(old).delete()

    def close(self) -> None:
        with self._lock:
            self._segments.end_segment(durable=self.sync_delay is not None)
            self._segment_open = False
            self.synced = self.written
        with self._pending:
            self._closed = True
            self._pending.notify()
        self.on_durable()
