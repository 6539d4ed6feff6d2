"""The namespace registry answers its reads (a namespace's config, the placement) from the state of
its last finished write, without waiting for a write in progress: a write waits for its fsync, and on
a slow disk a search whose front end must read a config (a cold cache, a new read endpoint's router)
waited as long (found by the reliability run's slowdisk fault, seed 97: a search answered in 6.03 s)."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from monim.datastore import NamespaceConfig
from monim.protos.errors import NamespaceNotFound
from monim.workers.registry import NamespaceRegistry
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime

SLOW_S = 1.5


@pytest.fixture
def slow_fsync(monkeypatch):
    """os.fsync sleeps SLOW_S in the threads that set ``slow``; ``inside`` is set while one sleeps."""
    real, local = os.fsync, threading.local()
    inside = threading.Event()

    def fsync(fd):
        if getattr(local, "slow", False):
            inside.set()
            time.sleep(SLOW_S)
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return local, inside


def _in_a_thread(local, work):
    def run():
        local.slow = True
        work()
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_reads_are_answered_while_an_add_waits_for_its_plan_on_a_slow_disk(tmp_path, slow_fsync):
    local, inside = slow_fsync
    runtime = LocalRuntime(1, data_dir=str(tmp_path), fsync="never")
    try:
        router = Router(runtime)
        router.create_namespace(NamespaceConfig("ns", dim=4))
        router.add("ns", np.ones((3, 4), np.float32), np.arange(3), request_id="first")
        writer = _in_a_thread(local, lambda: router.add("ns", np.ones((2, 4), np.float32), np.arange(2),
                                                        request_id="second"))
        assert inside.wait(5)
        started = time.monotonic()
        assert runtime.call_registry("config", "ns")["name"] == "ns"
        assert runtime.call_registry("get_placement")["version"] >= 0
        assert [c["name"] for c in runtime.call_registry("list")] == ["ns"]
        assert runtime.call_registry("next_id", "ns") == 3  # the Add in progress is not answered yet
        cold = Router(runtime)  # a new read endpoint's router: the placement, then the config
        assert cold.search("ns", np.ones((1, 4), np.float32), 1).ids.shape == (1, 1)
        waited = time.monotonic() - started
        writer.join(10)
        assert waited < SLOW_S / 3, f"reads waited {waited:.2f} s for a write's fsync"
        assert runtime.call_registry("next_id", "ns") == 5  # once it is answered, reads see it
    finally:
        runtime.shutdown()


def test_a_namespace_being_created_is_not_seen_before_its_create_is_answered(tmp_path, slow_fsync):
    """A read answers the state of the last finished write: a create still writing its registry file
    is not there yet (NOT_FOUND), and is, with its generation, once the create returned."""
    local, inside = slow_fsync
    registry = NamespaceRegistry(1, str(tmp_path))
    try:
        created = {}
        writer = _in_a_thread(local, lambda: created.update(registry.call("create", NamespaceConfig("ns", dim=4).to_dict())))
        assert inside.wait(5)
        with pytest.raises(NamespaceNotFound):
            registry.call("config", "ns")
        writer.join(10)
        assert registry.call("config", "ns")["generation"] == created["generation"]
    finally:
        registry.close()
