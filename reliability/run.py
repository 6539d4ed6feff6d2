"""The reliability run: ``python -m reliability.run --minutes M [--clients N] [--seed S]
[--faults shard,sigstop,slowdisk,reshard,frontend,server] [--report docs/RELIABILITY.md]``.

Stages, in order:
1. start the deployment (reliability/deployment.py: a Ray head and two front ends of one
   deployment, 2 shards, a data dir in a temporary folder, a snapshot every --snapshot-every log
   records per shard), and a reaper that kills it if this process dies;
2. start N client processes (spawn; reliability/workload.py), each on namespaces of its own with an
   exact model, and wait until they have filled them;
3. for M minutes of workload, inject the faults on their schedule (reliability/faults.py), each
   waited for until the service answers again;
4. stop the clients (each finishes its call: a write is retried until it is acknowledged) and take
   their reports and models;
5. check the final state of every namespace against its model (reliability/verify.py);
6. stop the deployment, print the tables, write them to --report, and exit 0 only if no
   acknowledged write was lost, no answer was wrong, every fault recovered and every call was
   answered (1 otherwise; 3 past the hard timeout, 130 on Ctrl-C).

Only processes this run started are signalled: the deployment's, by session (reliability/processes.py),
and its own client processes. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import multiprocessing
import os
import queue
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time

import numpy as np

from reliability.deployment import Deployment, DeploymentConfig
from reliability.faults import FAULT_KINDS, FaultInjector, Prober, schedule
from reliability.reaper import start_reaper, write_sessions
from reliability.report import RunResult, machine, print_report, write_section
from reliability.verify import check_namespace
from reliability.workload import WRITE_DEADLINE_S, ClientPlan, client_main

READY_TIMEOUT_S = 300.0
HARD_TIMEOUT_EXIT = 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m reliability.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="minutes of workload (default 10)")
    parser.add_argument("--clients", type=int, default=3, help="client processes (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faults", default=",".join(FAULT_KINDS),
                        help=f"comma-separated, of {', '.join(FAULT_KINDS)}; 'none' for none (default: all)")
    parser.add_argument("--report", default=None, help="write the tables to this file's reliability section")
    parser.add_argument("--call-timeout-s", type=float, default=10.0, help="the clients' deadline per call")
    parser.add_argument("--stop-s", type=float, default=None,
                        help="how long a sigstop or a slow disk lasts (default: the call deadline + 5 s)")
    parser.add_argument("--slow-disk-s", type=float, default=None,
                        help="seconds each fsync sleeps during a slowdisk fault (default: 0.6 x the call deadline)")
    parser.add_argument("--snapshot-every", type=int, default=200, help="log records per shard between snapshots")
    parser.add_argument("--fsync", default="always", help="the deployment's --fsync (default always)")
    parser.add_argument("--hard-timeout-s", type=float, default=None,
                        help="the run ends by itself past this (default: the workload + 15 minutes)")
    parser.add_argument("--workdir", default=None, help="where the temporary folder goes (default: the system's)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (data dir, logs)")
    parser.add_argument("--indexed", action=argparse.BooleanOptionalAction, default=True,
                        help="the odd clients' keys namespaces are ivf_flat, searched with every list probed: exact "
                             "(default; --no-indexed: every namespace flat)")
    args = parser.parse_args(argv)
    args.faults = [] if args.faults in ("", "none") else [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = sorted(set(args.faults) - set(FAULT_KINDS))
    if unknown:
        parser.error(f"unknown faults {unknown}; choose from {', '.join(FAULT_KINDS)}")
    if args.clients < 1 or args.minutes <= 0:
        parser.error("--clients must be at least 1 and --minutes above 0")
    args.stop_s = args.stop_s if args.stop_s is not None else args.call_timeout_s + 5.0
    args.hard_timeout_s = args.hard_timeout_s or args.minutes * 60 + 900
    return args


class Run:
    """One run; ``execute()`` returns the RunResult (its stages: the module docstring)."""

    def __init__(self, args: argparse.Namespace, command: str):
        self.args = args
        self.command = command
        self.started = time.monotonic()
        self.started_utc = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        self.deadline = time.time() + args.hard_timeout_s
        self.workdir = tempfile.mkdtemp(prefix="monim-rel-", dir=args.workdir)
        self.sessions_file = os.path.join(self.workdir, "sessions.json")
        write_sessions(self.sessions_file, [])
        self.deployment: Deployment | None = None
        self.injector: FaultInjector | None = None
        self.clients: list = []
        self.stop = None
        self.reports: dict[int, object] = {}
        self.failures: list[str] = []
        self.faults: list = []
        self.server_errors: list[str] = []
        self.workload_s = 0.0
        self.workload_began = time.time()

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f} s] {message}", file=sys.stderr, flush=True)

    # ----- stages ----------------------------------------------------------------------------------
    def _start_deployment(self) -> None:
        config = DeploymentConfig(self.workdir, fsync=self.args.fsync, snapshot_every=self.args.snapshot_every)
        self.deployment = Deployment(config, on_sessions=lambda s: write_sessions(self.sessions_file, s), log=self.log)
        self.log(f"starting the deployment {config.name} (Ray head, front ends on {', '.join(self.deployment.addresses)}; "
                 f"data dir {self.deployment.data_dir})")
        self.deployment.start()
        self.log("deployment serving")

    def _start_clients(self, messages) -> list[ClientPlan]:
        context = multiprocessing.get_context("spawn")
        self.stop = context.Event()
        plans = [ClientPlan(i, list(self.deployment.addresses), self.args.seed, self.args.call_timeout_s,
                            os.path.join(self.deployment.log_dir, f"client-{i}.log"), end_by=self.deadline - 120,
                            indexed=self.args.indexed)
                 for i in range(self.args.clients)]
        for plan in plans:
            process = context.Process(target=client_main, args=(plan, self.stop, messages), name=f"client-{plan.index}",
                                      daemon=True)
            process.start()
            self.clients.append(process)
        ready: set[int] = set()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while len(ready) < len(plans):
            try:
                kind, payload = messages.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"clients {sorted(set(range(len(plans))) - ready)} not ready within "
                                   f"{READY_TIMEOUT_S:.0f} s") from None
            if kind == "ready":
                ready.add(payload)
            else:
                self._take_report(payload)
                raise RuntimeError(f"client {payload.index} stopped before it was ready:\n{payload.crash}")
        self.log(f"{len(plans)} clients ready")
        return plans

    def _take_report(self, report) -> None:
        self.reports[report.index] = report
        if report.crash:
            self.failures.append(f"client {report.index} crashed: {report.crash.strip().splitlines()[-1]}")
            self.log(f"client {report.index} crashed:\n{report.crash}")

    def _run_workload(self, plans: list[ClientPlan], messages) -> None:
        dims = {spec.name: spec.dim for plan in plans for spec in plan.namespaces()}
        prober = Prober(list(self.deployment.addresses), dims, self.args.call_timeout_s)
        self.injector = FaultInjector(self.deployment, prober, np.random.default_rng([self.args.seed, 15]),
                                      self.args.stop_s, self.args.call_timeout_s, log=self.log,
                                      slow_disk_s=self.args.slow_disk_s)
        self.workload_s = self.args.minutes * 60
        planned = schedule(self.args.faults, self.workload_s)
        self.log(f"workload for {self.workload_s:.0f} s; faults at {[(round(t), kind) for t, kind in planned]}")
        began = time.monotonic()
        self.workload_began = time.time()
        while not self.failures:
            elapsed = time.monotonic() - began
            try:
                kind, payload = messages.get_nowait()
                if kind == "report":
                    self._take_report(payload)
                    if not payload.crash:
                        self.failures.append(f"client {payload.index} stopped before the end of the workload")
                continue
            except queue.Empty:
                pass
            if planned and elapsed >= planned[0][0]:
                _, kind = planned.pop(0)
                self.faults.append(self.injector.inject(kind, elapsed))
            elif not planned and elapsed >= self.workload_s:
                break
            else:
                time.sleep(min(1.0, max(0.05, (planned[0][0] if planned else self.workload_s) - elapsed)))
        self.workload_s = time.monotonic() - began

    def _stop_clients(self, messages) -> None:
        self.stop.set()
        self.log("stopping the clients (each finishes its call)")
        deadline = time.monotonic() + WRITE_DEADLINE_S + 120
        while len(self.reports) < len(self.clients) and time.monotonic() < deadline:
            try:
                _, payload = messages.get(timeout=1.0)
                self._take_report(payload)
            except queue.Empty:
                continue
        for index in sorted(set(range(len(self.clients))) - set(self.reports)):
            self.failures.append(f"client {index} sent no report (hung?)")
        for process in self.clients:
            process.join(timeout=30)

    def _check(self) -> list:
        from monim.model_client import MemoryClient

        checks = []
        self.log("checking the final state against the clients' models")
        with MemoryClient(self.deployment.addresses[0], timeout_s=120, retries=5) as client:
            for report in sorted(self.reports.values(), key=lambda r: r.index):
                for name, expected in report.expected.items():
                    checks.append(check_namespace(client, name, expected))
                for name in report.in_doubt:
                    self.failures.append(f"namespace {name} not checked: a write to it was never acknowledged")
        return checks

    def execute(self) -> RunResult:
        messages = multiprocessing.get_context("spawn").Queue()
        checks = []
        try:
            self._start_deployment()
            plans = self._start_clients(messages)
            self._run_workload(plans, messages)
            self._stop_clients(messages)
            checks = self._check()
            self.log("stopping the deployment")
            if not self.deployment.stop():
                self.log("the deployment did not stop on SIGTERM alone (killed)")
        except Exception as error:  # noqa: BLE001 - the run fails with it, after the clean-up
            self.failures.append(f"{type(error).__name__}: {error}")
            self.log(f"the run failed: {type(error).__name__}: {error}")
        finally:
            self.cleanup()
            if self.deployment is not None:
                self.server_errors = self.deployment.server_errors()
        return self._result(checks)

    def _result(self, checks: list) -> RunResult:
        total = collections.defaultdict(collections.Counter)
        wrong, details, unresolved, failovers = 0, [], [], 0
        for report in self.reports.values():
            for name in ("calls", "retried", "errors", "refusals"):
                total[name].update(getattr(report, name))
            wrong += report.wrong
            details += [(at, f"at {at - self.workload_began:.0f} s: {line}") for at, line in report.wrong_details]
            unresolved += report.unresolved
            failovers += report.failovers
        return RunResult(
            command=self.command, started=self.started_utc, workload_s=self.workload_s,
            elapsed_s=time.monotonic() - self.started, clients=self.args.clients, faults_enabled=self.args.faults,
            machine=machine(), calls=total["calls"], retried=total["retried"], errors=total["errors"],
            refusals=total["refusals"], failovers=failovers, faults=self.faults, checks=checks, wrong=wrong,
            wrong_details=[line for _, line in sorted(details)], unresolved=unresolved, failures=self.failures,
            server_errors=self.server_errors)

    def cleanup(self) -> None:
        """Idempotent: continues stopped workers, ends the clients, kills every server session."""
        if self.injector is not None:
            self.injector.release()
        if self.stop is not None:
            self.stop.set()
        for process in self.clients:
            if process.is_alive():
                process.join(timeout=5)
            if process.is_alive():
                process.kill()
        if self.deployment is not None:
            self.deployment.cleanup()

    def remove_workdir(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def _interrupted(signum, frame):
    raise KeyboardInterrupt  # SIGTERM ends the run as Ctrl-C does: cleaned up


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m reliability.run " + shlex.join(sys.argv[1:] if argv is None else argv)
    run = Run(args, command)
    reaper = start_reaper(run.sessions_file, run.deadline + 30)

    def past_deadline():
        run.log(f"hard timeout ({args.hard_timeout_s:.0f} s): killing everything this run started")
        run.cleanup()
        os._exit(HARD_TIMEOUT_EXIT)

    watchdog = threading.Timer(args.hard_timeout_s, past_deadline)
    watchdog.daemon = True
    watchdog.start()
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        result = run.execute()
    except KeyboardInterrupt:
        run.log("interrupted: cleaning up")
        run.cleanup()
        return 130
    finally:
        watchdog.cancel()
        reaper.terminate()
        reaper.wait(timeout=10)
    print_report(result)
    if args.report:
        write_section(args.report, result)
    if result.passed and not args.keep:
        run.remove_workdir()
    else:
        run.log(f"data dir and logs kept in {run.workdir}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
