"""The slowdisk fault's mechanism (reliability/slow_disk/sitecustomize.py): a Python process started
with the folder on PYTHONPATH and RELIABILITY_SLOW_DISK_FILE set sleeps before each fsync and
fdatasync for as long as the file says, and syncs at full speed once it is gone."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

from reliability.deployment import SLOW_DISK_MODULE_DIR

TIMED_SYNCS = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT)
for sync in (os.fsync, os.fdatasync):
    started = time.monotonic()
    sync(fd)
    print(f"{time.monotonic() - started:.3f}")
"""


def _sync_times(tmp_path: pathlib.Path, control: pathlib.Path) -> list[float]:
    env = dict(os.environ, PYTHONPATH=SLOW_DISK_MODULE_DIR, RELIABILITY_SLOW_DISK_FILE=str(control))
    result = subprocess.run([sys.executable, "-c", TIMED_SYNCS, str(tmp_path / "data")], env=env,
                            capture_output=True, text=True, timeout=60, check=True)
    return [float(line) for line in result.stdout.split()]


def test_fsyncs_wait_while_the_control_file_says_so(tmp_path):
    control = tmp_path / "slow-disk"
    control.write_text("0.4\n")
    assert all(seconds >= 0.4 for seconds in _sync_times(tmp_path, control))
    control.unlink()
    assert all(seconds < 0.4 for seconds in _sync_times(tmp_path, control))
