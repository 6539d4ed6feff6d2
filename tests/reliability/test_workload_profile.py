"""The CI profile of the reliability workload (issue 15): two minutes of load from two client
processes on a served deployment (a Ray head and two front ends, 2 shards, a data dir), with a shard
worker killed, a shard worker stopped for longer than the call deadline, a slow disk (every fsync
delayed past half the deadline), a reshard 2 -> 1 -> 2 driven through the second front end while
the clients write through both and the shards' endpoints, the first front end killed and the whole
deployment killed and restarted on its data dir. Every answer is checked against the
clients' models as it comes, and the final state at the end: the run must exit 0, with no
acknowledged write lost, no wrong answer and every fault recovered.

The run is ``python -m reliability.run`` as a user starts it (``make reliability`` runs 10 minutes);
it cleans up every process it started, and ends by itself past its hard timeout.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
HARD_TIMEOUT_S = 330

pytestmark = pytest.mark.slow


def test_two_minutes_of_load_and_faults_lose_no_acknowledged_write():
    command = [sys.executable, "-m", "reliability.run", "--minutes", "2", "--clients", "2", "--seed", "15",
               "--faults", "shard,sigstop,slowdisk,reshard,frontend,server", "--hard-timeout-s", str(HARD_TIMEOUT_S)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=HARD_TIMEOUT_S + 60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    assert re.search(r"^acknowledged writes lost: 0 ", output, re.MULTILINE), output[-8000:]
    assert re.search(r"^wrong answers: 0$", output, re.MULTILINE), output[-8000:]
    for fault in ("shard", "sigstop", "slowdisk", "reshard", "frontend", "server"):
        assert re.search(rf"fault {fault} at \d+ s .*: recovered in [0-9.]+ s", output), f"no {fault} fault:\n{output}"
    stopped = re.search(r"fault sigstop .*a probe during the stop: (\w+)", output)
    assert stopped and stopped.group(1) == "DEADLINE_EXCEEDED", output[-8000:]
    slowed = re.search(r"fault slowdisk .*a search during the slow disk answered in ([0-9.]+) s", output)
    assert slowed and float(slowed.group(1)) < 5.0, output[-8000:]  # reads do not wait for the disk
    calls = int(re.search(r"│ all +│ ([0-9,]+)", output).group(1).replace(",", ""))
    assert calls > 1000, f"only {calls} calls answered"
