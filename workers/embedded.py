"""An embedded deployment in this process: Ray runtime, router and gRPC server together.

What ``monim serve`` runs, and what the demo and the integration tests start.
"""

from __future__ import annotations

import logging
import os

from monim.workers.auth import AuthPolicy
from monim.workers.router import Router
from monim.workers.runtime import RayRuntime
from monim.workers.server import DEFAULT_MAX_MESSAGE_BYTES, start_server
from monim.workers.shard_groups import DEFAULT_STRATEGY, DEFAULT_WAIT_S
from monim.workers.tls import ServerTls

log = logging.getLogger(__name__)


class EmbeddedStore:
    """Starts (or joins) a deployment and serves it on host:port.

    shards: shard actors to create (a joined deployment keeps its own count).
    ray_address: None starts a local Ray; "auto" joins a running cluster.
    placement: how new shards spread over the cluster's nodes (workers/shard_groups.py: spread,
    strict_spread, pack, strict_pack); placement_wait_s: how long they wait for room.
    port: 0 picks a free port; ``address`` is what clients dial.
    data_dir: where the deployment keeps its registry, logs and snapshots: a folder, a URI that
    pyarrow.fs opens, or a pyarrow FileSystem object (datastore/location.py; None: in memory only);
    fsync, snapshot_every: see workers/shard.py. shard_memory_budget: bytes each shard's rows may take
    (None: the shard's default; workers/shard.py).
    snapshot_root: where CreateSnapshot / RestoreSnapshot may read and write (a folder or URI;
    default ``<data_dir>/snapshots``; None without a data dir, or with a FileSystem object as the
    data dir: no snapshot RPCs).
    auth_file: a TOML file of tokens (workers/auth.py); None: no auth.
    tls_cert, tls_key: PEM files of the server's certificate and key (TLS); tls_client_ca: PEM of
    the CA that signs client certificates (mutual TLS). These files are read and checked before
    Ray starts: a bad one raises InvalidArgument naming it, and nothing is started.
    metrics_port: Prometheus text on http://metrics_host:metrics_port/metrics (0: a free port,
    ``metrics_port`` then says which; None: no metrics); metrics_host: default host.
    read_endpoints: clients' decode streams may go to the shards' own endpoints, started when a
    client first asks (workers/read_endpoint.py); False: every stream comes here.
    """

    def __init__(self, shards: int = 2, host: str = "127.0.0.1", port: int = 0, ray_address: str | None = None,
                 num_cpus: int | None = None, shard_cpus: float = 1.0, use_gpus: bool | str = "auto",
                 deployment: str = "monim", max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 data_dir: str | None = None, fsync: str = "always", snapshot_every: int = 10_000,
                 snapshot_root: str | None = None, auth_file: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, tls_client_ca: str | None = None, metrics_port: int | None = None,
                 metrics_host: str | None = None, shard_memory_budget: int | None = None,
                 placement: str = DEFAULT_STRATEGY, placement_wait_s: float = DEFAULT_WAIT_S,
                 read_endpoints: bool = True):
        auth = AuthPolicy.load(auth_file) if auth_file is not None else None
        tls = ServerTls.load(tls_cert, tls_key, tls_client_ca)
        self.runtime = RayRuntime(shards, address=ray_address, num_cpus=num_cpus, shard_cpus=shard_cpus,
                                  use_gpus=use_gpus, deployment=deployment, data_dir=data_dir, fsync=fsync,
                                  snapshot_every=snapshot_every, memory_budget=shard_memory_budget,
                                  placement=placement, placement_wait_s=placement_wait_s)
        self.router = Router(self.runtime)
        if snapshot_root is None and isinstance(data_dir, (str, os.PathLike)):
            snapshot_root = os.path.join(data_dir, "snapshots")  # a URI too: s3://bucket/prefix/snapshots
        if snapshot_root is not None:
            from monim.workers.snapshots import Snapshots

            self.router.snapshots = Snapshots(self.router, snapshot_root)
        try:
            self.server, self.port = start_server(self.router, host, port, max_message_bytes=max_message_bytes,
                                                  auth=auth, tls=tls, metrics_port=metrics_port,
                                                  metrics_host=metrics_host, read_endpoints=read_endpoints)
        except Exception:
            self.runtime.shutdown()
            raise
        self.host = host
        self.address = f"{host}:{self.port}"
        self.tls = tls is not None
        self.metrics_port = self.server.metrics_port
        log.info("serving %d shard(s) on %s%s%s", self.runtime.num_shards, self.address,
                 "" if tls is None else (" (mutual TLS)" if tls.mutual else " (TLS)"),
                 "" if auth is None else f", {len(auth.tokens)} token(s)")

    def wait(self) -> None:
        self.server.wait_for_termination()

    def stop(self, grace_s: float = 1.0) -> None:
        """Drains the server (workers/frontend.py: health NOT_SERVING, new calls refused, calls in
        flight finish for up to grace_s), then shuts the runtime down (closing the shards' logs
        where this front end's Ray ends with it)."""
        self.server.stop(grace_s).wait()
        self.runtime.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
