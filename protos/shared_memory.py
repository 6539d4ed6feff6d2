"""Shared memory regions: a call's tensors between a client and a server of one host, without gRPC.

gRPC's Python ends move a large message's bytes at 1-2.5 GB/s on the GPU hosts (docs/BENCHMARKS.md,
"Search split into calls"), slower than the work of the calls that carry them. A client on the
server's own host instead keeps regions: files of the host's shared memory (``/dev/shm``, mode 0600,
named ``monim-<pid>-<32 hex digits>``) that it creates, maps, and reuses call after call. A request's
large tensors are written into a region and the message names where (``Tensor.shared``: region,
offset; the size follows from dtype and shape); the call's metadata names the room left in it
(ANSWER_REGION_KEY), where the server writes its answer's large tensors the same way. The server maps
a region once (kept, up to KEPT_REGIONS of them) and copies a request's bytes out of it as it parses
the request, so nothing it keeps (a forward's state, a log record) ever points into a region the
client writes again. ``ProbeSharedMemory`` tells a client whether a server can use its regions
(another host, container or user cannot: the client then sends everything in its messages).

Both sides: protos/framing.py places (serialized) and resolves (parsed) the bytes. The client's pool:
model_client/shared_memory.py. ``MONIM_SHARED_MEMORY=0`` turns it off in a process (a server then
refuses the probe and every reference).
"""

from __future__ import annotations

import collections
import mmap
import os
import re
import secrets
import stat
import threading
import time

import numpy as np
from monim.protos.copies import copied_bytes
from monim.protos.errors import InvalidArgument

SHARED_MEMORY_DIR = "/dev/shm"
# A call whose tensors (request and expected answer) come to less than this goes in messages only (a
# region's bookkeeping costs more than the copies it saves). Not more: on the host socket a message's
# bytes are copied four times (framed, sent, received, read into arrays); a Search of B=64, k=1024
# answers 1 MiB, which at a bound of 1 MiB a tensor all went in the message (0.60x in-process on an
# H100 host; docs/BENCHMARKS.md, "Large answers lent their region").
MIN_SHARED_BYTES = 256 << 10
# In a call that holds a region, each tensor of at least this many bytes goes through it (while it has
# room): the message keeps only what is smaller, so an answer that fits its region fits any message.
PLACED_MIN_BYTES = 4 << 10
# The call metadata naming where the answer's large tensors may go: "<region>:<offset>:<bytes>".
ANSWER_REGION_KEY = "monim-answer-region"
# Regions a server keeps mapped (the least recently used one is unmapped past it).
KEPT_REGIONS = 64
ENV = "MONIM_SHARED_MEMORY"
_NAME = re.compile(r"monim-[0-9]{1,10}-[0-9a-f]{32}")


def enabled() -> bool:
    """Whether this process uses shared memory (MONIM_SHARED_MEMORY=0 turns it off) and has the directory
    (looked for until found: a client asks before each call, and a stat costs microseconds)."""
    global _found
    if os.environ.get(ENV, "1") == "0":
        return False
    if not _found:
        _found = os.path.isdir(SHARED_MEMORY_DIR)
    return _found


_found = False


def _path(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgument(f"{name!r} is not a shared memory region's name (monim-<pid>-<32 hex digits>)")
    return os.path.join(SHARED_MEMORY_DIR, name)


class Region:
    """One region file, mapped read-write. A client's own (create, unlinked by close) or one a server
    opened by name (open: a regular file of this process's user, not a link)."""

    def __init__(self, name: str, fd: int, size: int, owned: bool):
        self.name, self.size, self.owned = name, size, owned
        self._inode = os.fstat(fd).st_ino
        self.mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        os.close(fd)
        self.view_all = memoryview(self.mapping)

    @classmethod
    def create(cls, size: int) -> Region:
        """A new region of ``size`` bytes, its memory taken now (posix_fallocate: no page is zeroed
        during a call later; ENOSPC if the host's shared memory is full)."""
        name = f"monim-{os.getpid()}-{secrets.token_hex(16)}"
        fd = os.open(_path(name), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        except BaseException:
            os.close(fd)
            os.unlink(_path(name))
            raise
        return cls(name, fd, size, owned=True)

    @classmethod
    def open(cls, name: str) -> Region:
        """The region a client named. InvalidArgument if it is not one this process may use."""
        path = _path(name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as error:
            raise InvalidArgument(f"shared memory region {name!r} cannot be opened here: {error.strerror}") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_size == 0:
            os.close(fd)
            raise InvalidArgument(f"shared memory region {name!r} is not a region of this server's user")
        return cls(name, fd, info.st_size, owned=False)

    def view(self, offset: int, size: int) -> memoryview:
        """Bytes [offset, offset + size) of the region; InvalidArgument past its end."""
        if offset < 0 or size < 0 or offset + size > self.size:
            raise InvalidArgument(f"bytes {offset}..{offset + size} are past the end of shared memory region "
                                  f"{self.name!r} ({self.size} bytes)")
        return self.view_all[offset:offset + size]

    def current(self) -> bool:
        """Whether the file this maps is still the one under its name (its client has not closed it)."""
        try:
            return os.stat(_path(self.name)).st_ino == self._inode
        except OSError:
            return False

    def close(self) -> None:
        """Unmaps it (once no view of it is left) and, if this process made it, removes its file."""
        try:
            self.view_all.release()
            self.mapping.close()
        except BufferError:  # a view of it is still in use: the mapping goes with the last one
            pass
        if self.owned:
            try:
                os.unlink(_path(self.name))
            except FileNotFoundError:
                pass


class Placer:
    """Hands out consecutive byte ranges of [start, end) of a region, each 64-byte aligned: where a
    message's large tensors go. place(n) -> (region name, offset, writable view) or None when full."""

    def __init__(self, region: Region, start: int, end: int):
        self.region, self._next, self._end = region, start, min(end, region.size)

    @property
    def used(self) -> int:
        """The offset after the last range handed out, 64-byte aligned."""
        return -(-self._next // 64) * 64

    def place(self, size: int):
        offset = self.used
        if offset + size > self._end:
            return None
        self._next = offset + size
        return self.region.name, offset, self.region.view(offset, size)


class OpenRegions:
    """A server's mapped regions by name: each opened once, then kept (the least recently used of
    more than KEPT_REGIONS unmapped); one whose file went (its client closed it) is dropped when
    asked for, and all such are looked for at most once a second."""

    def __init__(self, kept: int = KEPT_REGIONS):
        self._kept = kept
        self._regions: collections.OrderedDict[str, Region] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._swept = time.monotonic()

    def get(self, name: str) -> Region:
        with self._lock:
            region = self._regions.get(name)
            if region is not None and not region.current():
                self._drop(name)
                region = None
            if region is None:
                region = self._regions[name] = Region.open(name)
            self._regions.move_to_end(name)
            while len(self._regions) > self._kept:
                self._drop(next(iter(self._regions)))
            if time.monotonic() - self._swept > 1.0:
                self._swept = time.monotonic()
                for gone in [n for n, r in self._regions.items() if n != name and not r.current()]:
                    self._drop(gone)
            return region

    def _drop(self, name: str) -> None:
        self._regions.pop(name).close()

    def __len__(self) -> int:
        return len(self._regions)


_server_regions = OpenRegions()
_request_memory = None  # copy_requests_into's allocator


def copy_requests_into(allocate) -> None:
    """Where this server process copies request tensors out of its clients' regions: allocate(size) ->
    a writable uint8 array of size bytes (None: numpy's memory). A process whose shards are on its GPU
    gives pinned host memory (datastore/transfer.host_bytes), from which the copy to the GPU is direct:
    without it, a request's tensors were copied twice on the host, out of the region and into a pinned
    buffer (3 MB for an ApplyGradients of 1,024 rows; 12.6 MB for a Search of B=4096)."""
    global _request_memory
    _request_memory = allocate


def server_regions() -> OpenRegions:
    """This process's regions opened by name (a server's, shared by its front end and endpoints)."""
    return _server_regions


def copied(name: str, offset: int, size: int) -> np.ndarray:
    """A server's copy of a request tensor's bytes in a client's region (nothing it keeps may point
    into memory its client writes again): read-only uint8, copied without holding the GIL."""
    if not enabled():
        raise InvalidArgument(f"shared memory is turned off on this server ({ENV}=0): send tensors in the message")
    return copied_bytes(_server_regions.get(name).view(offset, size), _request_memory)


def answer_placer(value: str) -> Placer:
    """The Placer of the ANSWER_REGION_KEY metadata value "<region>:<offset>:<bytes>"."""
    try:
        name, offset, size = value.rsplit(":", 2)
        offset, size = int(offset), int(size)
    except ValueError:
        raise InvalidArgument(f"{ANSWER_REGION_KEY} must be <region>:<offset>:<bytes>, got {value!r}") from None
    if not enabled():
        raise InvalidArgument(f"shared memory is turned off on this server ({ENV}=0)")
    region = _server_regions.get(name)
    region.view(offset, size)  # in bounds
    return Placer(region, offset, offset + size)
