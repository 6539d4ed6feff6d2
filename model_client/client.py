"""MemoryClient: the Python API of monim-store.

    c = MemoryClient("127.0.0.1:50051")   # the gRPC service
    c = MemoryClient("host:50051", token="...", tls_ca="ca.pem")   # a secured one (docs/OPERATIONS.md)
    c = MemoryClient(":memory:")          # an in-process store, same behaviour

numpy arrays and torch tensors are accepted; results are numpy. Errors are
the typed exceptions of monim.protos.errors (importable from monim). Large batches are split so that
no message passes ``max_message_bytes``; an Add split this way is applied
chunk by chunk (each chunk whole or not at all). The chunks of one call are pipelined: the next is
encoded and sent while the last is processed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import random
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
from monim.model_client.errors import error_from_rpc
from monim.model_client.host_socket import NoSocket, SocketCalls, SocketFull
from monim.model_client.read_routing import ReadRouting
from monim.model_client.shared_memory import LEND_FRACTION, CallRegion, SharedMemory, tensor_bytes
from monim.protos import convert, framing, heap, validation
from monim.protos import memory_pb2 as pb
from monim.protos import memory_pb2_grpc as pb_grpc
from monim.protos.config import DEFAULT_ADMIT_BELOW, NamespaceConfig, OptimizerConfig
from monim.protos.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MemoryStoreError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from monim.protos.framing import DEFAULT_MAX_MESSAGE_BYTES
from monim.protos.results import RETRIEVED, AddResult, RetrieveResult, Rows, SearchResult
from monim.protos.shared_memory import MIN_SHARED_BYTES
from monim.protos.socket_frames import NOT_CALLED_HERE

_SERVICE = pb.DESCRIPTOR.services_by_name["MemoryService"]

IN_PROCESS = ":memory:"
# A request or reply larger than this goes in chunks of about this size (at most half the message
# limit), PIPELINE_DEPTH of them in flight: while the server processes one, the next is encoded and sent.
# Not larger: a message of 32 MiB or more costs gRPC's Python ends far more per byte than several
# smaller ones (glibc maps an allocation that large afresh every time, and each of its pages faults
# in; docs/BENCHMARKS.md, "Answers in parts, chunks of 8 MiB"): 403 MB went up 2.5x faster in 8 MiB
# messages than in 32 MiB ones. A Search's or a Retrieve's answer past it comes in parts instead
# (SearchParts, RetrieveParts: one call, one search, messages of 4 MiB).
CHUNK_BYTES = 8 * 1024 * 1024
# The chunks of a write whose tensors go through shared memory regions (a client on the server's host):
# its message is small whatever the chunk, and each chunk is a call with costs of its own at the front
# end and the shards (an id plan, a Ray call, a log record). On the 2-core VM a 201 MB Add with values
# went 1.6-2.0x faster in chunks of 32 MiB than of 8 (docs/BENCHMARKS.md, "Region copies").
SHARED_CHUNK_BYTES = 32 * 1024 * 1024
# Four in flight: on an H100 host (16 cores, one GPU shard) a 403 MB Add of 65,536 rows and a
# 201 MB ApplyGradients went 1.2x and 1.4-1.6x faster than with two (216-222k against 180k rows/s;
# 587-690k against 433-482k), eight no faster for the Add (docs/BENCHMARKS.md, run 14). Each holds
# one of the server's threads while it is served, and 4 x 8 MiB of the client's memory.
PIPELINE_DEPTH = 4
# A Search whose answer passes this goes as calls of equal rows, each answering at most this much (in
# parts), PIPELINE_DEPTH at once: the server searches one while the answers of those before it travel
# and are copied into the batch's arrays (one search of the batch answers nothing until it is done).
READ_CHUNK_BYTES = 20 << 20
# The same for a client whose answers come in shared memory regions (the server on its host): one call
# up to this much, its answer's arrays lying in the region, not copied. On an H100 host a Search of
# B=4096, k=1024 (67 MB) took 42.9 ms as one call against 54.6 as four of 20 MiB (in-process 37.5 ms;
# docs/BENCHMARKS.md, "Large answers lent their region").
SHARED_READ_CHUNK_BYTES = 128 << 20
# Codes of a call that may have ended on the client's side only: its server may still run it.
_SERVER_MAY_STILL_ANSWER = frozenset({grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                                      grpc.StatusCode.UNAVAILABLE})
# A read answered in parts, and the same read answered in one message: its large tensors in the call's
# region (a client on the server's host), the message small whatever the answer.
_WHOLE_IN_A_REGION = {"SearchParts": "Search", "RetrieveParts": "Retrieve"}
# The environment variable a token is read from when none is passed (read when a client is made).
TOKEN_ENV = "MONIM_TOKEN"
_FLOAT_KINDS = ("float16", "float32")


@dataclasses.dataclass
class NamespaceDescription:
    config: NamespaceConfig
    rows: int
    shards: list[dict]
    next_id: int


def _to_numpy(array, what: str):
    """torch tensor / list / numpy -> numpy; None stays None."""
    if array is None:
        return None
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def _check_arrays_to_send(result: RetrieveResult, handle_error: FailedPrecondition | None = None) -> None:
    """Before a backward sends the forward's arrays: handle_error (raised) unless it says the handle
    is gone; then, or with no handle, an error unless the result has the arrays (not memory_only's)."""
    if handle_error is not None and "retrieve handle" not in handle_error.message:
        raise handle_error
    if result.has_neighbours or (handle_error is None and result.handle):
        return
    if handle_error is not None:
        gone = handle_error.message.split(";")[0]
        raise FailedPrecondition(f"{gone}, and the forward (memory_only) has no neighbours to send instead: "
                                 "nothing was stepped; run the forward again") from None
    raise InvalidArgument("this result has neither a handle nor neighbours (a Retrieve with memory_only and "
                          "without keep_state): there is nothing to send for its backward; retrieve with "
                          "keep_state=True")


def _float_array(array, what: str):
    """float64 (numpy's default) is narrowed to float32; other dtypes are left for the store to judge."""
    array = _to_numpy(array, what)
    if array is not None and array.dtype == np.float64:
        array = array.astype(np.float32)
    return array


def _tensor_queries(queries):
    """The queries of an as_tensors read: a torch tensor, float64 and bfloat16 in float32 (as the numpy
    path narrows float64; bfloat16 has no numpy dtype), on the device they came on."""
    if not validation.is_tensor(queries):
        raise InvalidArgument(f"as_tensors takes queries as a torch tensor, got {type(queries).__name__}")
    queries = queries.detach()
    return queries.float() if str(queries.dtype) in ("torch.bfloat16", "torch.float64") else queries


def _k(k) -> int:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
        raise InvalidArgument(f"k must be an integer, got {k!r}")
    return int(k)


def _int_array(array, what: str):
    array = _to_numpy(array, what)
    if array is not None and array.dtype.kind in "iu" and array.dtype != np.int32:
        array = array.astype(np.int64)
    return array


def _snapshot_info(message) -> dict:
    return {"location": message.location, "created_at": message.created_at, "shards": message.shards,
            "rows": dict(message.rows), "bytes": message.bytes}


def _read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except FileNotFoundError:
        raise InvalidArgument(f"{what} {path}: no such file") from None
    except OSError as error:
        raise InvalidArgument(f"{what} {path}: cannot be read ({error.strerror or error})") from None


def _channel_credentials(tls_ca: str | None, tls_cert: str | None, tls_key: str | None):
    """grpc.ChannelCredentials from PEM files: tls_ca (None: the system's roots), and the client
    certificate and key for mutual TLS (both or neither)."""
    if (tls_cert is None) != (tls_key is None):
        raise InvalidArgument("tls_cert and tls_key go together (a client certificate and its key, for mutual TLS)")
    return grpc.ssl_channel_credentials(
        root_certificates=None if tls_ca is None else _read_file(tls_ca, "tls_ca"),
        private_key=None if tls_key is None else _read_file(tls_key, "tls_key"),
        certificate_chain=None if tls_cert is None else _read_file(tls_cert, "tls_cert"))


class _RemoteStore:
    """The service over one persistent gRPC channel; one RPC per call, carrying the token if any."""

    def __init__(self, target: str, timeout_s: float, max_message_bytes: int, token: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None, route_reads: bool = True,
                 shared_memory: bool = True):
        heap.keep_freed_memory()  # this process encodes and decodes the messages (protos/heap.py)
        # Large tensors through shared memory where the server is on this host (model_client/shared_memory.py).
        self.shared = SharedMemory() if shared_memory else None
        self._host_sockets: dict[str, str] = {}  # target -> its server's Unix socket for this host's clients
        self._socket_calls: dict[str, SocketCalls] = {}  # socket path -> calls on that socket
        self._socket_callables: dict = {}  # (socket path, method, serialized) -> its callable there
        self._options = framing.channel_options(max_message_bytes)
        self.max_message_bytes = max_message_bytes
        self._credentials = credentials
        self.target = target
        self.channel = self._open_channel(target)
        self.tls = credentials is not None
        self.stub = pb_grpc.MemoryServiceStub(self.channel)
        self._endpoint_channels: dict[str, grpc.Channel] = {}  # a shard's read endpoint -> its channel
        self._endpoint_lock = threading.Lock()
        self.read_routing = ReadRouting(self.read_endpoints, route_reads)
        self._framed_calls: dict = {}
        self.timeout_s = timeout_s
        # Sent with each call rather than as call credentials, which gRPC allows on TLS channels only.
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None

    def _open_channel(self, target: str) -> grpc.Channel:
        if self._credentials is None:
            return grpc.insecure_channel(target, options=self._options)
        return grpc.secure_channel(target, self._credentials, options=self._options)

    def read_endpoints(self) -> list[str]:
        """The shards' read endpoints the server names (workers/read_endpoint.py); [] when it
        names none, or is a server from before ReadEndpoints (UNIMPLEMENTED)."""
        try:
            return list(self._call("ReadEndpoints", pb.ReadEndpointsRequest()).targets)
        except MemoryStoreError as error:
            if getattr(error, "status_code", "") == "UNIMPLEMENTED":
                return []
            raise

    def endpoint_channel(self, target: str) -> grpc.Channel:
        """This client's channel to a read endpoint (same credentials and limits), kept open for the
        client's life."""
        with self._endpoint_lock:
            channel = self._endpoint_channels.get(target)
            if channel is None:
                channel = self._endpoint_channels[target] = self._open_channel(target)
        return channel

    def _call(self, method: str, request, tensors: dict | None = None, then=None, answer_bytes: int = 0):
        """One RPC. tensors: the request's Tensor fields (name -> array, None: unset), serialized with
        one copy of their bytes (protos/framing.py) rather than through the message; then an answer
        with Tensor fields comes back as a framing.Framed (message, payloads: the tensors' bytes as
        views of the received answer), any other as its message. A read goes to a shard's read
        endpoint where model_client/read_routing.py says so, and to the front end if that fails.
        then(answer) -> what the call returns (default: the answer): it reads the answer's payloads
        while a shared memory region they may lie in is held (each copied once, out of the region).
        answer_bytes: about how large the answer's tensors are (room for them in the region)."""
        if self.read_routing.routes(method):
            target = self.read_routing.target()
            if target is not None:
                try:
                    return self._call_on(target, method, request, tensors, then, answer_bytes)
                except (Unavailable, Unauthenticated):
                    self.read_routing.failed(target)
        return self._call_on(self.target, method, request, tensors, then, answer_bytes)

    def _call_on(self, target: str, method: str, request, tensors: dict | None, then=None, answer_bytes: int = 0):
        """_call on the front end (target: its own) or on a read endpoint."""
        held = self._call_region(target, tensors, answer_bytes)
        in_parts = False  # a parts method called as its one-message twin: its answer read as one part
        if held is not None and answer_bytes >= MIN_SHARED_BYTES:
            # The region has room for the whole answer: one message naming where it lies, not parts
            # (whose bytes would be copied again to join them); while what the region cannot hold (the
            # answer's size is an estimate: a namespace's widths this client has not seen count 0) would
            # still fit a message.
            if answer_bytes <= self.max_message_bytes // 2:
                in_parts, method = method in _WHOLE_IN_A_REGION, _WHOLE_IN_A_REGION.get(method, method)
            if then is not None and answer_bytes >= LEND_FRACTION * held.region.size:
                self.shared.lend(held.region)  # the answer's arrays lie in the region: no copy out of it
        answered = False  # the server is done with the call (its region may serve another)
        try:
            serialized = tensors is not None
            sent = framing.serialized(request, tensors, None if held is None else held.request_placer) \
                if serialized else request
            # The answer's room in the region: after the request's tensors, so named once they are placed.
            metadata = self.metadata if held is None else (*(self.metadata or ()), held.answer_metadata())
            try:
                answer = self._invoke(target, method, serialized, sent, metadata)
                # An answer in parts (SearchParts, RetrieveParts): every part, in order, read here.
                answer = list(answer) if _SERVICE.methods_by_name[method].server_streaming else answer
                answer = [answer] if in_parts else answer
                answered = True
            except grpc.RpcError as error:
                answered = error.code() not in _SERVER_MAY_STILL_ANSWER
                raise
            if then is not None:
                return then(answer)
            return answer if held is None else _detached(answer, held)
        except grpc.RpcError as error:
            raise error_from_rpc(error, self.tls) from None
        finally:
            if held is not None:
                # A call cut short on this side (its deadline, a broken connection) may still be running
                # on the server, which would write its answer into the region: no later call gets it.
                self.shared.ended(held.region, answered)

    def _invoke(self, target: str, method: str, serialized: bool, sent, metadata):
        """The call, on the server's host socket where it has one this client reaches (model_client/
        host_socket.py), else over gRPC."""
        path = None if method in NOT_CALLED_HERE else self.host_socket(target)
        if path is not None:
            try:
                return self._on_socket(path, method, serialized)(sent, timeout=self.timeout_s, metadata=metadata)
            except SocketFull:  # the server serves as many socket connections as it takes: this call over gRPC
                pass
            except NoSocket:  # gone, or not reachable from this process: nothing was sent
                self.forget_host_socket(target)
        return self._framed(target, method, serialized)(sent, timeout=self.timeout_s, metadata=metadata)

    def _on_socket(self, path: str, method: str, serialized: bool):
        """The method's callable on the host socket at path (kept, as _framed keeps gRPC's)."""
        key = (path, method, serialized)
        callable_ = self._socket_callables.get(key)
        if callable_ is None:
            calls = self._socket_calls.get(path)
            if calls is None:
                calls = self._socket_calls.setdefault(path, SocketCalls(path, self.max_message_bytes))
            callable_ = self._socket_callables[key] = calls.callable(method, *self._codec(method, serialized))
        return callable_

    def _call_region(self, target: str, tensors: dict | None, answer_bytes: int) -> CallRegion | None:
        """A shared memory region for a call that moves a large tensor either way, where the server
        uses them; None: the call goes in messages only."""
        if self.shared is None:
            return None
        size = tensor_bytes(tensors) + (answer_bytes + (1 << 16) if answer_bytes >= MIN_SHARED_BYTES else 0)
        if size < MIN_SHARED_BYTES or not self.shared.usable(target, functools.partial(self._probe, target)):
            return None
        region = self.shared.acquire(size)
        return None if region is None else CallRegion(region)

    def _probe(self, target: str, region: str) -> None:
        answer = self._framed(target, "ProbeSharedMemory", serialized=False)(
            pb.ProbeSharedMemoryRequest(region=region), timeout=min(self.timeout_s, 10.0), metadata=self.metadata)
        self._host_sockets[target] = answer.host_socket

    def uses_shared_memory(self, target: str | None = None) -> bool:
        """Whether calls to target (default: the front end) pass their large tensors in regions."""
        target = self.target if target is None else target
        return self.shared is not None and self.shared.usable(target, functools.partial(self._probe, target))

    def host_socket(self, target: str) -> str | None:
        """The Unix socket on which target's server takes this host's calls and Decode streams
        (workers/host_socket.py), where it passed the shared memory probe and named one; else None."""
        if not self.uses_shared_memory(target):
            return None
        return self._host_sockets.get(target) or None

    def forget_host_socket(self, target: str) -> None:
        """target's socket could not be reached from here: its calls and Decode streams go over gRPC."""
        self._host_sockets[target] = ""

    def _framed(self, target: str, method: str, serialized: bool = True):
        """The method's callable over the channel to target. serialized: it takes an already serialized
        request and answers with tensors as a framing.Framed; else it takes and answers messages."""
        key = (target, method, serialized)
        callable_ = self._framed_calls.get(key)
        if callable_ is None:
            channel = self.channel if target == self.target else self.endpoint_channel(target)
            request_serializer, response_deserializer, in_parts = self._codec(method, serialized)
            kind = channel.unary_stream if in_parts else channel.unary_unary
            callable_ = self._framed_calls[key] = kind(f"/{_SERVICE.full_name}/{method}",
                                                       request_serializer=request_serializer,
                                                       response_deserializer=response_deserializer)
        return callable_

    def _codec(self, method: str, serialized: bool):
        """(request serializer or None for bytes, reply deserializer, answered in parts) of the method."""
        request = getattr(pb, _SERVICE.methods_by_name[method].input_type.name)
        reply = getattr(pb, _SERVICE.methods_by_name[method].output_type.name)
        has_tensors = any(f.message_type is pb.Tensor.DESCRIPTOR for f in reply.DESCRIPTOR.fields)
        shared = None if self.shared is None else self.shared.view
        return (None if serialized else request.SerializeToString,
                functools.partial(framing.parsed, reply, shared=shared) if has_tensors and serialized
                else reply.FromString,
                _SERVICE.methods_by_name[method].server_streaming)

    def create_namespace(self, config, request_id=""):
        request = pb.CreateNamespaceRequest(config=convert.config_to_proto(config), request_id=request_id)
        return convert.config_from_proto(self._call("CreateNamespace", request).config)

    def list_namespaces(self):
        return [convert.config_from_proto(c) for c in self._call("ListNamespaces", pb.ListNamespacesRequest()).namespaces]

    def describe_namespace(self, namespace):
        r = self._call("DescribeNamespace", pb.DescribeNamespaceRequest(namespace=namespace))
        shards = [{"shard": s.shard, "rows": s.rows, "device": s.device, "backend": s.backend, "state": s.state,
                   "memory_used": s.memory_used_bytes, "memory_budget": s.memory_budget_bytes,
                   "index_state": s.index_state, "index_trainings": s.index_trainings,
                   "index_tombstones": s.index_tombstones, "index_drift": s.index_drift,
                   "index_unindexed": s.index_unindexed} for s in r.shards]
        return {"config": convert.config_from_proto(r.config), "rows": r.rows, "shards": shards, "next_id": r.next_id}

    def drop_namespace(self, namespace):
        return self._call("DropNamespace", pb.DropNamespaceRequest(namespace=namespace)).rows_dropped

    def add(self, namespace, keys, tokens, values=None, weights=None, source="", logp=None,
            admit_below=DEFAULT_ADMIT_BELOW, merge_eps=0.0, *, request_id="", generation=0):
        request = pb.AddRequest(namespace=namespace, source=source, admit_below=admit_below, merge_eps=merge_eps,
                                request_id=request_id, generation=generation)
        tensors = dict(keys=keys, tokens=tokens, values=values, weights=weights, logp=logp)
        return convert.add_result_from_proto(*self._call("Add", request, tensors))

    def search(self, namespace, queries, k, return_keys=False, return_values=False, return_weights=False, *,
               generation=0, nprobe=0, rerank=0, ef=0, into=None, start=0, answer_bytes=0):
        """into, start: the answer's rows go to rows start... of that convert.BatchAnswer (a split batch's
        call), else to arrays of its own: copied once from the received bytes, or lying in the call's
        shared memory region (lent to them). answer_bytes: about how large the answer is."""
        request = pb.SearchRequest(namespace=namespace, k=k, return_keys=return_keys, return_values=return_values,
                                   return_weights=return_weights, generation=generation, nprobe=nprobe,
                                   rerank=rerank, ef=ef)
        return self._call("Search", request, dict(queries=queries), answer_bytes=answer_bytes,
                          then=lambda answer: convert.search_result_from_parts([answer], into, start))

    def search_parts(self, namespace, queries, k, return_keys=False, return_values=False, return_weights=False, *,
                     generation=0, nprobe=0, rerank=0, ef=0, into=None, start=0, answer_bytes=0):
        """search, its answer in parts (SearchParts). answer_bytes: about how large it is."""
        request = pb.SearchRequest(namespace=namespace, k=k, return_keys=return_keys, return_values=return_values,
                                   return_weights=return_weights, generation=generation, nprobe=nprobe,
                                   rerank=rerank, ef=ef)
        return self._call("SearchParts", request, dict(queries=queries), answer_bytes=answer_bytes,
                          then=lambda parts: convert.search_result_from_parts(parts, into, start))

    def get(self, namespace, ids, return_optimizer_state=False, *, generation=0, answer_bytes=0):
        """answer_bytes: about how large the rows are (room for them in a shared memory region)."""
        request = pb.GetRequest(namespace=namespace, return_optimizer_state=return_optimizer_state,
                                generation=generation)
        return self._call("Get", request, dict(ids=ids), answer_bytes=answer_bytes,
                          then=lambda answer: convert.rows_from_proto(*answer))

    def delete(self, namespace, ids=None, source=None, *, request_id="", generation=0):
        request = pb.DeleteRequest(namespace=namespace, request_id=request_id, generation=generation)
        if source is not None:
            request.source = source  # explicit presence: "" (untagged rows) is not "unset"
        return self._call("Delete", request, dict(ids=ids)).deleted

    def retrieve(self, namespace, queries, k, temperature, *, generation=0, keep_state=False, nprobe=0, rerank=0,
                 ef=0, memory_only=False, into=None, start=0, answer_bytes=0):
        """into, start, answer_bytes: as search's."""
        request = pb.RetrieveRequest(namespace=namespace, k=k, temperature=temperature, generation=generation,
                                     keep_state=keep_state, nprobe=nprobe, rerank=rerank, ef=ef,
                                     memory_only=memory_only)
        return self._call("Retrieve", request, dict(queries=queries), answer_bytes=answer_bytes, then=lambda answer: (
            convert.retrieve_result_from_parts([answer], queries, temperature, into, start)))

    def retrieve_parts(self, namespace, queries, k, temperature, *, generation=0, keep_state=False, nprobe=0,
                       rerank=0, ef=0, memory_only=False, into=None, start=0, answer_bytes=0):
        """retrieve, its answer in parts (RetrieveParts). answer_bytes: about how large it is."""
        request = pb.RetrieveRequest(namespace=namespace, k=k, temperature=temperature, generation=generation,
                                     keep_state=keep_state, nprobe=nprobe, rerank=rerank, ef=ef,
                                     memory_only=memory_only)
        return self._call("RetrieveParts", request, dict(queries=queries), answer_bytes=answer_bytes, then=lambda parts: (
            convert.retrieve_result_from_parts(parts, queries, temperature, into, start)))

    def retrieve_backward(self, namespace, queries, ids, alpha, distances, grad_memory, temperature, *,
                          generation=0, step_id="", part=0, defer_step=False, handle="", row_offset=0, answer_bytes=0):
        """answer_bytes: of dL/dq (float32 [B, dim]), where queries are not sent (by handle)."""
        request = pb.RetrieveBackwardRequest(
            namespace=namespace, temperature=temperature, generation=generation, step_id=step_id, part=part,
            defer_step=defer_step, handle=handle, row_offset=row_offset)
        tensors = dict(grad_memory=grad_memory)
        if not handle:  # else the front end has the forward's arrays
            tensors.update(queries=queries, ids=ids, alpha=alpha, distances=distances)
        if queries is not None:
            answer_bytes = 4 * queries.shape[0] * (queries.shape[1] if queries.ndim == 2 else 1)
        return self._call("RetrieveBackward", request, tensors, answer_bytes=answer_bytes, then=lambda answer: (
            convert.tensor_from_proto(answer.message.grad_queries, "grad_queries",
                                      data=answer.payloads.get("grad_queries")), answer.message.grad_temperature))

    def commit_step(self, namespace, step_id, *, generation=0):
        request = pb.StepRequest(namespace=namespace, step_id=step_id, generation=generation)
        return self._call("CommitStep", request).rows_updated

    def abort_step(self, namespace, step_id, *, generation=0):
        self._call("AbortStep", pb.StepRequest(namespace=namespace, step_id=step_id, generation=generation))

    def apply_gradients(self, namespace, ids, grads, *, request_id="", generation=0, step_id="", part=0,
                        defer_step=False):
        request = pb.ApplyGradientsRequest(namespace=namespace, request_id=request_id, generation=generation,
                                           step_id=step_id, part=part, defer_step=defer_step)
        return self._call("ApplyGradients", request, dict(ids=ids, grads=grads)).rows_updated

    def create_snapshot(self, location, namespace=""):
        response = self._call("CreateSnapshot", pb.CreateSnapshotRequest(location=location, namespace=namespace))
        return _snapshot_info(response.snapshot)

    def list_snapshots(self):
        return [_snapshot_info(info) for info in self._call("ListSnapshots", pb.ListSnapshotsRequest()).snapshots]

    def restore_snapshot(self, location, namespace=""):
        request = pb.RestoreSnapshotRequest(location=location, namespace=namespace)
        return dict(self._call("RestoreSnapshot", request).rows)

    def reshard(self, shards, batch_rows=0, timeout_s=None):
        request = pb.ReshardRequest(shards=shards, batch_rows=batch_rows)
        try:
            for progress in self.stub.Reshard(request, timeout=timeout_s, metadata=self.metadata):
                yield {"source": progress.source_shards, "target": progress.target_shards,
                       "namespaces_done": progress.namespaces_done, "namespaces": progress.namespaces,
                       "namespace": progress.namespace, "ids_done": progress.ids_done, "ids": progress.ids,
                       "rows_moved": progress.rows_moved, "done": progress.done}
        except grpc.RpcError as error:
            raise error_from_rpc(error, self.tls) from None

    def close(self):
        self.channel.close()
        with self._endpoint_lock:
            for channel in self._endpoint_channels.values():
                channel.close()
            self._endpoint_channels.clear()
        if self.shared is not None:
            self.shared.close()
        for calls in list(self._socket_calls.values()):
            calls.close()


def _detached(answer, held: CallRegion):
    """The answer (a Framed, or a list of them) with its payloads that lie in the call's region copied
    out of it (the region goes back to the pool when the call returns)."""
    if isinstance(answer, list):
        return [_detached(part, held) for part in answer]
    if not isinstance(answer, framing.Framed):
        return answer
    return framing.Framed(answer.message, {name: bytes(data) if isinstance(data, memoryview) and held.holds(data) else data
                                           for name, data in answer.payloads.items()})


def _in_process_store(device: str):
    """The in-process store of ``MemoryClient(":memory:")``: it needs the server extra (torch, faiss)."""
    try:
        from monim.model_client.local_store import LocalMemory
    except ModuleNotFoundError as error:
        raise ImportError(f'MemoryClient(":memory:") needs {error.name!r}, which is not installed: '
                          "pip install 'monim-store[server]'", name=error.name) from error
    return LocalMemory(device)


class MemoryClient:
    """target: "host:port" of a monim server, or ":memory:" for an in-process store.

    device: where the in-process store keeps its rows ("cpu", or "cuda" for the torch kernel).
    timeout_s: deadline of each RPC. retries: how often a call is retried on UNAVAILABLE or
    DEADLINE_EXCEEDED, with exponential backoff from ``backoff_s``: reads, and every write,
    which carries a request id that the store applies at most once (so a retried write
    lands exactly once). Only DropNamespace is never retried.

    A secured server (docs/OPERATIONS.md, "Securing a server"):
    token: sent with every call as ``authorization: Bearer <token>``; None: the ``MONIM_TOKEN``
    environment variable, if set. A call without a valid token raises Unauthenticated; one
    the token does not allow, PermissionDenied.
    tls_ca: PEM file of the CA that signed the server's certificate; the channel uses TLS when
    it is given, or when ``tls`` is True (then the system's root certificates are trusted).
    tls_cert, tls_key: PEM files of this client's certificate and key, for mutual TLS.
    The in-process store has no access control and ignores the token; TLS options raise there.
    read_endpoints: a memory layer's calls (search, retrieve, retrieve_backward and decode streams,
    so ``attach_monim`` while training and generating) go to a shard's own read endpoint where the
    server names them, with the front end as the fallback (model_client/read_routing.py; docs/API.md,
    "Read endpoints"); False: every call to the front end.
    shared_memory: where the server is on this host and can use this host's shared memory (it is asked
    once; docs/API.md, "Shared memory on one host"), a call's large tensors (1 MiB or more) go through
    shared memory regions instead of its messages, and its calls and decode streams through the
    server's Unix socket instead of gRPC (docs/API.md, "Calls and decode streams on one host"); False:
    gRPC and messages always.
    """

    def __init__(self, target: str = IN_PROCESS, timeout_s: float = 60.0, retries: int = 3,
                 backoff_s: float = 0.2, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, device: str = "cpu",
                 token: str | None = None, tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, tls: bool | None = None, read_endpoints: bool = True,
                 shared_memory: bool = True):
        self.target = target
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_message_bytes = max_message_bytes
        self.remote = target != IN_PROCESS
        self._configs: dict[str, NamespaceConfig] = {}  # namespace -> its config, to size replies
        self._answers_in_parts = True  # False once the server said it has no SearchParts / RetrieveParts
        use_tls = bool(tls) or (tls is None and any(f is not None for f in (tls_ca, tls_cert, tls_key)))
        if not self.remote:
            if use_tls:
                raise InvalidArgument('TLS options apply to a server address, not to the in-process store ":memory:"')
            self._store = _in_process_store(device)
            return
        if tls is False and any(f is not None for f in (tls_ca, tls_cert, tls_key)):
            raise InvalidArgument("tls=False with tls_ca, tls_cert or tls_key: drop one or the other")
        if token is None:
            token = os.environ.get(TOKEN_ENV)
        token = token.strip() if token else None
        credentials = _channel_credentials(tls_ca, tls_cert, tls_key) if use_tls else None
        self._store = _RemoteStore(target, timeout_s, max_message_bytes, token, credentials, read_endpoints,
                                   shared_memory)

    # ----- plumbing -------------------------------------------------------------
    def _retried(self, method: str, *args, **kwargs):
        """Calls the store; on UNAVAILABLE / DEADLINE_EXCEEDED tries again, the same request
        (reads, or writes with their request id) up to ``retries`` times."""
        for attempt in range(self.retries + 1):
            try:
                return getattr(self._store, method)(*args, **kwargs)
            except (Unavailable, DeadlineExceeded):
                if attempt == self.retries:
                    raise
                time.sleep(self.backoff_s * (2**attempt) * (1 + random.random()))

    def _row_chunks(self, rows: int, bytes_per_row: int, whole_up_to: int | None = None,
                    chunk_bytes: int | None = None):
        """Slices of rows: one if all of them take at most whole_up_to bytes (and max_message_bytes/2:
        the rest is headroom), else as few slices of equal rows as keep each within chunk_bytes (and
        half the limit), for _pipelined. A call whose parts cannot be sent apart without a cost of their
        own (a forward that keeps its state under one handle, a backward by that handle) passes
        whole_up_to=max_message_bytes: split only past half the limit. chunk_bytes: if None,
        SHARED_CHUNK_BYTES where the front end takes this client's tensors in shared memory, else CHUNK_BYTES."""
        if not self.remote:
            yield slice(0, rows)
            return
        if chunk_bytes is None:
            chunk_bytes = SHARED_CHUNK_BYTES if self._store.uses_shared_memory() else CHUNK_BYTES
        limit = min(self.max_message_bytes // 2, chunk_bytes if whole_up_to is None else whole_up_to)
        if rows * bytes_per_row > limit:
            limit = min(self.max_message_bytes // 2, chunk_bytes)
        most = max(1, limit // max(1, bytes_per_row))
        per_chunk = -(-rows // -(-rows // most)) if rows else 1  # ceil(rows / chunks), chunks = ceil(rows / most)
        for start in range(0, max(rows, 1), per_chunk):
            yield slice(start, start + per_chunk)

    def _read(self, method: str, answer_bytes: int, *args, **kwargs):
        """A read ("search" or "retrieve") whose answer takes about answer_bytes: past CHUNK_BYTES (or
        half the message limit, if less) it comes in parts (SearchParts, RetrieveParts: one search of
        the batch, its answer in messages of at most 4 MiB), unless the server has no such call (a
        server from before them: UNIMPLEMENTED)."""
        if not self.remote:
            return self._retried(method, *args, **kwargs)
        if answer_bytes > min(CHUNK_BYTES, self.max_message_bytes // 2) and self._parts_fit():
            try:
                return self._retried(f"{method}_parts", *args, answer_bytes=answer_bytes, **kwargs)
            except MemoryStoreError as error:
                if getattr(error, "status_code", "") != "UNIMPLEMENTED":
                    raise
                self._answers_in_parts = False
        return self._retried(method, *args, answer_bytes=answer_bytes, **kwargs)

    def _parts_fit(self) -> bool:
        """Whether reads may be answered in parts: the server has the calls, and their messages (at most
        convert.ANSWER_PART_BYTES) fit this client's limit with room to spare."""
        return self._answers_in_parts and convert.ANSWER_PART_BYTES <= self.max_message_bytes // 2

    @staticmethod
    def _pipelined(calls: list) -> list:
        """Runs the calls (one per chunk of a request), at most PIPELINE_DEPTH at once, in order;
        returns their answers in order. After a call fails none is started; those already started
        finish, then the first failure (in the calls' order) is raised."""
        if len(calls) <= 1:
            return [call() for call in calls]
        futures: list[concurrent.futures.Future] = []
        with concurrent.futures.ThreadPoolExecutor(PIPELINE_DEPTH, thread_name_prefix="monim-chunk") as pool:
            for index, call in enumerate(calls):
                if index >= PIPELINE_DEPTH:
                    concurrent.futures.wait([futures[index - PIPELINE_DEPTH]])
                if any(future.done() and future.exception() is not None for future in futures):
                    break
                futures.append(pool.submit(call))
        return [future.result() for future in futures]

    @staticmethod
    def _rows(array) -> int:
        return int(array.shape[0]) if array is not None and array.ndim >= 1 else 0

    # ----- namespaces ----------------------------------------------------------
    def create_namespace(self, name: str, dim: int, metric: str = "l2", index: str = "flat", value_dim: int = 0,
                         max_k: int = 1024, key_dtype: str = "auto", optimizer: str = "sgd", lr: float = 0.01,
                         nlist: int = 0, pq_m: int = 0, train_min_rows: int = 0, hnsw_m: int = 0,
                         ef_construction: int = 0, **optimizer_options) -> NamespaceConfig:
        """optimizer: sgd | adagrad | adam for the value rows, with lr and options (momentum, beta1,
        beta2, eps, lr_decay, initial_accumulator_value, max_grad_norm); see datastore/optimizers.py.
        index: flat (exact), ivf_flat or ivf_pq, with nlist, pq_m (ivf_pq) and train_min_rows, or hnsw,
        with hnsw_m, ef_construction and train_min_rows (0: the defaults; docs/INDEXES.md)."""
        config = NamespaceConfig(name=name, dim=dim, metric=metric, index=index, value_dim=value_dim,
                                 max_k=max_k, key_dtype=key_dtype, nlist=nlist, pq_m=pq_m,
                                 train_min_rows=train_min_rows, hnsw_m=hnsw_m, ef_construction=ef_construction,
                                 optimizer=OptimizerConfig.from_dict(dict(optimizer_options, name=optimizer, lr=lr)))
        config = self._retried("create_namespace", config, validation.new_request_id())
        self._configs[name] = config
        return config

    def list_namespaces(self) -> list[NamespaceConfig]:
        return self._retried("list_namespaces")

    def describe_namespace(self, name: str) -> NamespaceDescription:
        description = NamespaceDescription(**self._retried("describe_namespace", name))
        self._configs[name] = description.config  # sizes later replies (a MoNIMLayer describes its namespace)
        return description

    def drop_namespace(self, name: str) -> int:
        """Drops the namespace and all its entries; returns how many rows went."""
        self._configs.pop(name, None)
        return self._store.drop_namespace(name)

    # ----- data ------------------------------------------------------------------
    def add(self, namespace: str, keys, tokens, values=None, weights=None, source: str = "", logp=None,
            admit_below: float = DEFAULT_ADMIT_BELOW, merge_eps: float = 0.0, details: bool = False,
            request_id: str | None = None):
        """Stores entries; returns their ids, int64 [N] (-1 where a row was not admitted).

        keys float [N, dim], tokens int [N], values float [N, value_dim] (zeros if None),
        weights float [N] (ones if None), source: a tag for the batch.
        logp float [N]: the model's log p of each token; only rows with logp < admit_below are
        stored (SeMem admission). merge_eps > 0: a row merges into an existing entry with the same
        token closer than this (its weight grows by 1; the row's id is that entry's).
        details=True returns the AddResult (ids, admitted, merged) instead of the ids.
        request_id: makes a repeated call (e.g. after a crash) land once; one is made when None.
        A batch larger than a message goes in chunks, two in flight at once (one at a time with
        merge_eps): its ids are then not always increasing in the rows' order.
        """
        keys, values = _float_array(keys, "keys"), _float_array(values, "values")
        weights, logp = _float_array(weights, "weights"), _float_array(logp, "logp")
        tokens = _int_array(tokens, "tokens")
        n = self._rows(keys)
        row_bytes = keys.itemsize * int(np.prod(keys.shape[1:], dtype=np.int64)) + 24 + (
            0 if values is None else values.itemsize * int(np.prod(values.shape[1:], dtype=np.int64)))
        # Whole up to half the message limit (an Add in one message is all or nothing; split, it is
        # applied chunk by chunk), then in chunks of CHUNK_BYTES.
        parts = list(self._row_chunks(n, row_bytes, whole_up_to=self.max_message_bytes))
        request_id = validation.check_step_id(request_id or validation.new_request_id())
        if len(parts) == 1:
            result = self._retried("add", namespace, keys, tokens, values, weights, source, logp, admit_below,
                                   merge_eps, request_id=request_id)
        else:
            self._check_whole_batch(namespace, keys, tokens, values, weights, logp)

            def part_of(array, part):
                return None if array is None else array[part]

            calls = [functools.partial(self._retried, "add", namespace, keys[p], tokens[p], part_of(values, p),
                                       part_of(weights, p), source, part_of(logp, p), admit_below, merge_eps,
                                       request_id=validation.part_id(request_id, i))
                     for i, p in enumerate(parts)]
            # A row may merge into one an earlier chunk stored: with merge_eps, chunks go one at a time.
            results = [call() for call in calls] if merge_eps > 0 else self._pipelined(calls)
            result = AddResult(ids=np.concatenate([r.ids for r in results]),
                               admitted=np.concatenate([r.admitted for r in results]),
                               merged=np.concatenate([r.merged for r in results]), generation=results[-1].generation)
        return result if details else result.ids

    def _check_whole_batch(self, namespace, keys, tokens, values, weights, logp) -> None:
        """Before a batch is split, checks all of it, so a bad row in a later chunk
        cannot leave the earlier chunks stored."""
        config = self.describe_namespace(namespace).config
        keys = validation.check_vectors(keys, config.dim, "keys")
        validation.check_tokens(tokens, keys.shape[0])
        if values is not None:
            validation.check_values(values, keys.shape[0], config.value_dim)
        if weights is not None:
            validation.check_weights(weights, keys.shape[0])
        if logp is not None:
            validation.check_logp(logp, keys.shape[0])

    def search(self, namespace: str, queries, k: int, return_keys: bool = False, return_values: bool = False,
               return_weights: bool = False, *, nprobe: int = 0, rerank: int = 0, ef: int = 0,
               as_tensors: bool = False) -> SearchResult:
        """queries float [B, dim] -> SearchResult (ids int64 [B,k], distances float32 [B,k], tokens int32 [B,k]).
        nprobe, rerank: ivf namespaces only: lists probed (0: min(32, nlist)) and candidates ranked
        again by exact distance (0: off, else >= k). ef: hnsw namespaces only: the search's beam
        width (0: max(64, k), else in [k, 32768]).
        as_tensors: queries a torch tensor, the answer's arrays torch tensors on its device, as retrieve's
        (the in-process store on that device answers there, without a wait)."""
        if as_tensors:
            queries = _tensor_queries(queries)
            options = dict(nprobe=nprobe, rerank=rerank, ef=ef)
            if self.remote:
                return self.search(namespace, queries, k, return_keys, return_values, return_weights,
                                   **options).to_tensors(queries.device)
            return self._retried("search", namespace, queries, _k(k), return_keys, return_values, return_weights,
                                 **options).to_tensors(queries.device)
        queries = _float_array(queries, "queries")
        k = _k(k)
        value_dim = self._search_value_dim(namespace) if return_values and self.remote else 0
        try:
            return self._search_chunks(namespace, queries, int(k), return_keys, return_values, return_weights,
                                       value_dim, nprobe, rerank, ef)
        except ResourceExhausted:
            # The cached value_dim may be stale (the namespace was dropped and made again, wider).
            if not (return_values and self.remote) or self._search_value_dim(namespace, refresh=True) <= value_dim:
                raise
            return self._search_chunks(namespace, queries, int(k), return_keys, return_values, return_weights,
                                       self._search_value_dim(namespace), nprobe, rerank, ef)

    def _search_value_dim(self, namespace: str, refresh: bool = False) -> int:
        return self._config(namespace, refresh).value_dim

    def _config(self, namespace: str, refresh: bool = False) -> NamespaceConfig:
        """The namespace's config, to size replies: one describe_namespace per namespace."""
        if refresh or namespace not in self._configs:
            self.describe_namespace(namespace)
        return self._configs[namespace]

    def _search_chunks(self, namespace, queries, k, return_keys, return_values, return_weights, value_dim,
                       nprobe=0, rerank=0, ef=0):
        """Splits the batch so that neither a request nor a reply passes half the message limit; a
        reply past CHUNK_BYTES comes in parts (_read).

        Per query, the request carries its row (dim x 2 or 4 bytes) and the reply k slots of id (8),
        distance (4) and token (4) bytes, plus 4 x dim bytes of key, 4 x value_dim of value and 4 of
        weight per slot when asked for (all float32 on the wire)."""
        width = queries.shape[1] if queries.ndim == 2 else 1
        slot_bytes = 16 + 4 * width * return_keys + 4 * value_dim * return_values + 4 * return_weights
        row_bytes = max(queries.itemsize * width, max(k, 1) * slot_bytes) + 64
        read_chunk = READ_CHUNK_BYTES  # (a client that never reads this much never probes for shared memory)
        if self._rows(queries) * row_bytes > READ_CHUNK_BYTES and self.remote and self._store.uses_shared_memory():
            read_chunk = SHARED_READ_CHUNK_BYTES
        chunks = list(self._row_chunks(self._rows(queries), row_bytes, whole_up_to=read_chunk, chunk_bytes=read_chunk))
        if len(chunks) == 1:
            return self._read("search", self._rows(queries) * max(k, 1) * slot_bytes, namespace, queries, k,
                              return_keys, return_values, return_weights, nprobe=nprobe, rerank=rerank, ef=ef)
        into = convert.BatchAnswer(self._rows(queries))
        found = self._pipelined([
            functools.partial(self._read, "search", self._rows(queries[part]) * max(k, 1) * slot_bytes,
                              namespace, queries[part], k, return_keys, return_values, return_weights,
                              nprobe=nprobe, rerank=rerank, ef=ef, into=into, start=part.start)
            for part in chunks])
        return convert.batch_result(into, found, namespace)

    def get(self, namespace: str, ids, return_optimizer_state: bool = False) -> Rows:
        """ids int [N] -> Rows in the same order; NotFound names ids that are not stored.
        return_optimizer_state adds rows.optimizer_state: {column: float32 [N, value_dim], "step": [1]}."""
        ids = _int_array(ids, "ids")
        if not self.remote:
            return self._retried("get", namespace, ids, return_optimizer_state)
        # A reply past CHUNK_BYTES goes in chunks, sized by the namespace's widths where this client knows
        # them (it described the namespace: no call of its own for that); else one call is tried first.
        config = self._configs.get(namespace)
        answer_bytes = 0 if config is None else ids.size * self._get_row_bytes(config, return_optimizer_state)
        if (ids.nbytes < self.max_message_bytes // 4) if config is None else answer_bytes <= CHUNK_BYTES:
            try:  # one that does not fit (or that stale widths misjudged) is asked again in parts
                return self._retried("get", namespace, ids, return_optimizer_state, answer_bytes=answer_bytes)
            except ResourceExhausted:
                pass
        return self._get_chunks(namespace, ids, return_optimizer_state, self._config(namespace, refresh=True))

    @staticmethod
    def _get_row_bytes(config: NamespaceConfig, return_optimizer_state: bool) -> int:
        """A Get reply's bytes per row: its id (8), key (4 x dim), token, weight (4 each), value (4 x
        value_dim), up to 3 optimizer state columns of value_dim and a step (8), and its source (counted
        as 64)."""
        states = 3 * config.value_dim + 2 if return_optimizer_state else 0
        return 8 + 4 * config.dim + 8 + 4 * config.value_dim + 4 * states + 64

    def _get_chunks(self, namespace, ids, return_optimizer_state, config) -> Rows:
        """Splits the ids in chunks of replies of at most CHUNK_BYTES (_get_row_bytes a row)."""
        row_bytes = self._get_row_bytes(config, return_optimizer_state)
        parts = self._pipelined([functools.partial(self._retried, "get", namespace, ids[part], return_optimizer_state,
                                                   answer_bytes=self._rows(ids[part]) * row_bytes)
                                 for part in self._row_chunks(self._rows(ids), row_bytes)])
        if len(parts) == 1:
            return parts[0]
        state = None
        if parts[0].optimizer_state is not None:
            state = {name: np.concatenate([p.optimizer_state[name] for p in parts]) for name in parts[0].optimizer_state}
        return Rows(ids=np.concatenate([p.ids for p in parts]), keys=np.concatenate([p.keys for p in parts]),
                    tokens=np.concatenate([p.tokens for p in parts]),
                    values=None if parts[0].values is None else np.concatenate([p.values for p in parts]),
                    weights=np.concatenate([p.weights for p in parts]),
                    sources=[source for p in parts for source in p.sources], optimizer_state=state)

    def delete(self, namespace: str, ids=None, source: str | None = None, generation: int = 0,
               request_id: str | None = None) -> int:
        """Deletes by ids (unknown ones are ignored) or by source tag ("" deletes the untagged rows);
        returns how many rows went. generation (from a SearchResult, say): only in that incarnation
        of the namespace (FailedPrecondition if it was re-created since). request_id: as in ``add``
        (a repeated call answers the first count)."""
        ids = _int_array(ids, "ids")
        return self._retried("delete", namespace, ids, source, request_id=request_id or validation.new_request_id(),
                             generation=generation)

    # ----- learnable memory ----------------------------------------------------------
    def retrieve(self, namespace: str, queries, k: int, temperature: float = 1.0, *,
                 keep_state: bool = False, nprobe: int = 0, rerank: int = 0, ef: int = 0,
                 as_tensors: bool = False, memory_only: bool = False) -> RetrieveResult:
        """The MoNIM forward next to the data: r.memory float32 [B, value_dim] = sum_i alpha_i v_i,
        with r.ids, r.alpha, r.distances, r.tokens, r.weights [B, k] of the global top-k.
        keep_state: the server keeps what the backward needs under r.handle (for a few minutes), so
        that retrieve_backward sends only grad_memory; MoNIMLayer asks for it when a backward follows.
        nprobe, rerank, ef: as in ``search`` (ivf namespaces; hnsw namespaces).
        as_tensors: queries a torch tensor; the result's arrays are torch tensors on its device. The
        in-process store (":memory:") on that device answers there: nothing goes through the host but
        the finite check's flag, nothing is waited for, and the backward of a kept forward takes and
        returns tensors there too (docs/API.md, "Tensors in and out"). A server's answer is copied
        there once.
        memory_only: r.memory (and r.handle) only, the neighbours' columns None: B x value_dim comes
        back, not B x k x 28 bytes (a MoNIM layer's step needs no more). Its backward goes by the
        handle; if that is gone, FailedPrecondition (the result has no arrays to send: run the forward
        again). A batch split into calls keeps no state, so with keep_state its neighbours come all
        the same (docs/API.md, "The memory alone")."""
        if as_tensors:
            return self._retrieve_tensors(namespace, queries, k, temperature, keep_state=keep_state, nprobe=nprobe,
                                          rerank=rerank, ef=ef, memory_only=memory_only)
        queries = _float_array(queries, "queries")
        width = queries.shape[1] if queries.ndim == 2 else 1
        config = self._configs.get(namespace)  # the memory's width where known (no call of its own for it)
        answer_row_bytes = 4 * (config.value_dim if config is not None else 0) + max(int(k), 1) * 28
        whole_row_bytes = 4 * (config.value_dim if config is not None else 0) if memory_only else answer_row_bytes
        # Whole up to half the message limit (split, a forward keeps no state: its backward then sends
        # its arrays), its answer in parts past CHUNK_BYTES. An answer in parts has no message to fit:
        # only the queries count then (a training batch of B=4096, k=1024 and 1024-wide values answers
        # 134 MB, and stays one forward with its state); without parts, the answer counts too.
        split_row_bytes = 4 * width if self._parts_fit() else max(4 * width, answer_row_bytes)
        chunks = list(self._row_chunks(self._rows(queries), split_row_bytes + 64,
                                       whole_up_to=self.max_message_bytes))
        if len(chunks) == 1:
            return self._read("retrieve", self._rows(queries) * whole_row_bytes, namespace, queries, k, temperature,
                              keep_state=keep_state, nprobe=nprobe, rerank=rerank, ef=ef, memory_only=memory_only)
        into = convert.BatchAnswer(self._rows(queries))  # a split forward keeps no state: its backward sends its arrays
        memory_only = memory_only and not keep_state  # (so it needs them)
        answer_row_bytes = whole_row_bytes if memory_only else answer_row_bytes
        found = self._pipelined([functools.partial(self._read, "retrieve", self._rows(queries[part]) * answer_row_bytes,
                                                   namespace, queries[part], k, temperature, nprobe=nprobe,
                                                   rerank=rerank, ef=ef, memory_only=memory_only, into=into,
                                                   start=part.start)
                                 for part in chunks])
        return dataclasses.replace(convert.batch_result(into, found, namespace), queries=queries, handle="")

    def _retrieve_tensors(self, namespace: str, queries, k: int, temperature: float, **options) -> RetrieveResult:
        queries = _tensor_queries(queries)
        if self.remote:
            return self.retrieve(namespace, queries, k, temperature, **options).to_tensors(queries.device, queries)
        return self._retried("retrieve", namespace, queries, k, temperature, **options).to_tensors(queries.device,
                                                                                                    queries)

    def retrieve_backward(self, namespace: str, result: RetrieveResult, grad_memory,
                          step_id: str | None = None, step_values: bool = True) -> tuple[np.ndarray, float]:
        """Backward of ``retrieve``: the value rows take one optimizer step with dL/dv_i = alpha_i dL/dm;
        returns (grad_queries float32 [B, dim], grad_temperature).

        With result.handle, only grad_memory travels (the server kept the rest); if the server no
        longer has it (expired, evicted, another front end), the forward's arrays are sent instead.
        A step larger than one message goes in parts whose value gradients wait on the shards,
        then one CommitStep applies them as one step (one step stays one step); if a part fails,
        the step is aborted and nothing is stepped. NotFound if a row of the forward was deleted
        since (nothing stepped); FailedPrecondition if the namespace was re-created since.
        step_id: the step's request id (one is made when None): a repeated call with the same one
        (e.g. after the retries gave up) steps once, as a retried ``add`` with its request_id lands once.
        StepAnswerLost (a FailedPrecondition) if that step was committed and a shard no longer has the
        gradients it answered (it restarted, its rows moved, or they aged out): the rows stepped once;
        this step's dL/dq and dL/dT are gone (a training loop skips the batch).
        step_values=False: only the gradients of the queries and T; no value row is stepped (the
        parts are staged, then dropped).
        A result of ``retrieve(..., as_tensors=True)``: grad_memory a torch tensor, and grad_queries one,
        on its device (with the in-process store on that device, the backward runs there)."""
        batch, rows = result.rows, np.shape(grad_memory)[0] if np.ndim(grad_memory) else 0
        if rows != batch and (result.handle or result.tensors):
            # By a handle the server takes a backward in parts by row and cannot tell a short one from a
            # part (the arrays' own backward it refuses itself); this call's is the whole forward's.
            raise InvalidArgument(f"grad_memory has {rows} rows but there are {batch} queries")
        if result.tensors:
            return self._backward_tensors(namespace, result, grad_memory, step_id, step_values)
        grad_memory = _float_array(grad_memory, "grad_memory")
        step_id = step_id or validation.new_request_id()
        if result.handle:
            try:
                return self._backward(namespace, result, grad_memory, step_id, step_values, handle=result.handle)
            except FailedPrecondition as error:
                _check_arrays_to_send(result, error)
        _check_arrays_to_send(result)
        return self._backward(namespace, result, grad_memory, step_id, step_values)

    def _backward_tensors(self, namespace: str, result: RetrieveResult, grad_memory, step_id, step_values: bool):
        """retrieve_backward of an as_tensors result: in-process, by its handle, on the device; else (a
        server; a forward without a handle, or whose handle is gone) its arrays go through the host."""
        if not validation.is_tensor(grad_memory):
            raise InvalidArgument(f"the backward of an as_tensors forward takes grad_memory as a torch tensor, "
                                  f"got {type(grad_memory).__name__}")
        device = grad_memory.device
        if not self.remote and result.handle and step_values:
            step_id = step_id or validation.new_request_id()
            try:
                grad_queries, grad_temperature = self._retried(
                    "retrieve_backward", namespace, None, None, None, None, grad_memory.detach().float(),
                    result.temperature, generation=result.generation, step_id=step_id, handle=result.handle)
                return grad_queries.to(device), grad_temperature
            except FailedPrecondition as error:
                _check_arrays_to_send(result, error)
            result = dataclasses.replace(result, handle="")
        _check_arrays_to_send(result)
        host = dataclasses.replace(result, **{field: getattr(result, field).detach().cpu().numpy()
                                              for field in (*RETRIEVED, "queries") if getattr(result, field) is not None})
        grad_queries, grad_temperature = self.retrieve_backward(namespace, host, grad_memory, step_id, step_values)
        import torch  # an as_tensors caller has it

        return torch.from_numpy(grad_queries).to(device), grad_temperature

    def _backward(self, namespace: str, result: RetrieveResult, grad_memory, step_id: str, step_values: bool,
                  handle: str = ""):
        queries, ids = result.queries, result.ids
        width = queries.shape[1] if getattr(queries, "ndim", 0) == 2 else 1
        k = ids.shape[1] if getattr(ids, "ndim", 0) == 2 else 1
        value_dim = grad_memory.shape[1] if getattr(grad_memory, "ndim", 0) == 2 else 1
        row_bytes = 4 * value_dim + 64 + (0 if handle else queries.itemsize * width + 16 * k)
        # Whole up to half the message limit: a step in parts is staged, then committed (one more call),
        # and a lone shard finishes only a backward sent whole.
        parts = list(self._row_chunks(self._rows(grad_memory if handle else queries), row_bytes,
                                      whole_up_to=self.max_message_bytes))

        def send(part, index, defer):
            if handle:
                start = part.start or 0
                return self._retried("retrieve_backward", namespace, None, None, None, None, grad_memory[part],
                                     result.temperature, generation=result.generation, step_id=step_id, part=index,
                                     defer_step=defer, handle=handle, row_offset=start,
                                     **({"answer_bytes": self._rows(grad_memory[part]) * 4 * width} if self.remote
                                        else {}))
            return self._retried("retrieve_backward", namespace, queries[part], ids[part], result.alpha[part],
                                 result.distances[part], grad_memory[part], result.temperature,
                                 generation=result.generation, step_id=step_id, part=index, defer_step=defer)

        if len(parts) == 1 and step_values:
            return send(slice(None), 0, False)
        try:
            answers = self._pipelined([functools.partial(send, part, index, True) for index, part in enumerate(parts)])
        except MemoryStoreError:
            try:
                self._store.abort_step(namespace, step_id, generation=result.generation)
            except MemoryStoreError:
                pass  # staged parts also expire on the shards
            raise
        finish = "commit_step" if step_values else "abort_step"  # abort: the staged value gradients go
        self._retried(finish, namespace, step_id, generation=result.generation)
        return np.concatenate([g for g, _ in answers]), float(sum(t for _, t in answers))

    def apply_gradients(self, namespace: str, ids, grads, generation: int = 0, request_id: str | None = None) -> int:
        """One optimizer step with value gradients grads float [N, value_dim] for ids int [N] (repeated
        ids are summed); all or nothing (NotFound, changing nothing, if an id is not stored).
        Returns the number of rows updated. More rows than one message holds go in parts that wait
        on the shards, then one CommitStep applies them as one step (as retrieve_backward does).
        request_id: as in ``add`` (a repeated call with the same one steps once)."""
        ids, grads = _int_array(ids, "ids"), _float_array(grads, "grads")
        width = grads.shape[1] if grads.ndim == 2 else 1
        parts = list(self._row_chunks(self._rows(ids), 8 + grads.itemsize * width + 16))
        request_id = validation.check_step_id(request_id or validation.new_request_id())
        if len(parts) == 1:
            return self._retried("apply_gradients", namespace, ids, grads, request_id=request_id,
                                 generation=generation)
        step_id = request_id
        try:
            self._pipelined([functools.partial(self._retried, "apply_gradients", namespace, ids[part], grads[part],
                                               generation=generation, step_id=step_id, part=index, defer_step=True)
                             for index, part in enumerate(parts)])
        except MemoryStoreError:
            try:
                self._store.abort_step(namespace, step_id, generation=generation)
            except MemoryStoreError:
                pass  # staged parts also expire on the shards
            raise
        return self._retried("commit_step", namespace, step_id, generation=generation)

    # ----- snapshots (admin) ----------------------------------------------------------
    def decode(self):
        """A decode stream (model_client/decode.py): search() and retrieve() for one generated token
        at a time over one open stream, with no per-call setup. Close it, or use it in a with block."""
        from monim.model_client.decode import DecodeStream

        return DecodeStream(self)

    def create_snapshot(self, location: str, namespace: str = "") -> dict:
        """Snapshots every namespace (or one) to location, a name under the server's snapshot root;
        returns {location, created_at, shards, rows per namespace, bytes}."""
        return self._store.create_snapshot(location, namespace)

    def list_snapshots(self) -> list[dict]:
        return self._retried("list_snapshots")

    def restore_snapshot(self, location: str, namespace: str = "") -> dict[str, int]:
        """Restores a snapshot into this deployment (any shard count; ids stay); returns rows per
        namespace. The namespaces must not exist (AlreadyExists)."""
        return self._store.restore_snapshot(location, namespace)

    # ----- reshard (admin) -----------------------------------------------------------
    def reshard(self, shards: int, batch_rows: int = 0, timeout_s: float | None = None) -> Iterator[dict]:
        """Moves every namespace to ``shards`` shards while reads and writes go on (docs/OPERATIONS.md,
        "Reshard"), or resumes the move to that count that was interrupted. Yields progress dicts
        (source, target, namespaces_done, namespaces, namespace, ids_done, ids, rows_moved, done);
        stopping the iteration (or the deadline timeout_s; None: none) stops the move at the step
        it reached, and the same call resumes it. Never retried: run it again."""
        if not self.remote:
            for progress in self._store.reshard(shards, batch_rows):
                yield dataclasses.asdict(progress)
            return
        yield from self._store.reshard(shards, batch_rows, timeout_s)

    # ----- lifetime ----------------------------------------------------------------
    def close(self) -> None:
        if self.remote:
            self._store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["MemoryClient", "MemoryStoreError", "NamespaceDescription"]
