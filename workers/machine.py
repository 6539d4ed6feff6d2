"""Where a shard's process runs and the memory it uses, for ``monim status`` and the metrics.

``host_report`` runs inside the shard's process (the runtime's ``shard_host``: through Ray's
``__ray_call__`` in a shard actor, directly for in-process shards, which share the front end's
process). Host figures come from /proc (Linux); elsewhere they are None. GPU figures come from
torch.cuda on a shard whose device is a GPU, else None.
"""

from __future__ import annotations

import os
import socket


def _resident_bytes(pid: int | str = "self") -> int | None:
    """A process's resident set size (VmRSS; this process's by default), or None where /proc is missing."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def _available_bytes() -> int | None:
    """Memory the kernel says new work can take without swapping (MemAvailable), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii", errors="replace") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _gpu_bytes(device: str) -> tuple[int | None, int | None]:
    """(bytes torch's allocator holds on device, free bytes on it) for a CUDA device, else (None, None).
    "Free" is the driver's answer for the whole GPU, other processes included."""
    if not device.startswith("cuda"):
        return None, None
    import torch  # a GPU shard's process has it loaded already

    if not torch.cuda.is_available():
        return None, None
    free, _total = torch.cuda.mem_get_info(device)
    return int(torch.cuda.memory_reserved(device)), int(free)


def host_report(device: str) -> dict:
    """{"node": host name, "device": device, "host_used_bytes": this process's resident set,
    "host_free_bytes": available on the machine, "gpu_used_bytes", "gpu_free_bytes"}; a figure
    that cannot be read here is None."""
    gpu_used, gpu_free = _gpu_bytes(device)
    return {"node": socket.gethostname() or os.uname().nodename, "device": device,
            "host_used_bytes": _resident_bytes(), "host_free_bytes": _available_bytes(),
            "gpu_used_bytes": gpu_used, "gpu_free_bytes": gpu_free}
