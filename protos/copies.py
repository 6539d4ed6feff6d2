"""Copies of a large call's bytes that let the process's other threads run, several threads at once.

A tensor that passes through a shared memory region is copied once on each side (protos/framing.py
into the region, protos/shared_memory.copied out of it; the client's answer into the caller's
arrays). A ``memoryview`` slice assignment or ``bytes(view)`` does that copy holding the GIL: for a
67 MB Search answer that is 3-9 ms during which no other thread of the server runs (a decode step
waits behind it; so does the search of the next call of a split batch, whose answers are meant to
travel while it runs). numpy's copy releases the GIL, and a copy of PARALLEL_BYTES or more is cut
into slices copied by up to COPY_THREADS threads at once (one thread's memcpy moves ~7-20 GB/s, well
below what the host's memory does: on an H100 host a Search answer's 67 MB took ~8 ms to copy on each
side, in parts of 1-2 MB an array).
"""

from __future__ import annotations

import concurrent.futures
import os
import threading

import numpy as np

# A copy at least this large goes in slices on several threads.
PARALLEL_BYTES = 1 << 20
# Threads of one copy at most (and of the pool, shared by the process's copies).
COPY_THREADS = max(1, min(4, (os.cpu_count() or 1) // 2))

_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    """The process's copy threads (made again in a forked child: the parent's threads are not there)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = concurrent.futures.ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="monim-copy")
            _pool_pid = os.getpid()
        return _pool


def in_slices(work, size: int, itemsize: int = 1) -> list:
    """[work(start, end) for each slice of range(size)]: one slice under PARALLEL_BYTES (of itemsize
    bytes an element), else up to COPY_THREADS slices on page boundaries run at once (work must release
    the GIL to gain: numpy's copies and reductions do)."""
    if COPY_THREADS == 1 or size * itemsize < PARALLEL_BYTES:
        return [work(0, size)]
    step = -(-size // COPY_THREADS)
    step += -step % max(1, 4096 // itemsize)
    bounds = [(start, min(size, start + step)) for start in range(0, size, step)]
    later = [_executor().submit(work, start, end) for start, end in bounds[1:]]
    first = work(*bounds[0])
    return [first] + [result.result() for result in later]


def copy_bytes(target, source) -> None:
    """target[:] = source for two buffers of equal length (memoryview, bytes, numpy arrays, mmap),
    target writable: without the GIL, and in slices on up to COPY_THREADS threads past PARALLEL_BYTES."""
    into = np.frombuffer(target, np.uint8)
    data = np.frombuffer(source, np.uint8)
    if into.shape != data.shape:
        raise ValueError(f"a copy of {data.size} bytes into {into.size}")
    in_slices(lambda start, end: np.copyto(into[start:end], data[start:end]), data.size)


def copy_rows(target: np.ndarray, source: np.ndarray) -> None:
    """target[...] = source for arrays of one shape and dtype: copy_bytes where both are contiguous,
    numpy's assignment (which also releases the GIL) where not."""
    if (target.shape == source.shape and target.dtype == source.dtype
            and target.flags.c_contiguous and source.flags.c_contiguous and target.nbytes >= PARALLEL_BYTES):
        copy_bytes(target.reshape(-1).view(np.uint8), source.reshape(-1).view(np.uint8))
    else:
        target[...] = source


def copied_bytes(source, allocate=None) -> np.ndarray:
    """A new read-only uint8 array with source's bytes (in place of bytes(source), which holds the GIL).
    allocate(size) -> the writable uint8 array of size bytes to copy into (None: numpy's memory)."""
    data = np.frombuffer(source, np.uint8)
    out = np.empty(data.size, np.uint8) if allocate is None else allocate(data.size)
    copy_bytes(out, data)
    out.flags.writeable = False
    return out
