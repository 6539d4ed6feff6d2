"""Processes the driver starts, found and killed by session.

Everything the driver starts as a server (the Ray head, each front end) is the leader of a session
of its own (``start_new_session``), and whatever it starts stays in that session (Ray's GCS,
raylet, agents and actor workers), even once its leader is gone. So "the processes of that server"
is "the processes whose session id is the leader's pid", read from /proc, and nothing else on the
machine is ever signalled.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable

# The process title Ray gives a shard actor's worker ("ray::Shard", or "ray::Shard.<method>" while busy).
SHARD_TITLE = "ray::Shard"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_processes(sessions: Iterable[int]) -> list[int]:
    """pids of every live process whose session is one of ``sessions`` (zombies included)."""
    sessions = set(sessions)
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) in sessions:
                    pids.append(int(entry))
            except (ProcessLookupError, PermissionError):
                continue
    return pids


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def signal_pid(pid: int, signum: int) -> bool:
    try:
        os.kill(pid, signum)
        return True
    except ProcessLookupError:
        return False


def kill_sessions(sessions: Iterable[int], timeout_s: float = 30.0) -> int:
    """SIGKILL every process of the sessions, again until none is left running (a process may fork
    while its session is being killed); returns how many were signalled. A SIGSTOPped one dies too."""
    sessions = list(sessions)
    killed: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while True:
        running = [pid for pid in session_processes(sessions) if _alive(pid)]
        if not running or time.monotonic() > deadline:
            return len(killed)
        for pid in running:
            if signal_pid(pid, signal.SIGKILL):
                killed.add(pid)
        time.sleep(0.1)


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def shard_of_worker(pid: int, data_dir: str) -> int | None:
    """The shard a ``ray::Shard`` worker serves: the one whose log segment it holds open
    (DATA_DIR/shard-<i>/wal/...); None before its first write."""
    pattern = re.compile(re.escape(os.path.join(data_dir, "shard-")) + r"(\d+)/")
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                found = pattern.match(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
            if found:
                return int(found.group(1))
    except OSError:
        return None
    return None


def shard_workers(session: int, data_dir: str) -> dict[int, int | None]:
    """pid -> shard index (None if not known yet) of the shard actors' worker processes in the session."""
    return {pid: shard_of_worker(pid, data_dir) for pid in session_processes([session])
            if _alive(pid) and cmdline(pid).startswith(SHARD_TITLE)}


class LoggedProcess:
    """A command in a session of its own, its output (stdout and stderr) appended to ``log_path``.

    ``wait_ready`` returns the first output line containing ``ready`` (the process is up), or raises
    RuntimeError with the end of its output if it exits first or does not get there in time."""

    def __init__(self, command: list[str], log_path: str, env: dict | None = None, cwd: str | None = None):
        self.command = command
        self.log_path = log_path
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._log = open(log_path, "a", buffering=1)  # noqa: SIM115 - closed by the pump when the output ends
        self._log.write(f"$ {' '.join(command)}\n")
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=env, cwd=cwd, start_new_session=True)
        self.pid = self.session = self.process.pid
        self._ended = False
        threading.Thread(target=self._pump, daemon=True, name=f"pump-{self.pid}").start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            self._log.write(line)
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()
        self._log.close()

    def wait_ready(self, ready: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if ready in line:
                        return line.strip()
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self._ended or left <= 0:
                    tail = "".join(self.lines[-30:])
                    why = "exited" if self._ended else f"did not print {ready!r} within {timeout_s:.0f} s"
                    raise RuntimeError(f"{' '.join(self.command[:4])}... {why}; its output ({self.log_path}):\n{tail}")
                self._changed.wait(min(left, 1.0))

    def poll(self) -> int | None:
        return self.process.poll()

    def reap(self, timeout_s: float = 10.0) -> None:
        """Waits for the leader after its session was killed (no zombie left behind)."""
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
