"""Faults during the workload, on a schedule, and how long the service takes to answer again.

- ``shard``: SIGKILL of one shard actor's worker process (``ray::Shard`` under the Ray head's
  session); Ray restarts the actor, which recovers from its snapshot and log.
- ``frontend``: SIGKILL of front end 0; clients fail over to front end 1; front end 0 is started
  again once the service answers (clients come back to it after a while).
- ``server``: SIGKILL of every process of the deployment at once (the Ray head's session, Ray's
  actors with it, and both front ends); then the Ray head and both front ends start again on the
  same data dir and ports.
- ``reshard``: the deployment moves to one shard fewer (one more when it has one) and back, through
  front end 1 (``MemoryClient.reshard``, small batches), while the clients go on reading and writing
  through both front ends and the shards' endpoints: routers other than the driver's. A search is
  probed between the two moves. Recovery: the time both moves took.
- ``sigstop``: SIGSTOP of one shard worker for longer than the clients' call deadline (a probe made
  meanwhile must end in DEADLINE_EXCEEDED), then SIGCONT.
- ``slowdisk``: every fsync of the deployment's Ray workers (shards, registry) sleeps first, for as
  long as a sigstop lasts: ``slow_disk_s`` per fsync (by default 0.6 of the call deadline, so a write
  that waits for two syncs passes its deadline and is retried, maybe after it was applied: the retry
  must apply it once). Searches must go on being answered meanwhile (a probe during the slow disk
  is timed). Injected from outside monim's code: reliability/slow_disk/sitecustomize.py.

Recovery time: from the kill (for sigstop: from the SIGCONT; for slowdisk: from the disk's return
to speed) until a probe, a Search of every namespace through either front end, is answered. A
fault not recovered within RECOVERY_LIMIT_S is reported unrecovered, and the run fails.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time

import numpy as np

from reliability.processes import signal_pid

FAULT_KINDS = ("shard", "sigstop", "slowdisk", "reshard", "frontend", "server")  # the order of each round: the longest last
RECOVERY_LIMIT_S = 240.0
WARMUP_S = 15.0      # workload before the first fault
TAIL_S = 20.0        # workload after the last one is due
SPACING_S = 60.0     # a round's faults at least this far apart, if the run allows more than one round
PROBE_EVERY_S = 0.5
RESHARD_BATCH_ROWS = 1024  # ids per step of the reshard fault: many freezes, copies and flips under load


@dataclasses.dataclass
class FaultRecord:
    kind: str
    at_s: float            # since the workload started
    target: str
    recovered: bool = False
    recovery_s: float | None = None
    note: str = ""


def schedule(kinds: list[str], workload_s: float) -> list[tuple[float, str]]:
    """(seconds into the workload, kind): every kind at least once, in rounds of FAULT_KINDS order,
    evenly spread between WARMUP_S and workload_s - TAIL_S."""
    ordered = [kind for kind in FAULT_KINDS if kind in kinds]
    if not ordered:
        return []
    span = max(0.0, workload_s - WARMUP_S - TAIL_S)
    rounds = max(1, math.floor(span / (len(ordered) * SPACING_S)))
    count = rounds * len(ordered)
    return [(WARMUP_S + i * span / count, ordered[i % len(ordered)]) for i in range(count)]


class Prober:
    """A Search (k=1) of every namespace, each through front end 0 or, if that fails, front end 1.
    Each probe dials anew: a channel that failed waits out gRPC's reconnect backoff (up to minutes),
    which would be measured instead of the service's recovery."""

    def __init__(self, addresses: list[str], dims: dict[str, int], timeout_s: float):
        self.addresses = addresses
        self.dims = dims
        self.timeout_s = timeout_s

    def search(self, address: str, name: str) -> None:
        from monim.model_client import MemoryClient

        with MemoryClient(address, timeout_s=self.timeout_s, retries=0) as client:
            client.search(name, np.zeros((1, self.dims[name]), np.float32), 1)

    def once(self) -> str | None:
        """None when every namespace answered; else what the last front end tried said."""
        from monim.protos.errors import MemoryStoreError

        for name in self.dims:
            for address in self.addresses:
                try:
                    self.search(address, name)
                    break
                except MemoryStoreError as error:
                    why = f"{name}: {getattr(error, 'status_code', error.code)} {error.message[:160]}"
            else:
                return why
        return None

    def until_answered(self, since: float, limit_s: float = RECOVERY_LIMIT_S) -> tuple[bool, float, str]:
        """(answered, seconds since ``since`` (a time.monotonic()), the last failure)."""
        why = ""
        while time.monotonic() - since < limit_s:
            why = self.once()
            if why is None:
                return True, time.monotonic() - since, ""
            time.sleep(PROBE_EVERY_S)
        return False, time.monotonic() - since, why or ""


class FaultInjector:
    """deployment: reliability.deployment.Deployment; stop_s: how long a sigstop lasts."""

    def __init__(self, deployment, prober: Prober, rng: np.random.Generator, stop_s: float, call_timeout_s: float,
                 log=print, slow_disk_s: float | None = None):
        self.deployment = deployment
        self.prober = prober
        self.rng = rng
        self.stop_s = stop_s
        self.call_timeout_s = call_timeout_s
        self.slow_disk_s = slow_disk_s if slow_disk_s is not None else 0.6 * call_timeout_s
        self.log = log
        self.stopped: set[int] = set()  # pids SIGSTOPped and not yet continued (continued on cleanup)

    def inject(self, kind: str, at_s: float) -> FaultRecord:
        record = FaultRecord(kind, at_s, "")
        getattr(self, f"_{kind}")(record)
        state = f"recovered in {record.recovery_s:.1f} s" if record.recovered else "NOT RECOVERED"
        self.log(f"fault {kind} at {at_s:.0f} s ({record.target}): {state}{'; ' + record.note if record.note else ''}")
        return record

    def _worker(self, record: FaultRecord) -> int:
        workers = self.deployment.shard_workers()
        if not workers:
            raise RuntimeError("no ray::Shard worker process found under the Ray head's session")
        pid = int(self.rng.choice(sorted(workers)))
        shard = workers[pid]
        record.target = f"shard {'?' if shard is None else shard} worker, pid {pid}"
        return pid

    def _recovered(self, record: FaultRecord, since: float) -> None:
        record.recovered, record.recovery_s, why = self.prober.until_answered(since)
        if not record.recovered:
            record.note = (record.note + "; " if record.note else "") + f"still failing: {why}"

    def _shard(self, record: FaultRecord) -> None:
        pid = self._worker(record)
        since = time.monotonic()
        signal_pid(pid, signal.SIGKILL)
        self._recovered(record, since)
        after = sorted(self.deployment.shard_workers())
        record.note = f"shard workers now: pids {after}"

    def _frontend(self, record: FaultRecord) -> None:
        process = self.deployment.frontends[0]
        record.target = f"front end 0 ({self.deployment.addresses[0]}), pid {process.pid}"
        since = time.monotonic()
        self.deployment.kill_frontend(0)
        self._recovered(record, since)
        started = time.monotonic()
        self.deployment.start_frontend(0)
        record.note = f"front end 0 serving again {time.monotonic() - started:.1f} s after its restart"

    def _server(self, record: FaultRecord) -> None:
        record.target = f"every process of the deployment ({len(self.deployment.sessions())} sessions)"
        since = time.monotonic()
        killed = self.deployment.kill_all()
        record.target = f"{killed} processes: Ray head, shards, registry, both front ends"
        self.deployment.start()
        restarted = time.monotonic() - since
        self._recovered(record, since)
        record.note = f"Ray head and both front ends serving again {restarted:.1f} s after the kill"

    def _reshard(self, record: FaultRecord) -> None:
        from monim.model_client import MemoryClient
        from monim.protos.errors import MemoryStoreError

        count = self.deployment.config.shards
        there = count - 1 if count > 1 else count + 1
        record.target = f"{count} -> {there} -> {count} shards, driven through front end 1"
        since = time.monotonic()
        notes = []
        try:
            with MemoryClient(self.deployment.addresses[1], timeout_s=self.call_timeout_s, retries=0) as admin:
                for target in (there, count):
                    started = time.monotonic()
                    moved = 0
                    for progress in admin.reshard(target, RESHARD_BATCH_ROWS, timeout_s=RECOVERY_LIMIT_S):
                        moved = progress["rows_moved"]
                    notes.append(f"to {target}: {moved:,} rows moved in {time.monotonic() - started:.1f} s")
                    if target == there:
                        why = self.prober.once()
                        notes.append("a probe between the moves was answered" if why is None
                                     else f"a probe between the moves: {why}")
        except MemoryStoreError as error:
            record.note = "; ".join(notes + [f"the reshard failed: {getattr(error, 'status_code', error.code)} "
                                             f"{error.message[:200]}"])
            return
        self._recovered(record, since)
        record.note = "; ".join(notes + ([record.note] if record.note else []))

    def _sigstop(self, record: FaultRecord) -> None:
        from monim.protos.errors import MemoryStoreError

        pid = self._worker(record)
        stopped_at = time.monotonic()
        signal_pid(pid, signal.SIGSTOP)
        self.stopped.add(pid)
        try:
            self.prober.search(self.deployment.addresses[1], next(iter(self.prober.dims)))
            during = "a probe during the stop was answered"
        except MemoryStoreError as error:
            during = (f"a probe during the stop: {getattr(error, 'status_code', error.code)} after "
                      f"{time.monotonic() - stopped_at:.1f} s")
        time.sleep(max(0.0, self.stop_s - (time.monotonic() - stopped_at)))
        since = time.monotonic()
        signal_pid(pid, signal.SIGCONT)
        self.stopped.discard(pid)
        record.target += f", stopped {since - stopped_at:.0f} s"
        self._recovered(record, since)
        record.note = during

    def _slowdisk(self, record: FaultRecord) -> None:
        from monim.protos.errors import MemoryStoreError

        control = self.deployment.slow_disk_file
        record.target = f"every fsync of the shards and the registry {self.slow_disk_s:.1f} s slower"
        slowed_at = time.monotonic()
        with open(control + ".tmp", "w") as file:
            file.write(f"{self.slow_disk_s}\n")
        os.replace(control + ".tmp", control)
        time.sleep(min(self.slow_disk_s, self.stop_s / 2))  # writes now wait for slow syncs
        probe_started = time.monotonic()
        try:
            self.prober.search(self.deployment.addresses[1], next(iter(self.prober.dims)))
            during = f"a search during the slow disk answered in {time.monotonic() - probe_started:.2f} s"
        except MemoryStoreError as error:
            during = (f"a search during the slow disk: {getattr(error, 'status_code', error.code)} after "
                      f"{time.monotonic() - probe_started:.1f} s")
        time.sleep(max(0.0, self.stop_s - (time.monotonic() - slowed_at)))
        self.release()
        since = time.monotonic()
        record.target += f" for {since - slowed_at:.0f} s"
        self._recovered(record, since)
        record.note = during

    def release(self) -> None:
        """SIGCONT to any worker still stopped, the disk back to speed (a run that ends in the middle of
        a sigstop or a slow disk)."""
        for pid in list(self.stopped):
            signal_pid(pid, signal.SIGCONT)
        self.stopped.clear()
        try:
            os.remove(self.deployment.slow_disk_file)
        except FileNotFoundError:
            pass
