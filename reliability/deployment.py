"""The deployment under test: one Ray head and two front ends of one deployment, on 127.0.0.1.

    ray start --head --block --num-cpus 2 ...            # session 1: GCS, raylet, the actors' workers
    monim serve --ray-address auto --shards 2 ...        # session 2: front end 0 (creates the actors)
    monim serve --ray-address auto ...                   # session 3: front end 1 (joins them)

Both front ends name the same ``--deployment`` and ``--data-dir``; ``RAY_ADDRESS`` in their
environment names the head, so ``auto`` finds this Ray and no other on the machine. Ray is a head
of its own rather than the local Ray of the first ``monim serve`` because a front end that starts
its own Ray takes it down when it dies (Ray's processes share the fate of the process that started
them): killing that front end would kill every shard, and "a front end dies, the other serves on"
could not be tested. The head is started with its own ``--temp-dir``, so its address is not written
to /tmp/ray/ray_current_cluster, where any ``ray.init()`` on the machine would find it.

A front end keeps its gRPC port across restarts, so clients dial the same two addresses all along.
``processes.py`` finds and kills every process by session.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import uuid

from reliability.processes import LoggedProcess, free_port, kill_sessions, shard_workers

START_TIMEOUT_S = 240.0
SLOW_DISK_MODULE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slow_disk")
# Ray's object store: the shards pass arrays above 64 KiB through it; a small one leaves memory to the rest.
OBJECT_STORE_BYTES = 300 * 1024 * 1024
# A line of an actor's output as Ray forwards it ("\x1b[36m(Shard pid=123)\x1b[0m ..."), and an exception's last line.
_RAY_PREFIX = re.compile(r"^(\x1b\[[0-9;]*m)?\([^)]*pid=\d+[^)]*\)(\x1b\[[0-9;]*m)?\s?")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REPEATED = re.compile(r"\s*\[repeated \d+x across cluster\]")
_ERROR_LINE = re.compile(r"^[\w.]+(Error|Exception|Exit|Interrupt)\b")


@dataclasses.dataclass
class DeploymentConfig:
    """workdir: holds data/ (the data dir), ray/ (Ray's temp dir) and logs/."""

    workdir: str
    shards: int = 2
    num_cpus: int = 2
    fsync: str = "always"
    snapshot_every: int = 200
    grace_s: float = 5.0
    name: str = dataclasses.field(default_factory=lambda: f"rel-{uuid.uuid4().hex[:8]}")


def _environment(**extra) -> dict:
    """This process's environment without MONIM_* (monim serve reads its flags from those) and with extra."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("MONIM_")}
    env.update(PYTHONUNBUFFERED="1", RAY_DISABLE_USAGE_STATS="1", **extra)
    return env


class Deployment:
    """start(), kill_frontend(i) / start_frontend(i), kill_all() / start(), stop(), cleanup().

    on_sessions: called with the list of session ids whenever it changes (the reaper's file)."""

    def __init__(self, config: DeploymentConfig, on_sessions=None, log=print):
        self.config = config
        self.data_dir = os.path.join(config.workdir, "data")
        self.ray_temp_dir = os.path.join(config.workdir, "ray")
        self.log_dir = os.path.join(config.workdir, "logs")
        self.slow_disk_file = os.path.join(config.workdir, "slow-disk")  # seconds per fsync while it exists
        for folder in (self.data_dir, self.ray_temp_dir, self.log_dir):
            os.makedirs(folder, exist_ok=True)
        self.ports = [free_port(), free_port()]
        self.addresses = [f"127.0.0.1:{port}" for port in self.ports]
        self.ray: LoggedProcess | None = None
        self.ray_address = ""
        self.frontends: list[LoggedProcess | None] = [None, None]
        self._every_session: list[int] = []  # all ever started: a killed leader's children may linger
        self._starts = 0
        self._on_sessions = on_sessions or (lambda sessions: None)
        self._log = log

    # ----- starting ----------------------------------------------------------------------------
    def _started(self, process: LoggedProcess) -> LoggedProcess:
        self._every_session.append(process.session)
        self._on_sessions(list(self._every_session))
        return process

    def _log_path(self, name: str) -> str:
        self._starts += 1
        return os.path.join(self.log_dir, f"{self._starts:02d}-{name}.log")

    def start(self) -> None:
        """The Ray head, then front end 0 (which creates the actors, or finds them on the data dir),
        then front end 1."""
        self.start_ray()
        self.start_frontend(0)
        self.start_frontend(1)

    def start_ray(self) -> None:
        """The head, with reliability/slow_disk on its PYTHONPATH: its workers (the shards, the registry)
        delay each fsync by the seconds in slow_disk_file while it exists (the ``slowdisk`` fault)."""
        port = free_port()
        command = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block",
                   "--port", str(port), "--num-cpus", str(self.config.num_cpus), "--node-ip-address", "127.0.0.1",
                   "--temp-dir", self.ray_temp_dir, "--include-dashboard", "false",
                   "--ray-client-server-port", str(free_port()), "--object-store-memory", str(OBJECT_STORE_BYTES),
                   "--disable-usage-stats"]
        python_path = os.pathsep.join(filter(None, [SLOW_DISK_MODULE_DIR, os.environ.get("PYTHONPATH")]))
        env = _environment(PYTHONPATH=python_path, RELIABILITY_SLOW_DISK_FILE=self.slow_disk_file)
        self.ray = self._started(LoggedProcess(command, self._log_path("ray-head"), env=env, cwd=self.config.workdir))
        self.ray.wait_ready("Ray runtime started", START_TIMEOUT_S)
        self.ray_address = f"127.0.0.1:{port}"

    def start_frontend(self, index: int) -> str:
        """Starts front end ``index`` on its port; returns its 'serving' line."""
        c = self.config
        command = [sys.executable, "-m", "monim.workers.cli", "serve", "--host", "127.0.0.1",
                   "--port", str(self.ports[index]), "--ray-address", "auto", "--shards", str(c.shards),
                   "--deployment", c.name, "--data-dir", self.data_dir, "--fsync", c.fsync,
                   "--snapshot-every", str(c.snapshot_every), "--grace-s", str(c.grace_s)]
        process = self._started(LoggedProcess(command, self._log_path(f"frontend-{index}"),
                                              env=_environment(RAY_ADDRESS=self.ray_address), cwd=c.workdir))
        self.frontends[index] = process
        return process.wait_ready("serving", START_TIMEOUT_S)

    # ----- what runs -----------------------------------------------------------------------------
    def shard_workers(self) -> dict[int, int | None]:
        """pid -> shard index of the shard actors' worker processes (under the Ray head's session)."""
        return {} if self.ray is None else shard_workers(self.ray.session, self.data_dir)

    def sessions(self) -> list[int]:
        return list(self._every_session)

    # ----- faults ----------------------------------------------------------------------------------
    def kill_frontend(self, index: int) -> int:
        """SIGKILL of front end ``index`` (its session: the front end alone); returns processes killed."""
        process = self.frontends[index]
        killed = kill_sessions([process.session])
        process.reap()
        self.frontends[index] = None
        return killed

    def kill_all(self) -> int:
        """SIGKILL of every process of the deployment, Ray's too, at once."""
        killed = kill_sessions(self._every_session)
        for process in [self.ray, *self.frontends]:
            if process is not None:
                process.reap()
        self.ray, self.frontends = None, [None, None]
        return killed

    # ----- the end ---------------------------------------------------------------------------------
    def stop(self, timeout_s: float = 60.0) -> bool:
        """SIGTERM to the front ends (each drains and stops), then SIGKILL of the rest (Ray's head would
        wait 30 s for its detached actors to drain: nothing is lost, every acknowledged write is in the
        shards' logs). True if both front ends stopped on SIGTERM."""
        clean = True
        for process in self.frontends:
            if process is None or process.poll() is not None:
                continue
            process.process.terminate()
            try:
                process.process.wait(timeout=timeout_s)
            except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: killed below
                clean = False
        kill_sessions(self._every_session)
        for process in [self.ray, *self.frontends]:
            if process is not None:
                process.reap()
        self.ray, self.frontends = None, [None, None]
        return clean

    def server_errors(self) -> list[str]:
        """The errors the front ends' logs (which carry the shards' output) show with a traceback: the last
        line of each, without Ray's prefix."""
        errors = []
        for name in sorted(os.listdir(self.log_dir)):
            if "frontend" not in name:
                continue
            in_traceback = False
            with open(os.path.join(self.log_dir, name), errors="replace") as file:
                for line in file:
                    text = _REPEATED.sub("", _ANSI.sub("", _RAY_PREFIX.sub("", line))).rstrip()
                    if text.startswith("Traceback"):
                        in_traceback = True
                    elif in_traceback and _ERROR_LINE.match(text):
                        errors.append(text)
                        in_traceback = False
        return errors

    def cleanup(self) -> None:
        """SIGKILL of every process of every session this deployment ever started (idempotent)."""
        kill_sessions(self._every_session, timeout_s=10.0)
