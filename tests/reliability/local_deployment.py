"""A durable deployment in this process, without Ray: ``Router(LocalRuntime(2, data_dir))`` served by
``start_server`` on 127.0.0.1, with a snapshot root; and the data the hostile-input tests meet.

``seed`` fills it through the public API with two namespaces:
- ``fuzz-values``: learnable (value_dim 4, Adam), 320 rows with values, weights and source tags,
  one optimizer step taken on 64 of them, 6 rows deleted (ids below next_id that are not stored);
- ``fuzz-plain``: keys only (value_dim 0, inner product), 200 rows, 4 deleted;
a deployment snapshot of both, and a Retrieve's state kept at the front end under a handle. What it
did is returned as a ``World``: the facts a generator needs to aim at real data (stored and deleted
ids, generations, request ids already applied).
"""

from __future__ import annotations

import dataclasses
import os

import grpc
import numpy as np
from monim.protos import convert
from monim.protos import memory_pb2 as pb
from monim.protos import memory_pb2_grpc as pb_grpc
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime
from monim.workers.server import start_server
from monim.workers.snapshots import Snapshots

# Small, so that oversized messages are cheap to send; the mechanism is the one a 256 MiB server uses.
MAX_MESSAGE_BYTES = 1024 * 1024
SNAPSHOT = "seed-snapshot"


@dataclasses.dataclass(frozen=True)
class NamespaceFacts:
    name: str
    dim: int
    value_dim: int
    max_k: int
    generation: int
    next_id: int
    stored_ids: tuple[int, ...]
    deleted_ids: tuple[int, ...]
    sources: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class World:
    """values: the learnable namespace; plain: the one without values.
    applied_requests: (namespace, RPC, request id) of seeding writes every shard has applied.
    handle: of a Retrieve of handle_rows queries on values, kept at the front end (for 5 minutes).
    shards: the deployment's shard count (a Reshard to it moves nothing)."""

    values: NamespaceFacts
    plain: NamespaceFacts
    snapshot: str
    applied_requests: tuple[tuple[str, str, str], ...]
    handle: str
    handle_rows: int
    shards: int

    @property
    def namespaces(self) -> tuple[NamespaceFacts, NamespaceFacts]:
        return self.values, self.plain

    def request_id(self, namespace: str, rpc: str) -> str:
        return next(r for ns, method, r in self.applied_requests if ns == namespace and method == rpc)


class LocalDeployment:
    """start() / stop() / restart() on one data dir; ``stub`` and ``raw(rpc)`` talk to the current server."""

    def __init__(self, data_dir: str, shards: int = 2):
        self.data_dir = data_dir
        self.shards = shards
        self.runtime = self.router = self.server = self.channel = None

    def start(self) -> None:
        self.runtime = LocalRuntime(self.shards, data_dir=os.path.join(self.data_dir, "data"), fsync="never")
        self.router = Router(self.runtime, timeout_s=30.0)
        self.router.snapshots = Snapshots(self.router, os.path.join(self.data_dir, "snapshots"))
        self.server, port = start_server(self.router, port=0, max_workers=8, max_message_bytes=MAX_MESSAGE_BYTES,
                                         read_endpoints=True)
        self.address = f"127.0.0.1:{port}"
        # The client side accepts more than the server, so oversized requests reach the server.
        self.channel = grpc.insecure_channel(self.address, options=[
            ("grpc.max_send_message_length", 4 * MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", 4 * MAX_MESSAGE_BYTES)])
        self.stub = pb_grpc.MemoryServiceStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        self.server.stop(None).wait()
        self.runtime.shutdown()

    def restart(self) -> None:
        """Stops everything and starts again on the same data dir (the shards recover from it)."""
        self.stop()
        self.start()

    def raw(self, rpc: str):
        """A callable sending bytes as they are to MemoryService/<rpc> and returning the reply's bytes."""
        return self.channel.unary_unary(f"/monim.v1.MemoryService/{rpc}", request_serializer=None,
                                        response_deserializer=None)

    def raw_server_stream(self, rpc: str):
        """The same for a unary-stream method: bytes in, an iterator of the replies' bytes out."""
        return self.channel.unary_stream(f"/monim.v1.MemoryService/{rpc}", request_serializer=None,
                                         response_deserializer=None)

    def raw_stream(self, rpc: str):
        """The same for a stream-stream method: an iterator of bytes in, of the replies' bytes out."""
        return self.channel.stream_stream(f"/monim.v1.MemoryService/{rpc}", request_serializer=None,
                                          response_deserializer=None)


def _facts(stub, name: str, deleted: np.ndarray, sources) -> NamespaceFacts:
    description = stub.DescribeNamespace(pb.DescribeNamespaceRequest(namespace=name))
    config = description.config
    stored = np.setdiff1d(np.arange(description.next_id), deleted)
    return NamespaceFacts(name=name, dim=config.dim, value_dim=config.value_dim, max_k=config.max_k,
                          generation=config.generation, next_id=description.next_id,
                          stored_ids=tuple(stored.tolist()), deleted_ids=tuple(sorted(deleted.tolist())),
                          sources=tuple(sources))


def seed(stub, rng: np.random.Generator, shards: int) -> World:
    """Fills an empty deployment (see the module docstring); returns what it did."""
    t = convert.tensor_to_proto
    applied = []
    stub.CreateNamespace(pb.CreateNamespaceRequest(
        config=pb.NamespaceConfig(name="fuzz-values", dim=8, value_dim=4, max_k=32,
                                  optimizer=pb.OptimizerConfig(name="adam", lr=0.05)),
        request_id="seed-create-values"))
    stub.CreateNamespace(pb.CreateNamespaceRequest(
        config=pb.NamespaceConfig(name="fuzz-plain", dim=6, metric="ip", max_k=16, key_dtype="float16"),
        request_id="seed-create-plain"))
    applied += [("fuzz-values", "CreateNamespace", "seed-create-values"),
                ("fuzz-plain", "CreateNamespace", "seed-create-plain")]

    sources = ("seed-a", "seed-b")
    for batch, request_id in ((0, "seed-add-values-0"), (1, "seed-add-values-1")):
        stub.Add(pb.AddRequest(
            namespace="fuzz-values", keys=t(rng.standard_normal((160, 8)).astype(np.float32)),
            tokens=t(rng.integers(0, 50_000, 160)), values=t(rng.standard_normal((160, 4)).astype(np.float32)),
            weights=t(rng.uniform(0.5, 2.0, 160).astype(np.float32)), source=sources[batch], request_id=request_id))
        applied.append(("fuzz-values", "Add", request_id))
    stepped = np.arange(0, 128, 2) + np.arange(64) % 2  # 64 rows, on both shards
    stub.ApplyGradients(pb.ApplyGradientsRequest(
        namespace="fuzz-values", ids=t(stepped), grads=t(rng.standard_normal((64, 4)).astype(np.float32)),
        request_id="seed-step-values"))
    applied.append(("fuzz-values", "ApplyGradients", "seed-step-values"))
    deleted_values = np.array([3, 4, 77, 150, 151, 318])
    stub.Delete(pb.DeleteRequest(namespace="fuzz-values", ids=t(deleted_values), request_id="seed-delete-values"))
    applied.append(("fuzz-values", "Delete", "seed-delete-values"))

    stub.Add(pb.AddRequest(namespace="fuzz-plain", keys=t(rng.standard_normal((200, 6)).astype(np.float16)),
                           tokens=t(rng.integers(0, 50_000, 200).astype(np.int32)), source="seed-plain",
                           request_id="seed-add-plain"))
    applied.append(("fuzz-plain", "Add", "seed-add-plain"))
    deleted_plain = np.array([0, 9, 10, 199])
    stub.Delete(pb.DeleteRequest(namespace="fuzz-plain", ids=t(deleted_plain), request_id="seed-delete-plain"))
    applied.append(("fuzz-plain", "Delete", "seed-delete-plain"))

    stub.CreateSnapshot(pb.CreateSnapshotRequest(location=SNAPSHOT))
    kept = stub.Retrieve(pb.RetrieveRequest(namespace="fuzz-values", queries=t(rng.standard_normal((3, 8)).astype(
        np.float32)), k=4, temperature=1.0, keep_state=True))
    return World(values=_facts(stub, "fuzz-values", deleted_values, sources),
                 plain=_facts(stub, "fuzz-plain", deleted_plain, ("seed-plain",)),
                 snapshot=SNAPSHOT, applied_requests=tuple(applied), handle=kept.handle, handle_rows=3,
                 shards=shards)
