"""A shard's own decode endpoint: the Decode stream served inside the shard's process.

A decoding step through the front end costs a gRPC round trip to the front end and a Ray actor call
from there to each shard (about half of a 5.4 ms step on an H200 host, docs/BENCHMARKS.md). An
endpoint serves the same ``Decode`` stream in a shard actor's process, through the same servicer and
a router of its own, whose runtime calls the shard it runs in directly and the other shards as the
front end does (workers/runtime.py, ``ShardSideRuntime``): a step of a one-shard namespace crosses
no process boundary on the server, and on more shards the one a step lands on answers its part with
no hop. The front end's ``DecodeEndpoints`` call starts the endpoints that are not up yet (the first
time, or after a shard restarted) and names them; ``MemoryClient.decode()`` streams to one and goes
back to the front end when it cannot (model_client/decode.py).

An endpoint takes the front end's tokens and TLS: every step is authorized as on the front end.
It serves Decode alone (other methods: UNIMPLEMENTED) and the standard health service. It binds the
front end's host when that is a loopback address (one machine: nothing else may reach it), else the
address of the node its shard runs on (so clients reach it where Ray placed the shard). The first
front end to start a shard's endpoint sets its options; it lives until the shard closes or its
process ends.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import ipaddress
import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from monim.workers.auth import AuthInterceptor, AuthPolicy
from monim.workers.decoding import add_memory_service
from monim.workers.frontend import SERVICE_NAME, CallGate
from monim.workers.tls import ServerTls

# Threads of an endpoint's server: an open Decode stream holds one.
ENDPOINT_THREADS = 16
DECODE_ONLY = frozenset({"Decode"})
# Set on a Shard object once its endpoint runs; one lock for every shard of a process.
ENDPOINT_ATTRIBUTE = "decode_endpoint"
_starting = threading.Lock()


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


class DecodeEndpoint:
    """A gRPC server on ``host`` (a free port) serving ``Decode`` through ``router``; ``target`` is
    what clients dial. stop() ends it (open streams are cancelled)."""

    def __init__(self, router, host: str, options: EndpointOptions):
        from monim.workers.server import message_size_options
        from monim.workers.servicer import MemoryServicer

        self.router = router
        self.gate = CallGate(options.auth, observer=self._count, max_streams=ENDPOINT_THREADS - 1)
        self._steps: dict[str, int] = {}  # steps answered, by status code name
        self._steps_lock = threading.Lock()
        interceptors = [self.gate] + ([AuthInterceptor(options.auth)] if options.auth is not None else [])
        self.server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=ENDPOINT_THREADS, thread_name_prefix="monim-decode"),
            options=message_size_options(options.max_message_bytes), interceptors=interceptors)
        add_memory_service(MemoryServicer(router), self.server, methods=DECODE_ONLY)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = f"{host}:0"
        port = self.server.add_secure_port(address, options.tls.credentials()) if options.tls is not None \
            else self.server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"a decode endpoint cannot listen on {host}")
        self.server.start()
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self.target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _count(self, method, step, code: grpc.StatusCode, seconds: float, token_name: str) -> None:
        with self._steps_lock:
            self._steps[code.name] = self._steps.get(code.name, 0) + 1

    def stats(self) -> dict:
        """For the front end's metrics (Shard.metrics): its target, the streams open now, the steps
        answered so far by status code name."""
        with self._steps_lock:
            steps = dict(self._steps)
        return {"target": self.target, "streams": self.gate.streams, "steps": steps}

    def stop(self, grace_s: float | None = None) -> None:
        self.health.enter_graceful_shutdown()
        self.gate.close()
        self.server.stop(grace_s).wait()


def ensure_endpoint(shard, make_router, host: str, options: EndpointOptions) -> str:
    """The target of ``shard``'s endpoint, started first if it has none: make_router() -> the
    endpoint's Router; host: where it listens. Runs in the shard's process."""
    with _starting:
        endpoint = getattr(shard, ENDPOINT_ATTRIBUTE, None)
        if endpoint is None:
            endpoint = DecodeEndpoint(make_router(), host, options)
            setattr(shard, ENDPOINT_ATTRIBUTE, endpoint)
        return endpoint.target


def stop_endpoint(shard) -> None:
    """Stops the shard's endpoint, if it has one (the shard closes)."""
    with _starting:
        endpoint = getattr(shard, ENDPOINT_ATTRIBUTE, None)
        if endpoint is not None:
            setattr(shard, ENDPOINT_ATTRIBUTE, None)
            endpoint.stop(0)
