"""Decode streams: a generating model's memory reads, one step per token, on one open stream.

    with client.decode() as stream:
        for step in range(steps):
            found = stream.search("ns", hidden, k=32, return_weights=True)   # or stream.retrieve(...)

Each step is sent and answered before the next (a generating model needs the answer to make its
next token), over the ``Decode`` RPC: no per-call setup, metadata or deadline per step. A step
that fails raises its typed error (the stream stays open). If the stream itself breaks
(UNAVAILABLE: the front end went away or drains), the step is sent again on a new stream, with the
client's retries and backoff: steps only read, so sending one twice changes nothing.

Where the stream goes: to the shard read endpoint the client reads through
(model_client/read_routing.py), if the server names them and the client allows it
(``MemoryClient(read_endpoints=True)``, the default): there a step makes no hop from the front end
to a shard. If that endpoint cannot be reached or breaks, the step goes to the front end at once,
without a wait or a retry, and the client's reads stay there for a while. ``DecodeStream.target``
says where the last step went.

For the in-process store (``MemoryClient(":memory:")``) the same object calls the store directly.
"""

from __future__ import annotations

import queue
import random
import threading
import time

import grpc
from monim.model_client.client import _float_array, _k, _tensor_queries
from monim.model_client.errors import ERRORS_BY_CODE, InternalError, error_from_rpc
from monim.model_client.host_socket import NoSocket, SocketFull, SocketStream
from monim.protos import convert
from monim.protos import memory_pb2 as pb
from monim.protos import memory_pb2_grpc as pb_grpc
from monim.protos.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from monim.protos.results import RetrieveResult, SearchResult

_END = object()  # closes the request iterator of a stream
_STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def _step_error(result: pb.DecodeStepResult):
    name = _STATUS_NAMES.get(result.code, "UNKNOWN")
    error = ERRORS_BY_CODE.get(name, InternalError)(result.message or name)
    error.status_code = name
    return error


class _Stream:
    """One open Decode call: requests go in through a queue, results come out in order."""

    def __init__(self, stub, metadata, tls: bool):
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._results = stub.Decode(iter(self._requests.get, _END), metadata=metadata)
        self._tls = tls

    def step(self, request: pb.DecodeStep) -> pb.DecodeStepResult:
        self._requests.put(request)
        try:
            return next(self._results)
        except StopIteration:  # the server ended the stream without a status: treat as gone
            raise Unavailable("the decode stream ended") from None
        except grpc.RpcError as error:
            raise error_from_rpc(error, self._tls) from None

    def close(self) -> None:
        self._requests.put(_END)
        self._results.cancel()


class _OnSocket:
    """A Decode stream on the server's host socket (model_client/host_socket.py), its errors typed."""

    def __init__(self, path: str, metadata, timeout_s: float):
        self._stream = SocketStream(path, metadata, timeout_s)

    def step(self, request: pb.DecodeStep) -> pb.DecodeStepResult:
        try:
            return self._stream.step(request)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None

    def close(self) -> None:
        self._stream.close()


class DecodeStream:
    """``MemoryClient.decode()``: search() and retrieve() as the client's, each one step of a stream.

    Not shared between threads: steps of one stream are answered in order, one at a time (a lock
    keeps two threads from interleaving them). close() ends the stream; so does a ``with`` block."""

    def __init__(self, client):
        self._client = client
        self._lock = threading.Lock()
        self._stream: _Stream | None = None
        self._closed = False
        self._unary = False  # the server refused a stream (it has as many as it takes): calls instead
        self._socket_full = False  # the server's socket turned this stream away: it goes over gRPC
        self._on_endpoint = False  # whether _stream goes to a shard's read endpoint
        self.target = ""  # "host:port" the last step went to: the front end or a shard's endpoint
        self.transport = ""  # how: "socket" (the server's Unix socket, on its host) or "grpc"

    # ----- the two reads ---------------------------------------------------------------------
    def search(self, namespace: str, queries, k: int, return_keys: bool = False, return_values: bool = False,
               return_weights: bool = False, *, nprobe: int = 0, rerank: int = 0, ef: int = 0,
               as_tensors: bool = False) -> SearchResult:
        """As MemoryClient.search, for one decoding step (one batch of queries); as_tensors as there."""
        if not self._client.remote:
            return self._client.search(namespace, queries, k, return_keys, return_values, return_weights,
                                       nprobe=nprobe, rerank=rerank, ef=ef, as_tensors=as_tensors)
        tensor = _tensor_queries(queries) if as_tensors else None
        queries = _float_array(queries if tensor is None else tensor, "queries")
        step = pb.DecodeStep(search=pb.SearchRequest(
            namespace=namespace, queries=convert.tensor_to_proto(queries), k=_k(k), return_keys=return_keys,
            return_values=return_values, return_weights=return_weights, nprobe=nprobe, rerank=rerank, ef=ef))
        found = convert.search_result_from_proto(self._send(step).search)
        return found if tensor is None else found.to_tensors(tensor.device)

    def retrieve(self, namespace: str, queries, k: int, temperature: float = 1.0, *, nprobe: int = 0,
                 rerank: int = 0, ef: int = 0, as_tensors: bool = False, memory_only: bool = False) -> RetrieveResult:
        """As MemoryClient.retrieve, for one decoding step (no backward follows: no state is kept).
        as_tensors, memory_only: as there (the step's answer copied to the queries' device once)."""
        if not self._client.remote:
            return self._client.retrieve(namespace, queries, k, temperature, nprobe=nprobe, rerank=rerank, ef=ef,
                                         as_tensors=as_tensors, memory_only=memory_only)
        tensor = _tensor_queries(queries) if as_tensors else None
        queries = _float_array(queries if tensor is None else tensor, "queries")
        step = pb.DecodeStep(retrieve=pb.RetrieveRequest(
            namespace=namespace, queries=convert.tensor_to_proto(queries), k=_k(k), temperature=temperature,
            nprobe=nprobe, rerank=rerank, ef=ef, memory_only=memory_only))
        result = convert.retrieve_result_from_proto(self._send(step).retrieve, queries, temperature)
        return result if tensor is None else result.to_tensors(tensor.device, tensor)

    # ----- the stream ----------------------------------------------------------------------------
    def _send(self, step: pb.DecodeStep) -> pb.DecodeStepResult:
        """One step, answered; the stream is opened (again) as needed, up to the client's retries."""
        client = self._client
        with self._lock:
            if self._closed:
                raise InvalidArgument("this decode stream is closed")
            if self._unary:
                return self._unary_step(step)
            attempt = 0
            while True:
                if self._stream is None:
                    self._stream = self._open()
                try:
                    result = self._stream.step(step)
                except SocketFull:  # the socket serves as many connections as it takes: a gRPC stream
                    self._stream.close()
                    self._stream, self._socket_full = None, True
                    continue
                except (Unavailable, DeadlineExceeded, ResourceExhausted, Unauthenticated) as error:
                    self._stream.close()
                    self._stream = None
                    if self._on_endpoint:  # the endpoint is gone, full or unreachable: the front end takes the step
                        self._client._store.read_routing.failed(self.target)
                        continue
                    if isinstance(error, ResourceExhausted):
                        if "decode streams are open" not in error.message:
                            raise
                        self._unary = True  # the server takes no more streams: this one sends calls instead
                        return self._unary_step(step)
                    if isinstance(error, Unauthenticated) or attempt == client.retries:
                        raise
                    time.sleep(client.backoff_s * (2**attempt) * (1 + random.random()))
                    attempt += 1
                    continue
                if result.code != 0:
                    raise _step_error(result)
                return result

    def _open(self) -> _Stream:
        """A new stream: to the read endpoint the client reads through, else to the front end."""
        client, store = self._client, self._client._store
        endpoint = store.read_routing.target()
        self._on_endpoint = endpoint is not None
        self.target = endpoint or client.target
        path = None if self._socket_full else store.host_socket(self.target)
        if path is not None:
            try:
                stream = _OnSocket(path, store.metadata, store.timeout_s)
                self.transport = "socket"
                return stream
            except NoSocket:  # gone, or this process cannot reach it (another mount namespace): gRPC
                store.forget_host_socket(self.target)
        self.transport = "grpc"
        channel = store.endpoint_channel(endpoint) if endpoint is not None else store.channel
        return _Stream(pb_grpc.MemoryServiceStub(channel), store.metadata, store.tls)

    def _unary_step(self, step: pb.DecodeStep) -> pb.DecodeStepResult:
        """The step as a Search or Retrieve call of its own (with the client's retries)."""
        kind = step.WhichOneof("step")
        answer = self._client._retried("_call", "Search" if kind == "search" else "Retrieve", getattr(step, kind))
        return pb.DecodeStepResult(**{kind: answer})

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._stream is not None:
                self._stream.close()
                self._stream = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
