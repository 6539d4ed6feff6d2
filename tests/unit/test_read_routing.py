"""Which read endpoint a client sends its memory layer's calls to (model_client/read_routing.py): asked
once and kept; after a failure, or when the server names none, the front end for ENDPOINT_RETRY_S;
one question however many threads ask at once."""

from __future__ import annotations

import threading

import pytest
from monim.model_client import read_routing
from monim.model_client.read_routing import ENDPOINT_RETRY_S, ReadRouting
from monim.protos.errors import Unavailable


class Server:
    def __init__(self, targets):
        self.targets, self.asked = list(targets), 0
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            self.asked += 1
        if isinstance(self.targets, Exception):
            raise self.targets
        return list(self.targets)


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(read_routing.time, "monotonic", lambda: now[0])
    return now


def test_asked_once_and_kept_then_the_front_end_after_a_failure_until_the_wait_is_over(clock):
    server = Server(["a:1", "b:2"])
    routing = ReadRouting(server)
    first = routing.target()
    assert first in ("a:1", "b:2") and routing.target() == first and server.asked == 1
    routing.failed("elsewhere:3")  # not the one in use: nothing changes
    assert routing.target() == first
    routing.failed(first)
    clock[0] += ENDPOINT_RETRY_S - 1
    assert routing.target() is None and server.asked == 1
    clock[0] += 1
    assert routing.target() in ("a:1", "b:2") and server.asked == 2


def test_a_server_that_names_none_or_fails_to_answer_is_asked_again_after_the_wait(clock):
    server = Server([])
    routing = ReadRouting(server)
    assert routing.target() is None and routing.target() is None and server.asked == 1
    server.targets = Unavailable("the front end is restarting")
    clock[0] += ENDPOINT_RETRY_S
    assert routing.target() is None and server.asked == 2  # an error reads as "none"
    server.targets = ["a:1"]
    clock[0] += ENDPOINT_RETRY_S
    assert routing.target() == "a:1" and server.asked == 3


def test_off_it_never_asks_and_routes_nothing():
    server = Server(["a:1"])
    routing = ReadRouting(server, enabled=False)
    assert routing.target() is None and server.asked == 0
    assert not routing.routes("Search")
    on = ReadRouting(server)
    assert all(on.routes(method) for method in ("Search", "Retrieve", "RetrieveBackward", "CommitStep", "AbortStep",
                                                "Add", "ApplyGradients"))
    assert not any(on.routes(method) for method in ("Get", "Delete", "DropNamespace", "CreateNamespace", "Snapshot"))


def test_threads_asking_at_once_make_one_question():
    server = Server(["a:1", "b:2", "c:3"])
    routing = ReadRouting(server)
    start, seen = threading.Barrier(8), []

    def ask():
        start.wait(timeout=10)
        seen.append(routing.target())

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert server.asked == 1 and len(set(seen)) == 1 and len(seen) == 8
