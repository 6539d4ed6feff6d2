"""A watchdog for the driver's server sessions: ``python -m reliability.reaper DRIVER_PID SESSIONS_FILE DEADLINE``.

The driver cleans up after itself, on failure and Ctrl-C too; this covers what it cannot: the driver
killed with SIGKILL, or a run past its hard deadline (a time.time() value). Then every process of the
sessions listed in SESSIONS_FILE (a JSON list of session ids the driver rewrites as it starts servers)
is killed with SIGKILL, and the reaper exits. A driver that finishes normally ends the reaper with
SIGTERM first (it then exits without killing anything). It runs in a session of its own, so a Ctrl-C
sent to the driver's process group does not end it before the driver has cleaned up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from reliability.processes import kill_sessions

POLL_S = 1.0


def _sessions(path: str) -> list[int]:
    try:
        with open(path) as file:
            return [int(s) for s in json.load(file)]
    except (OSError, ValueError):
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return os.getppid() == pid  # reparented: the driver is gone even if its pid was reused


def main(argv: list[str]) -> int:
    driver, path, deadline = int(argv[0]), argv[1], float(argv[2])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while _alive(driver) and time.time() < deadline:
        time.sleep(POLL_S)
    why = "past the run's hard deadline" if time.time() >= deadline else "the driver is gone"
    killed = kill_sessions(_sessions(path))
    print(f"reliability reaper: {why}: killed {killed} server process(es)", file=sys.stderr, flush=True)
    return 0


def start_reaper(sessions_file: str, deadline: float) -> subprocess.Popen:
    """Starts the reaper for this process (the driver)."""
    return subprocess.Popen([sys.executable, "-m", "reliability.reaper", str(os.getpid()), sessions_file,
                             repr(deadline)], start_new_session=True, cwd=os.path.dirname(os.path.dirname(
                                 os.path.abspath(__file__))))


def write_sessions(path: str, sessions: list[int]) -> None:
    """Replaces the reaper's file atomically."""
    temporary = f"{path}.tmp"
    with open(temporary, "w") as file:
        json.dump(sessions, file)
    os.replace(temporary, path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
