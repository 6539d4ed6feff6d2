"""A shard's own read endpoint: what a model's memory layer calls every step, served in the shard's process.

A call through the front end costs a gRPC round trip to the front end and a Ray actor call from
there to each shard (about half of a 5.4 ms decoding step on an H200 host, docs/BENCHMARKS.md),
and a large request or answer one more copy, through Ray's object store. An endpoint serves the
calls a MoNIM layer makes every step: ``Search``, ``Retrieve`` and the ``Decode`` stream, the
training step's ``RetrieveBackward`` with its ``CommitStep`` / ``AbortStep`` (a forward kept with
``keep_state`` lives in the router that made it: the backward goes where the forward went), and the
layer's writes, ``Add`` (the hard tokens it memorizes) and ``ApplyGradients`` (a step's value
gradients, in parts when large). The name says "read" for what it started as. Every write is as
safe here as on the front end: the router is the same, and what it relies on lives in the registry
and the shards, not in a router (ids and request ids are planned by the registry, a step's parts are
staged on the shards, and a shard refuses a call routed with an old placement). It runs
them in a shard actor's process, through the same servicer and a router of its own, whose runtime
calls the shard it runs in directly and the other shards as the front end does
(workers/runtime.py, ``ShardSideRuntime``): a call on a one-shard namespace crosses no process
boundary on the server, and on more shards the endpoint's own shard answers its part with no hop.
The front end's ``ReadEndpoints`` call starts the endpoints that are not up yet (the first time, or
after a shard restarted) and names them; ``MemoryClient`` sends those calls to one and goes back to
the front end when it cannot (model_client/read_routing.py).

An endpoint takes the front end's tokens and TLS: every call and step is authorized as on the front
end. It serves those methods (others: UNIMPLEMENTED) and the standard health service. It binds the
front end's host when that is a loopback address (one machine: nothing else may reach it), else the
address of the node its shard runs on (so clients reach it where Ray placed the shard). The first
front end to start a shard's endpoint sets its options; it lives until the shard closes (a reshard
that shrinks retires it) or its process ends. A closing shard's endpoint refuses new calls
(UNAVAILABLE: the client sends them to the front end), waits up to ``STOP_GRACE_S`` for those in
flight, then stops; a call it cancels then reaches its client as CANCELLED, which the client takes
for UNAVAILABLE (model_client/errors.py) and sends to the front end, a write with its request id.
Its calls are counted by the front end's metrics as the shard's
(``monim_read_endpoint_calls_total``), not in ``monim_requests_total``, and so are the forwards its
router keeps (``monim_read_endpoint_forward_states``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import ipaddress
import logging
import threading
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from monim.protos import heap
from monim.workers.auth import AuthInterceptor, AuthPolicy
from monim.workers.decoding import add_memory_service
from monim.workers.forwards import DROP_REASONS
from monim.workers.frontend import SERVICE_NAME, CallGate
from monim.workers.host_socket import serve_host_socket
from monim.workers.tls import ServerTls

# Threads of an endpoint's server: an open Decode stream holds one, a call one while it runs.
ENDPOINT_THREADS = 16
# What a model's MoNIM layer calls every step: its reads, the backward of its own forwards (their
# states are kept by the router that made them: this endpoint's, for a Retrieve sent here), and its
# writes (the hard tokens it memorizes, a step's value gradients).
ENDPOINT_METHODS = frozenset({"Search", "Retrieve", "SearchParts", "RetrieveParts", "Decode", "RetrieveBackward",
                              "CommitStep", "AbortStep", "Add", "ApplyGradients", "ProbeSharedMemory"})
# How long a closing shard's endpoint waits for the calls in flight on it (a memory layer's steps:
# milliseconds each) before it stops and cancels what is left. It holds up the reshard that retires
# the shard by as much at most.
STOP_GRACE_S = 5.0
# Set on a Shard object once its endpoint runs; one lock for every shard of a process.
ENDPOINT_ATTRIBUTE = "read_endpoint"
_starting = threading.Lock()
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EndpointOptions:
    """What a front end passes to its shards' endpoints. host: the front end's bind host (see the
    module docstring); auth, tls: the front end's (None: none); max_message_bytes: its limit."""

    host: str
    max_message_bytes: int
    auth: AuthPolicy | None = None
    tls: ServerTls | None = None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ReadEndpoint:
    """A gRPC server on ``host`` (a free port) serving ENDPOINT_METHODS through ``router``; ``target`` is
    what clients dial. stop() ends it."""

    def __init__(self, router, host: str, options: EndpointOptions, known=lambda namespace: False):
        """known(namespace): whether it exists (its calls are counted under its name, others under
        "unknown", as the front end's metrics do)."""
        from monim.workers.metrics import UNKNOWN_NAMESPACE, RecentCalls
        from monim.workers.server import message_size_options
        from monim.workers.servicer import MemoryServicer

        heap.keep_freed_memory()  # the shard's process: its messages' buffers reuse their pages (protos/heap.py)
        self.router = router
        self.recent = RecentCalls()  # per namespace: monim_read_endpoint_namespace_requests_per_second
        self._known, self._unknown = known, UNKNOWN_NAMESPACE
        self.gate = CallGate(options.auth, observer=self._count, max_streams=ENDPOINT_THREADS // 2)
        self._calls: dict[tuple[str, str], int] = {}  # calls and steps answered, by (method, status code name)
        self._calls_lock = threading.Lock()
        interceptors = [self.gate] + ([AuthInterceptor(options.auth)] if options.auth is not None else [])
        self.server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=ENDPOINT_THREADS, thread_name_prefix="monim-read"),
            options=message_size_options(options.max_message_bytes), interceptors=interceptors)
        servicer = MemoryServicer(router, max_message_bytes=options.max_message_bytes)
        add_memory_service(servicer, self.server, methods=ENDPOINT_METHODS)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = f"{host}:0"
        port = self.server.add_secure_port(address, options.tls.credentials()) if options.tls is not None \
            else self.server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"a read endpoint cannot listen on {host}")
        self.server.start()
        self.host_socket = serve_host_socket(servicer, interceptors, ENDPOINT_METHODS)
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _count(self, method: str, request, code: grpc.StatusCode, seconds: float, token_name: str) -> None:
        with self._calls_lock:
            self._calls[(method, code.name)] = self._calls.get((method, code.name), 0) + 1
        namespace = getattr(request, "namespace", "")
        self.recent.observe(namespace if self._known(namespace) else self._unknown, seconds)

    def stats(self) -> dict:
        """For the front end's metrics (Shard.metrics): its target, the Decode streams open now, the
        calls (each Decode step one) answered so far, {(method, status code name): count}, the
        last minute's per namespace (RecentCalls.window_counts), its router's kept forwards
        (states, bytes, dropped: {why: count}; workers/forwards.py), and its host socket's connections
        and refusals (workers/host_socket.py; None without one)."""
        with self._calls_lock:
            calls = dict(self._calls)
        forwards = self.router.forwards
        socket = self.host_socket
        return {"target": self.target, "streams": self.gate.streams, "calls": calls,
                "recent": {"span_s": self.recent.span_s(), "counts": self.recent.window_counts()},
                "forwards": {"states": len(forwards), "bytes": forwards.bytes,
                             "dropped": {why: forwards.counts[why] for why in DROP_REASONS}},
                "host_socket": None if socket is None else {"connections": socket.connections,
                                                            "refused": socket.refused}}

    def stop(self, grace_s: float = 0.0) -> None:
        """Refuses new calls and Decode steps (UNAVAILABLE), waits up to grace_s seconds for the calls
        in flight, then stops the server: calls still in flight and open Decode streams are cancelled."""
        self.health.enter_graceful_shutdown()
        self.gate.close()
        deadline = time.monotonic() + grace_s
        if not self.gate.wait_idle(lambda: deadline):
            log.warning("read endpoint %s: %d call(s) still in flight after %.1f s; cancelling them",
                        self.target, self.gate.in_flight, grace_s)
        self.server.stop(0).wait()
        if self.host_socket is not None:
            self.host_socket.stop()


def ensure_endpoint(shard, make_router, host: str, options: EndpointOptions) -> str:
    """The target of ``shard``'s endpoint, started first if it has none: make_router() -> the
    endpoint's Router; host: where it listens. Runs in the shard's process."""
    with _starting:
        endpoint = getattr(shard, ENDPOINT_ATTRIBUTE, None)
        if endpoint is None:
            endpoint = ReadEndpoint(make_router(), host, options,
                                    known=lambda namespace: namespace in getattr(shard, "stores", {}))
            setattr(shard, ENDPOINT_ATTRIBUTE, endpoint)
        return endpoint.target


def stop_endpoint(shard) -> None:
    """Stops the shard's endpoint, if it has one (the shard closes), after the calls in flight on it
    (up to STOP_GRACE_S)."""
    with _starting:
        endpoint = getattr(shard, ENDPOINT_ATTRIBUTE, None)
        if endpoint is not None:
            setattr(shard, ENDPOINT_ATTRIBUTE, None)
            endpoint.stop(STOP_GRACE_S)
