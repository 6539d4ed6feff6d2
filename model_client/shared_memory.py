"""A client's shared memory regions (protos/shared_memory.py): a pool of them, reused call after call,
and which servers use them.

A call that moves MIN_SHARED_BYTES or more (a large tensor in its request, or an answer expected to be
that large) takes a region from the pool for as long as it runs: its request's large tensors are
written at the region's start, the rest of the region is where the server may write its answer's
(ANSWER_REGION_KEY), and the answer is read from there (copied into the caller's arrays) before the
region goes back to the pool. A region is made when no free one is large enough (at least
REGION_BYTES, more for a larger call) while the pool holds less than ``budget`` bytes; past that the
call sends everything in its messages. Each server (the front end, each read endpoint) is asked once
whether it can use the regions (ProbeSharedMemory); one that cannot, or a host whose shared memory is
full, gets messages only. close() removes the regions' files (so does the client's garbage
collection, or the interpreter's exit, if it was not closed); the first region a process makes
first removes those of this user's clients that died before they closed.
"""

from __future__ import annotations

import os
import threading
import weakref

from monim.protos.errors import InternalError
from monim.protos.shared_memory import (
    ANSWER_REGION_KEY,
    MIN_SHARED_BYTES,
    SHARED_MEMORY_DIR,
    Placer,
    Region,
    enabled,
)

# The smallest region made (a split Search's call answers up to 20 MiB; a region is reused, so its
# memory is taken once).
REGION_BYTES = 32 << 20
# Bytes of regions one client keeps at most (its calls in flight at once each hold one).
DEFAULT_BUDGET_BYTES = 1 << 30


class SharedMemory:
    def __init__(self, budget: int = DEFAULT_BUDGET_BYTES):
        self.budget = budget
        self._free: list[Region] = []
        self._regions: dict[str, Region] = {}  # every region this client made, by name
        self._usable: dict[str, bool] = {}  # target -> whether its server uses the regions
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.bytes_placed = 0  # tensors' bytes that went through a region instead of a message (both ways)
        # The regions' files go with this object, or at the interpreter's exit, if close() was not called.
        self._finalizer = weakref.finalize(self, _close_regions, self._regions, self._free, self._pid)

    def usable(self, target: str, probe) -> bool:
        """Whether calls to target use the regions; probe(region name) asks its server once
        (ProbeSharedMemory, raising if it cannot use them)."""
        if os.getpid() != self._pid or not enabled():  # a forked child keeps its own regions, or none
            return False
        usable = self._usable.get(target)
        if usable is None:
            usable = self._usable[target] = self._probe(probe)
        return usable

    def _probe(self, probe) -> bool:
        region = self.acquire(64)
        if region is None:
            return False
        try:
            token = os.urandom(32)
            region.view(0, 32)[:] = token
            region.view(32, 32)[:] = bytes(32)
            try:
                probe(region.name)
            except Exception:  # noqa: BLE001 - another host, user or container, or turned off: messages only
                return False
            return bytes(region.view(32, 32)) == token[::-1]
        finally:
            self.release(region)

    def acquire(self, size: int) -> Region | None:
        """A free region of at least size bytes (made if none is and the budget allows), or None."""
        _remove_orphans()
        with self._lock:
            fitting = [region for region in self._free if region.size >= size]
            if fitting:
                region = min(fitting, key=lambda r: r.size)
                self._free.remove(region)
                return region
            size = max(REGION_BYTES, -(-size // (1 << 20)) << 20)
            held = sum(region.size for region in self._regions.values())
            while self._free and held + size > self.budget:  # smaller free regions make room
                dropped = self._free.pop(0)
                held -= dropped.size
                del self._regions[dropped.name]
                dropped.close()
            if held + size > self.budget:
                return None
            try:
                region = Region.create(size)
            except OSError:  # the host's shared memory is full, or not writable here
                return None
            self._regions[region.name] = region
            return region

    def release(self, region: Region) -> None:
        with self._lock:
            if region.name in self._regions:
                self._free.append(region)

    def retire(self, region: Region) -> None:
        """Removes a region no call may use again (its server may still write into it): unmapped once
        no view of it is left, its file removed (the server's mapping keeps the pages it writes)."""
        with self._lock:
            if self._regions.pop(region.name, None) is not None:
                region.close()

    def view(self, name: str, offset: int, size: int):
        """The bytes of an answer's tensor in one of this client's regions (framing.parsed's ``shared``)."""
        region = self._regions.get(name)
        if region is None:
            raise InternalError(f"the server answered with shared memory region {name!r}, not one of this client's")
        self.bytes_placed += size
        return region.view(offset, size)

    def close(self) -> None:
        with self._lock:
            self._finalizer()


def _close_regions(regions: dict, free: list, pid: int) -> None:
    """Unmaps the regions and removes their files (a client's close, or its finalizer), in the process
    that made them (a forked child's copy leaves its parent's alone)."""
    if os.getpid() != pid:
        return
    for region in regions.values():
        region.close()
    regions.clear()
    free.clear()


_orphans_checked = threading.Lock()
_orphans_done: set[int] = set()


def _remove_orphans() -> None:
    """Once per process: removes the region files of this user's clients that died before they closed
    (monim-<pid>-*, no process <pid> left)."""
    pid = os.getpid()
    if pid in _orphans_done:
        return
    with _orphans_checked:
        if pid in _orphans_done:
            return
        _orphans_done.add(pid)
        try:
            names = os.listdir(SHARED_MEMORY_DIR)
        except OSError:
            return
        for name in names:
            parts = name.split("-")
            if len(parts) != 3 or parts[0] != "monim" or not parts[1].isdigit() or int(parts[1]) == pid:
                continue
            try:
                os.kill(int(parts[1]), 0)
                continue  # alive (or another user's process: not ours to judge)
            except ProcessLookupError:
                pass
            except OSError:
                continue
            path = os.path.join(SHARED_MEMORY_DIR, name)
            try:
                if os.stat(path, follow_symlinks=False).st_uid == os.geteuid():
                    os.unlink(path)
            except OSError:
                pass


class CallRegion:
    """A region held for one call: its request's large tensors from the start (request_placer), the
    room after them for the answer (answer_metadata)."""

    def __init__(self, region: Region):
        self.region = region
        self.request_placer = Placer(region, 0, region.size)

    def answer_metadata(self) -> tuple[str, str]:
        """The call's metadata naming the room after the request's tensors (ANSWER_REGION_KEY)."""
        start = self.request_placer.used
        return ANSWER_REGION_KEY, f"{self.region.name}:{start}:{self.region.size - start}"

    def holds(self, data: memoryview) -> bool:
        """Whether data is a view of this call's region."""
        return data.obj is self.region.mapping


def tensor_bytes(tensors: dict | None) -> int:
    """Bytes of a request's tensors that would go through a region (each of MIN_SHARED_BYTES or more)."""
    total = 0
    for array in (tensors or {}).values():
        size = getattr(array, "nbytes", 0)
        if size >= MIN_SHARED_BYTES:
            total += size + 64
    return total
