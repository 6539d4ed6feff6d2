"""MemoryServiceServicer: decodes requests, calls the router, encodes replies.

A reply that carries tensors (Add, Search, Get, Retrieve, RetrieveBackward, a decode step's) is
returned already serialized, framed with one copy of each tensor's bytes (protos/framing.py);
workers/decoding.py's serializer passes such bytes through and serializes every other reply."""

from __future__ import annotations

import logging

import grpc
from monim.protos import convert, framing, shared_memory
from monim.protos import memory_pb2 as pb
from monim.protos import memory_pb2_grpc as pb_grpc
from monim.protos.config import DEFAULT_ADMIT_BELOW
from monim.protos.errors import FailedPrecondition, InvalidArgument
from monim.workers.auth import authorize_step, caller_name
from monim.workers.decoding import payloads_of, undecodable
from monim.workers.router import Router
from monim.workers.status import grpc_errors, status_of

log = logging.getLogger(__name__)


def _required(message, field: str, what: str | None = None):
    """The field's array, read-only: a request's arrays are only read (by the router, and by the shards,
    which read Ray's read-only arrays too), so they stay views of the received bytes."""
    if not message.HasField(field):
        raise InvalidArgument(f"{what or field} is missing from the request")
    return convert.tensor_from_proto(getattr(message, field), what or field, writable=False,
                                     data=(payloads_of(message) or {}).get(field))


def _optional(message, field: str):
    """The field's array, read-only (as _required's), or None when the request does not carry it."""
    return convert.optional_tensor(message, field, writable=False, payloads=payloads_of(message))


def _merge_eps(request) -> float:
    return request.merge_eps if request.HasField("merge_eps") else 0.0


class MemoryServicer(pb_grpc.MemoryServiceServicer):
    """Every call runs under the client's deadline (shard calls not started by then are cancelled).

    read_endpoints: the options of the shards' read endpoints (workers/read_endpoint.py), which
    ReadEndpoints starts and names; None: this server names none. max_message_bytes: the server's
    message limit; an answer in parts (SearchParts, RetrieveParts) sends messages of at most
    convert.ANSWER_PART_BYTES or half that limit, whichever is less."""

    def __init__(self, router: Router, read_endpoints=None, max_message_bytes: int | None = None):
        self.router = router
        self.read_endpoints = read_endpoints
        self.max_message_bytes = max_message_bytes
        self.host_socket = ""  # the path of this server's HostSocket, named to clients that pass the probe

    def _part_bytes(self) -> int:
        part = convert.ANSWER_PART_BYTES
        return part if self.max_message_bytes is None else min(part, self.max_message_bytes // 2)

    @grpc_errors
    def CreateNamespace(self, request, context):
        config = self.router.create_namespace(convert.config_from_proto(request.config), request.request_id)
        return pb.CreateNamespaceResponse(config=convert.config_to_proto(config))

    @grpc_errors
    def ListNamespaces(self, request, context):
        return pb.ListNamespacesResponse(
            namespaces=[convert.config_to_proto(c) for c in self.router.list_namespaces()])

    @grpc_errors
    def DescribeNamespace(self, request, context):
        description = self.router.describe_namespace(request.namespace)
        return pb.DescribeNamespaceResponse(
            config=convert.config_to_proto(description["config"]),
            rows=description["rows"],
            next_id=description["next_id"],
            shards=[pb.ShardStats(shard=s["shard"], rows=s["rows"], device=s["device"], backend=s["backend"],
                                  state=s["state"], memory_used_bytes=s.get("memory_used", 0),
                                  memory_budget_bytes=s.get("memory_budget", 0),
                                  index_state=s.get("index_state", ""), index_trainings=s.get("index_trainings", 0),
                                  index_tombstones=s.get("index_tombstones", 0), index_drift=s.get("index_drift", 0.0),
                                  index_unindexed=s.get("index_unindexed", 0))
                    for s in description["shards"]],
        )

    @grpc_errors
    def DropNamespace(self, request, context):
        return pb.DropNamespaceResponse(rows_dropped=self.router.drop_namespace(request.namespace))

    @grpc_errors
    def Add(self, request, context):
        result = self.router.add(
            request.namespace,
            keys=_required(request, "keys"),
            tokens=_required(request, "tokens"),
            values=_optional(request, "values"),
            weights=_optional(request, "weights"),
            source=request.source,
            logp=_optional(request, "logp"),
            admit_below=request.admit_below if request.HasField("admit_below") else DEFAULT_ADMIT_BELOW,
            merge_eps=_merge_eps(request),
            request_id=request.request_id,
            generation=request.generation,
        )
        return convert.add_result_to_wire(result)

    @grpc_errors
    def Search(self, request, context):
        return self._search(request)

    def _search(self, request) -> bytes:
        return convert.search_result_to_wire(self._searched(request))

    def _searched(self, request):
        return self.router.search(
            request.namespace, _required(request, "queries"), request.k,
            return_keys=request.return_keys, return_values=request.return_values,
            return_weights=request.return_weights, generation=request.generation, nprobe=request.nprobe,
            rerank=request.rerank, ef=request.ef,
        )

    def SearchParts(self, request, context):
        """Search, its answer in messages of consecutive rows (convert.ANSWER_PART_BYTES, 4 MiB, each at most):
        one search of the batch, each part framed as the one before goes out."""
        yield from convert.search_result_parts_to_wire(self._searched_with_status(request, context), self._part_bytes())

    @grpc_errors
    def _searched_with_status(self, request, context):
        return self._searched(request)

    @grpc_errors
    def Get(self, request, context):
        return convert.rows_to_wire(self.router.get(request.namespace, _required(request, "ids"),
                                                     request.return_optimizer_state, generation=request.generation))

    @grpc_errors
    def Delete(self, request, context):
        ids = _optional(request, "ids")
        source = request.source if request.HasField("source") else None
        return pb.DeleteResponse(deleted=self.router.delete(request.namespace, ids=ids, source=source,
                                                            request_id=request.request_id,
                                                            generation=request.generation))

    @grpc_errors
    def Retrieve(self, request, context):
        return self._retrieve(request)

    def _retrieve(self, request) -> bytes:
        return convert.retrieve_result_to_wire(self._retrieved(request))

    def _retrieved(self, request):
        return self.router.retrieve(request.namespace, _required(request, "queries"), request.k,
                                    request.temperature, generation=request.generation,
                                    keep_state=request.keep_state, nprobe=request.nprobe, rerank=request.rerank,
                                    ef=request.ef, memory_only=request.memory_only)

    def RetrieveParts(self, request, context):
        """Retrieve, its answer in parts as SearchParts' (the handle, with keep_state, in each)."""
        yield from convert.retrieve_result_parts_to_wire(self._retrieved_with_status(request, context),
                                                         self._part_bytes())

    @grpc_errors
    def _retrieved_with_status(self, request, context):
        return self._retrieved(request)

    @grpc_errors
    def RetrieveBackward(self, request, context):
        forward = (_optional if request.handle else _required)
        grad_queries, grad_temperature = self.router.retrieve_backward(
            request.namespace, forward(request, "queries"), forward(request, "ids"),
            forward(request, "alpha"), forward(request, "distances"), _required(request, "grad_memory"),
            request.temperature, generation=request.generation, step_id=request.step_id, part=request.part,
            defer_step=request.defer_step, handle=request.handle, row_offset=request.row_offset)
        return framing.serialized(pb.RetrieveBackwardResponse(grad_temperature=grad_temperature),
                                  {"grad_queries": grad_queries})

    @grpc_errors
    def ApplyGradients(self, request, context):
        rows = self.router.apply_gradients(request.namespace, _required(request, "ids"), _required(request, "grads"),
                                           request_id=request.request_id, generation=request.generation,
                                           step_id=request.step_id, part=request.part, defer_step=request.defer_step)
        return pb.ApplyGradientsResponse(rows_updated=rows)

    @grpc_errors
    def CommitStep(self, request, context):
        rows = self.router.commit_step(request.namespace, request.step_id, generation=request.generation)
        return pb.CommitStepResponse(rows_updated=rows)

    @grpc_errors
    def AbortStep(self, request, context):
        self.router.abort_step(request.namespace, request.step_id, generation=request.generation)
        return pb.AbortStepResponse()

    # ----- snapshots (admin) -------------------------------------------------------------
    @grpc_errors
    def CreateSnapshot(self, request, context):
        info = self.router.create_snapshot(request.location, request.namespace)
        return pb.CreateSnapshotResponse(snapshot=pb.SnapshotInfo(**info))

    @grpc_errors
    def ListSnapshots(self, request, context):
        return pb.ListSnapshotsResponse(snapshots=[pb.SnapshotInfo(**info) for info in self.router.list_snapshots()])

    @grpc_errors
    def RestoreSnapshot(self, request, context):
        return pb.RestoreSnapshotResponse(rows=self.router.restore_snapshot(request.location, request.namespace))

    # ----- decoding ----------------------------------------------------------------------
    def Decode(self, request_iterator, context):
        """A decode stream: each step (a Search or a Retrieve) answered in order; a step that fails
        is answered with its code and message, and the stream goes on. The stream's deadline, if the
        client set one, bounds every step."""
        for step in request_iterator:
            yield self._decode_step(step, context)

    @grpc_errors
    def ProbeSharedMemory(self, request, context):
        """Reads the client's region's first 32 bytes and writes them back reversed after them
        (protos/shared_memory.py): FAILED_PRECONDITION where this server cannot use the region."""
        if not shared_memory.enabled():
            raise FailedPrecondition(f"shared memory is turned off on this server ({shared_memory.ENV}=0)")
        try:
            region = shared_memory.server_regions().get(request.region)
            region.view(32, 32)[:] = bytes(region.view(0, 32))[::-1]
        except InvalidArgument as error:
            raise FailedPrecondition(f"this server cannot use the region: {error.message}") from None
        return pb.ProbeSharedMemoryResponse(host_socket=self.host_socket)

    @grpc_errors
    def ReadEndpoints(self, request, context):
        """The shards' read endpoints, started where they are not up (empty: none are served)."""
        if self.read_endpoints is None:
            return pb.ReadEndpointsResponse()
        return pb.ReadEndpointsResponse(targets=self.router.runtime.read_endpoints(self.read_endpoints))

    def _decode_step(self, step, context) -> bytes | pb.DecodeStepResult:
        kind = step.WhichOneof("step")
        try:
            problem = undecodable(step)
            if problem is not None:
                raise InvalidArgument(problem)
            with self.router.deadline(context.time_remaining()):
                if kind == "search":
                    authorize_step("Search", step.search.namespace)
                    return framing.field(pb.DecodeStepResult, "search", self._search(step.search))
                if kind == "retrieve":
                    authorize_step("Retrieve", step.retrieve.namespace)
                    if step.retrieve.keep_state:
                        raise InvalidArgument("a decode stream keeps no forward state: keep_state must be false "
                                              "(a training step's Retrieve goes through the Retrieve call)")
                    return framing.field(pb.DecodeStepResult, "retrieve", self._retrieve(step.retrieve))
                raise InvalidArgument("a decode step holds neither a search nor a retrieve")
        except Exception as error:  # noqa: BLE001 - every error becomes the step's status
            code, message = status_of(error)
            if code == grpc.StatusCode.INTERNAL:
                caller = caller_name()
                log.exception("a Decode step failed%s", f" (token {caller!r})" if caller else "")
            return pb.DecodeStepResult(code=code.value[0], message=message)

    def Reshard(self, request, context):
        """Streams the reshard's progress (workers/reshard.py). A client that goes away closes the
        stream, which stops the move at the step it reached (the same call resumes it)."""
        try:
            for progress in self.router.reshard(request.shards, request.batch_rows):
                yield pb.ReshardProgress(
                    source_shards=progress.source, target_shards=progress.target,
                    namespaces_done=progress.namespaces_done, namespaces=progress.namespaces,
                    namespace=progress.namespace, ids_done=progress.ids_done, ids=progress.ids,
                    rows_moved=progress.rows_moved, done=progress.done)
        except Exception as error:  # noqa: BLE001 - every error becomes a status
            code, message = status_of(error)
            if code.name == "INTERNAL":
                log.exception("Reshard failed")
            context.abort(code, message)
