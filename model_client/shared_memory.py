"""A client's shared memory regions (protos/shared_memory.py): a pool of them, reused call after call,
and which servers use them.

A call that moves MIN_SHARED_BYTES or more (its request's tensors and the answer it expects) takes a
region from the pool for as long as it runs: its request's tensors (each of PLACED_MIN_BYTES or more)
are written at the region's start, the rest of the region is where the server may write its answer's
(ANSWER_REGION_KEY), and the answer is read from there before the region goes back to the pool.
An answer that fills a good part of its region (LEND_FRACTION) is not copied at all: the caller's
arrays lie in the region, which is lent to them (_loan) and goes back to the pool only once no array
over it is left (the region of a 67 MB Search answer was copied out at ~10 GB/s, milliseconds a call);
past half the budget in lent regions, answers are copied out again. A call cut short on this side
(its deadline) may still be answered into its region by the server: that region is retired, never
handed to a later call. A region is made when no free one is large enough (at least
REGION_BYTES, more for a larger call) while the pool holds less than ``budget`` bytes; past that the
call sends everything in its messages. Each server (the front end, each read endpoint) is asked once
whether it can use the regions (ProbeSharedMemory); one that cannot, or a host whose shared memory is
full, gets messages only. close() removes the regions' files (so does the client's garbage
collection, or the interpreter's exit, if it was not closed); the first region a process makes
first removes those of this user's clients that died before they closed.
"""

from __future__ import annotations

import ctypes
import os
import threading
import weakref

import numpy as np
from monim.protos.errors import InternalError
from monim.protos.shared_memory import (
    ANSWER_REGION_KEY,
    PLACED_MIN_BYTES,
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
# The region of a server's probe (ProbeSharedMemory reads 32 bytes of it and writes them back).
PROBE_BYTES = 4096
# A call whose answer is expected to fill at least this part of its region lends the region to the
# answer's arrays (no copy out of it); a smaller answer is copied out (a 1 MiB answer would otherwise
# hold a 32 MiB region for as long as its arrays live).
LEND_FRACTION = 0.25


class SharedMemory:
    def __init__(self, budget: int = DEFAULT_BUDGET_BYTES):
        self.budget = budget
        self._free: list[Region] = []
        self._regions: dict[str, Region] = {}  # every region this client made, by name
        self._usable: dict[str, bool] = {}  # target -> whether its server uses the regions
        # Reentrant: a lent region comes back (_returned) whenever its last array goes, which may be inside
        # a locked section of this thread (the garbage collector runs at any allocation).
        self._lock = threading.RLock()
        self._pid = os.getpid()
        self._loans: dict[str, object] = {}  # region name -> the _loan buffer of a call in flight that lends it
        self._lent: dict[str, Region] = {}  # regions lent to answers' arrays, by name
        self.bytes_placed = 0  # answers' tensor bytes read from a region instead of a message (requests' are not counted)
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
        """The probe on a region of one page of its own, removed after (every client probes at its first
        call, for the host socket: one that makes only small calls keeps no region)."""
        _remove_orphans()
        try:
            region = Region.create(PROBE_BYTES)
        except OSError:  # the host's shared memory is full, or not writable here
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
            region.close()

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

    def lend(self, region: Region) -> bool:
        """Lends the region of a call in flight to its answer's arrays (view() hands out arrays over it)
        unless lent regions already hold half the budget. The call ends with ended()."""
        with self._lock:
            if self.lent_bytes + region.size > self.budget // 2:
                return False
            loan = _loan(region)
            self._loans[region.name] = loan
            self._lent[region.name] = region
        weakref.finalize(loan, self._returned, region)
        return True

    def ended(self, region: Region, answered: bool) -> None:
        """A call that held region ended. answered: the server is done with it (else the region is
        retired: the server may still write its answer there). A lent region goes back to the pool when
        the last array over it goes (at once if the answer left none)."""
        if not answered:
            self.retire(region)
        with self._lock:
            loan = self._loans.pop(region.name, None)
        if loan is None and answered:
            self.release(region)
        del loan  # the loan's finalizer runs here if no array holds it

    def _returned(self, region: Region) -> None:
        """The last array over a lent region went."""
        with self._lock:
            self._lent.pop(region.name, None)
        self.release(region)

    @property
    def lent_bytes(self) -> int:
        """Bytes of regions lent to answers' arrays that are still alive."""
        with self._lock:
            return sum(region.size for region in self._lent.values())

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
        view = region.view(offset, size)  # (in bounds)
        loan = self._loans.get(name)
        if loan is None:
            return view
        return np.frombuffer(loan, np.uint8, size, offset)  # the array keeps the loan, and so the region

    def close(self) -> None:
        with self._lock:
            self._finalizer()


def _loan(region: Region):
    """The whole mapping of a lent region as a ctypes buffer: an array over it (numpy's frombuffer, and
    every view or torch tensor made from that) keeps this object alive, and a finalizer on it tells
    when the last such array went (a memoryview cannot: numpy keeps a memoryview of its own)."""
    return (ctypes.c_char * region.size).from_buffer(region.mapping)


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
    """Bytes of a request's tensors that would go through a region (each of PLACED_MIN_BYTES or more)."""
    total = 0
    for array in (tensors or {}).values():
        size = getattr(array, "nbytes", 0)
        if size >= PLACED_MIN_BYTES:
            total += size + 64
    return total
