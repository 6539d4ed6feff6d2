"""A slow disk for the reliability run's ``slowdisk`` fault, injected from outside monim's code.

The deployment's Ray head (and through it every shard and registry worker) starts with this folder
on PYTHONPATH, so Python imports this module at start, before monim binds ``os.fdatasync``; with
RELIABILITY_SLOW_DISK_FILE set, every fdatasync and fsync first sleeps the seconds that file holds
(none while it is missing or empty). The fault writes the file, waits, and removes it. Nothing else
in the process changes.
"""

import os
import time

_CONTROL = os.environ.get("RELIABILITY_SLOW_DISK_FILE")


def _delay() -> float:
    try:
        with open(_CONTROL) as file:
            return float(file.read().strip() or 0.0)
    except (OSError, ValueError):
        return 0.0


def _slowed(sync):
    def slow_sync(fd):
        delay = _delay()
        if delay > 0:
            time.sleep(delay)
        return sync(fd)

    slow_sync.__name__ = sync.__name__
    return slow_sync


if _CONTROL:
    os.fsync = _slowed(os.fsync)
    if hasattr(os, "fdatasync"):
        os.fdatasync = _slowed(os.fdatasync)
