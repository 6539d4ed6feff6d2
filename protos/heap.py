"""Large wire buffers without a page fault per page: glibc malloc told to keep freed memory.

Every large message a process sends or receives (a client's 8 MiB chunks of an Add, a 67 MB Search
answer, gRPC's own slices of them) is a fresh buffer of megabytes. glibc's malloc serves allocations
past its mmap threshold (128 KiB, rising to at most 32 MiB as such blocks are freed) with a new
mapping and unmaps it on free, and gives back free memory at the heap's top past its trim threshold:
so each such buffer is new memory, and writing it takes one page fault per 4 KiB page. Measured on
the 2-core VM (``python -m bench.grpc_floor`` and ``python -m bench.wire_bench``, same machine,
default against tuned): bare gRPC moved 12.6 MB up / 67 MB down in 47.8 ms against 25.6-27.0 ms, and
403 MB up in 193-240 ms against 122-123 ms; framing a 67 MB Search answer took 27-29 ms against 3.2-3.6.

keep_freed_memory() raises both thresholds (M_MMAP_THRESHOLD to MMAP_THRESHOLD_BYTES,
M_TRIM_THRESHOLD to TRIM_THRESHOLD_BYTES), so that a freed buffer stays in the process's heap and
the next message reuses its pages. The cost: a process keeps up to TRIM_THRESHOLD_BYTES of freed
memory at the top of its heap (and freed blocks below it, as glibc always does) instead of handing
it back to the OS. The processes of the service call it (the front end, each shard actor with its
read endpoint), and so does a MemoryClient that talks to a server (its process encodes and decodes
the messages). MONIM_KEEP_FREED_MEMORY=0 in a process's environment turns it off there. Not glibc
(macOS, musl): nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import threading

ENV = "MONIM_KEEP_FREED_MEMORY"
# mallopt's parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap, not from a mapping of their own (a 403 MB Add in one
# message included). glibc takes at most what fits its int.
MMAP_THRESHOLD_BYTES = 1 << 30
# Free memory at the heap's top that the process keeps rather than handing back.
TRIM_THRESHOLD_BYTES = (1 << 31) - 1

_lock = threading.Lock()
_done: bool | None = None  # what the first call did: True tuned, False not (off, or not glibc)


def keep_freed_memory() -> bool:
    """Tunes this process's glibc malloc as the module says, once (later calls answer what the first
    did). Returns whether malloc is now tuned."""
    global _done
    with _lock:
        if _done is None:
            _done = _tune()
        return _done


def _tune() -> bool:
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                                  TRIM_THRESHOLD_BYTES))
