"""An embedded deployment in this process: Ray runtime, router and gRPC server together.

What ``monim serve`` runs, and what the demo and the integration tests start.
"""

from __future__ import annotations

import logging
import os

from monim.workers.router import Router
from monim.workers.runtime import RayRuntime
from monim.workers.server import DEFAULT_MAX_MESSAGE_BYTES, start_server

log = logging.getLogger(__name__)


class EmbeddedStore:
    """Starts (or joins) a deployment and serves it on host:port.

    shards: shard actors to create (a joined deployment keeps its own count).
    ray_address: None starts a local Ray; "auto" joins a running cluster.
    port: 0 picks a free port; ``address`` is what clients dial.
    data_dir: where the deployment keeps its registry, logs and snapshots (None: in memory only);
    fsync, snapshot_every: see workers/shard.py.
    snapshot_root: where CreateSnapshot / RestoreSnapshot may read and write (a folder or URI;
    default ``<data_dir>/snapshots``; None without a data dir: no snapshot RPCs).
    """

    def __init__(self, shards: int = 2, host: str = "127.0.0.1", port: int = 0, ray_address: str | None = None,
                 num_cpus: int | None = None, shard_cpus: float = 1.0, use_gpus: bool | str = "auto",
                 deployment: str = "monim", max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 data_dir: str | None = None, fsync: str = "always", snapshot_every: int = 10_000,
                 snapshot_root: str | None = None):
        self.runtime = RayRuntime(shards, address=ray_address, num_cpus=num_cpus, shard_cpus=shard_cpus,
                                  use_gpus=use_gpus, deployment=deployment, data_dir=data_dir, fsync=fsync,
                                  snapshot_every=snapshot_every)
        self.router = Router(self.runtime)
        if snapshot_root is None and data_dir is not None:
            snapshot_root = os.path.join(data_dir, "snapshots")
        if snapshot_root is not None:
            from monim.workers.snapshots import Snapshots

            self.router.snapshots = Snapshots(self.router, snapshot_root)
        try:
            self.server, self.port = start_server(self.router, host, port, max_message_bytes=max_message_bytes)
        except Exception:
            self.runtime.shutdown()
            raise
        self.host = host
        self.address = f"{host}:{self.port}"
        log.info("serving %d shard(s) on %s", self.runtime.num_shards, self.address)

    def wait(self) -> None:
        self.server.wait_for_termination()

    def stop(self, grace_s: float = 1.0) -> None:
        self.server.stop(grace_s).wait()
        self.runtime.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
