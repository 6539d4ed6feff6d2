"""Write-ahead log of one shard: every change is appended (and flushed) before it is applied.

A log is a folder of segments ``<seq>.wal`` (12-digit sequence numbers); a snapshot
rotates to a new segment, and the segments it covers are deleted once it is written.
Each record is

    magic b"MWAL" | payload length (u32, little-endian) | CRC-32 of the payload (u32) | payload

and the payload is an Arrow IPC stream of one record batch: the operation and its
scalar arguments in the schema's metadata (``op``, ``args`` as JSON), its arrays as
columns (a 2-D array [N, W] as a fixed-size list of W). Reading stops at a torn tail
(a record cut short, or a bad checksum on the last record of the last segment: a
crash in mid-append) and the writer cuts the file there; a bad record with whole
records after it is corruption, reported with the file and offset, never skipped.

The log is on a local (or mounted) filesystem, where appends and fsync exist.
fsync: "always" (fsync before a call is acknowledged; survives power loss);
"batch_ms=N" (every record reaches the OS before its call is acknowledged, and a
background thread fsyncs at most N ms later: a killed process loses nothing, a
machine that loses power loses at most the last N ms); "never" (the OS flushes
when it likes).
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
import threading
import time
import zlib
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
from monim.protos.errors import FailedPrecondition, InvalidArgument, ResourceExhausted

MAGIC = b"MWAL"
_HEADER = struct.Struct("<4sII")


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


def encode(op: str, args: dict, columns: dict[str, np.ndarray]) -> pa.Buffer:
    """One record's payload: Arrow IPC stream bytes (a pyarrow Buffer: written without a copy)."""
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
        batch = pa.RecordBatch.from_arrays(arrays, names=names).replace_schema_metadata(metadata)
    else:
        batch = pa.RecordBatch.from_pydict({}, metadata=metadata)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


def decode(payload: bytes) -> tuple[str, dict, dict[str, np.ndarray]]:
    batch = pa.ipc.open_stream(payload).read_next_batch()
    metadata = batch.schema.metadata
    columns = {}
    for name, column in zip(batch.schema.names, batch.columns):
        if pa.types.is_fixed_size_list(column.type):
            columns[name] = column.values.to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)
        else:
            columns[name] = column.to_numpy(zero_copy_only=False)
    return metadata[b"op"].decode(), json.loads(metadata[b"args"]), columns


def read_segment(path: pathlib.Path, last: bool) -> Iterator[tuple[int, bytes]]:
    """(offset, payload) of each whole record. A torn tail of the last segment ends the iteration;
    anything else that is not a whole record raises WalCorrupted."""
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
        header = data[offset:offset + _HEADER.size]
        torn = len(header) < _HEADER.size
        if not torn:
            magic, length, checksum = _HEADER.unpack(header)
            end = offset + _HEADER.size + length
            torn = end > len(data)
            if not torn and (magic != MAGIC or zlib.crc32(data[offset + _HEADER.size:end]) != checksum):
                if last and end == len(data):
                    return  # the last record was being written when the process died
                raise WalCorrupted(path, offset, "bad magic" if magic != MAGIC else "checksum mismatch")
        if torn:
            if last:
                return
            raise WalCorrupted(path, offset, "record cut short in a segment that is not the last")
        yield offset, data[offset + _HEADER.size:end]
        offset = end


class WriteAheadLog:
    """directory: the shard's log folder (created if missing)."""

    def __init__(self, directory: str | os.PathLike, fsync: str = "always"):
        self.fsync_after = parse_fsync(fsync)
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._file = None
        self.sequence = max(self.segments(), default=0)
        self._dirty = threading.Event()
        self._lock = threading.Lock()  # the file, between appends and the background fsync
        if self.fsync_after:
            threading.Thread(target=self._sync_periodically, name="monim-wal-fsync", daemon=True).start()

    def _sync_periodically(self) -> None:
        while True:
            self._dirty.wait()
            time.sleep(self.fsync_after)
            with self._lock:
                self._dirty.clear()
                if self._file is not None:
                    os.fsync(self._file.fileno())

    def segments(self) -> list[int]:
        return sorted(int(p.stem) for p in self.directory.glob("*.wal") if p.stem.isdigit())

    def _path(self, sequence: int) -> pathlib.Path:
        return self.directory / f"{sequence:012d}.wal"

    def replay(self, after: int = 0) -> Iterator[tuple[str, dict, dict[str, np.ndarray]]]:
        """Every whole record of the segments after ``after`` (the last one a snapshot covers), in
        order; then cuts a torn tail off the last segment so that appends continue after it."""
        segments = [s for s in self.segments() if s > after]
        for sequence in segments:
            path = self._path(sequence)
            end = 0
            for offset, payload in read_segment(path, last=sequence == segments[-1]):
                end = offset + _HEADER.size + len(payload)
                yield decode(payload)
            if sequence == segments[-1] and end < path.stat().st_size:
                with open(path, "r+b") as file:
                    file.truncate(end)

    def append(self, op: str, args: dict, columns: dict[str, np.ndarray] | None = None) -> None:
        """Appends one record and flushes it (fsync with the "always" policy) before returning.
        A full disk: RESOURCE_EXHAUSTED, and the file is cut back to where it was."""
        payload = encode(op, args, columns or {})
        header = _HEADER.pack(MAGIC, payload.size, zlib.crc32(payload))
        if self._file is None:
            self.sequence = self.sequence or 1
            # Unbuffered: a failed write leaves nothing in a Python buffer, so the file can be cut back.
            self._file = open(self._path(self.sequence), "ab", buffering=0)  # noqa: SIM115 - kept open
        with self._lock:
            start = self._file.tell()
            try:
                written = self._file.write(header) + self._file.write(payload)
                if written != len(header) + payload.size:
                    raise OSError(f"short write: {written} of {len(header) + payload.size} bytes")
                if self.fsync_after == 0.0:
                    os.fsync(self._file.fileno())
            except OSError as error:
                self._file.truncate(start)
                self._file.seek(start)
                raise ResourceExhausted(f"could not write the write-ahead log {self._path(self.sequence)}: "
                                        f"{error.strerror or error}") from error
        if self.fsync_after:
            self._dirty.set()

    def rotate(self) -> int:
        """Starts a new segment; returns the sequence number of the last one before it."""
        with self._lock:
            if self._file is not None:
                if self.fsync_after is not None:
                    os.fsync(self._file.fileno())  # a snapshot may drop this segment's predecessors
                self._file.close()
                self._file = None
        covered = self.sequence
        self.sequence = covered + 1
        return covered

    def drop_through(self, sequence: int) -> None:
        """Deletes the segments a snapshot covers (up to and including ``sequence``)."""
        for old in self.segments():
            if old <= sequence:
                self._path(old).unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                if self.fsync_after is not None:
                    os.fsync(self._file.fileno())
                self._file.close()
                self._file = None
