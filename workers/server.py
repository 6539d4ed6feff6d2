"""The gRPC server: MemoryService, the standard health service and server reflection.

With an auth policy (workers/auth.py) every MemoryService call needs a token; health and
reflection stay open, so that probes and ``grpcurl list`` work without one. With TLS
(workers/tls.py) the port speaks TLS only. What runs around the server (health that follows the
shards, Prometheus metrics, the drain of ``stop(grace)``) is workers/frontend.py.
"""

from __future__ import annotations

import concurrent.futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from monim.protos import framing, heap
from monim.protos import memory_pb2 as pb
from monim.protos.framing import DEFAULT_MAX_MESSAGE_BYTES
from monim.workers.auth import AuthInterceptor, AuthPolicy
from monim.workers.decoding import add_memory_service
from monim.workers.frontend import HEALTH_POLL_S, Frontend
from monim.workers.host_socket import serve_host_socket
from monim.workers.read_endpoint import EndpointOptions
from monim.workers.router import Router
from monim.workers.servicer import MemoryServicer
from monim.workers.tls import ServerTls

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MemoryService"].full_name


def message_size_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return framing.channel_options(max_message_bytes)


def start_server(router: Router, host: str = "127.0.0.1", port: int = 50051, max_workers: int = 32,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, auth: AuthPolicy | None = None,
                 tls: ServerTls | None = None, metrics_port: int | None = None, metrics_host: str | None = None,
                 health_poll_s: float = HEALTH_POLL_S, read_endpoints: bool = False) -> tuple[Frontend, int]:
    """Starts serving; returns (server, bound port). port 0 picks a free port. The server is a
    Frontend: a grpc.Server whose ``stop(grace)`` drains, whose health follows the shards (polled
    every health_poll_s), with ``metrics_port``.

    auth: tokens every MemoryService call must present (None: no auth).
    tls: the server's certificate and key, and the client CA for mutual TLS (None: plaintext).
    metrics_port: Prometheus text on http://metrics_host:metrics_port/metrics (metrics_host: default
    host; 0: a free port; None: no metrics). max_workers: threads serving calls; an open Decode
    stream holds one, and at most half of them are given to streams (RESOURCE_EXHAUSTED past that).
    read_endpoints: ReadEndpoints starts and names the shards' own read endpoints, with this
    server's tokens, TLS and message limit (workers/read_endpoint.py); False: it names none."""
    heap.keep_freed_memory()  # the messages' buffers reuse their pages (protos/heap.py)
    frontend = Frontend(router, auth=auth, metrics_port=metrics_port, metrics_host=metrics_host or host,
                        health_poll_s=health_poll_s)
    frontend.gate.max_streams = max_workers // 2  # decode streams hold a thread each; calls keep the rest
    # The gate is outermost: calls refused by auth are counted, and a draining server refuses before auth.
    interceptors = frontend.interceptors + ([AuthInterceptor(auth)] if auth is not None else [])
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
                         options=message_size_options(max_message_bytes), interceptors=interceptors)
    endpoints = EndpointOptions(host, max_message_bytes, auth, tls) if read_endpoints else None
    # (undecodable requests: INVALID_ARGUMENT)
    servicer = MemoryServicer(router, endpoints, max_message_bytes)
    add_memory_service(servicer, server)
    health_servicer = frontend.health
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if tls is not None:
        bound = server.add_secure_port(f"{host}:{port}", tls.credentials())
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        frontend.close()  # the metrics endpoint, if it started
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    frontend.host_socket = serve_host_socket(servicer, interceptors)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    frontend.attach(server)
    return frontend, bound
