"""The health watch's probe (workers/frontend.py ShardProbe) on in-process shards: a shard that is busy
is not a shard that is down.

A long write or a large search holds a shard's lock for seconds (an Add of 65,536 x 768 rows with
values on a CPU shard, a B=4096, k=1024 search); health used to ask each shard for its metrics under
that lock, so a busy shard read as "unavailable" and the server answered NOT_SERVING to load
balancers and readiness probes for as long as the load lasted (seen in `monim serve`'s log:
"health: NOT_SERVING (shard states: 0: unavailable)" flipping during a bulk load).
"""

from __future__ import annotations

import threading
import time

import numpy as np
from monim.datastore import NamespaceConfig
from monim.workers.frontend import ShardProbe
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime


def test_a_shard_busy_under_its_lock_still_reads_as_serving_with_its_metrics():
    runtime = LocalRuntime(1)
    router = Router(runtime)
    router.create_namespace(NamespaceConfig("ns", dim=4))
    router.add("ns", np.ones((3, 4), np.float32), np.zeros(3, np.int64))
    probe = ShardProbe(router, wait_s=0.3)
    held, release = threading.Event(), threading.Event()

    def long_write():  # what a long Add or search does: the shard's lock, held for a while
        with runtime.shards[0]._lock:
            held.set()
            release.wait(10)

    writer = threading.Thread(target=long_write)
    writer.start()
    try:
        assert held.wait(5)
        started = time.monotonic()
        [shard] = probe.poll()
        assert time.monotonic() - started < 2.0
        assert shard["state"] == "serving", shard
        assert shard["namespaces"]["ns"]["rows"] == 3
    finally:
        release.set()
        writer.join()
        probe.close()


def test_a_shard_that_does_not_answer_still_reads_as_unavailable():
    runtime = LocalRuntime(1)
    router = Router(runtime)
    probe = ShardProbe(router, wait_s=0.3)
    stuck = threading.Event()
    runtime.shards[0].metrics = lambda: stuck.wait(10)  # a process that takes calls but never answers
    try:
        [shard] = probe.poll()
        assert shard == {"shard": 0, "state": "unavailable"}
    finally:
        stuck.set()
        probe.close()


def test_the_health_watch_ends_quietly_once_its_probe_can_take_no_more_work(caplog):
    """Seen at the exit of a process that never stopped its server: Python shuts every thread pool
    down, and the watch logged "could not poll the shards" with a traceback every poll until the
    process was gone. A probe that can no longer ask the shards ends the watch, without a word."""
    from monim.workers.frontend import Frontend

    runtime = LocalRuntime(1)
    frontend = Frontend(Router(runtime), health_poll_s=0.02)
    frontend.attach(server=None)
    try:
        time.sleep(0.1)
        frontend.probe.close()  # what the interpreter's exit does to every pool
        frontend._watch.join(timeout=5)
        assert not frontend._watch.is_alive()
        assert "could not poll" not in caplog.text
    finally:
        frontend.close()
        runtime.shutdown()


def test_a_stopped_front_end_leaves_no_thread_of_its_own_running():
    """Seen as a SIGABRT ("terminate called without an active exception") at the exit of a process that
    stopped its server (bench/one_process_service.py, ~1 exit in 4): stop() set the health watch's stop
    flag but did not wait for it, so the watch, still in a poll, held the last reference to the
    router and its shards; Python's finalization then found that daemon thread freeing the shards'
    torch tensors and killed it mid-free. Once stop() returns, the watch has ended (here while a poll
    is in flight: a shard answers its metrics in 0.3 s)."""
    from monim.workers.frontend import Frontend

    runtime = LocalRuntime(1)
    shard = runtime.shards[0]
    answered = shard.metrics

    def slow_metrics():
        polled.set()
        time.sleep(0.3)
        return answered()

    polled = threading.Event()
    shard.metrics = slow_metrics
    frontend = Frontend(Router(runtime), health_poll_s=0.01)
    frontend.attach(server=None)
    try:
        assert polled.wait(5)
        frontend.stop(0)
        assert not frontend._watch.is_alive()
    finally:
        frontend.close()
        runtime.shutdown()
