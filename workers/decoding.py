"""MemoryService's handlers with request deserializers that never raise.

grpc answers INTERNAL "Exception deserializing request!" for bytes that are not the method's
request message, before any of our code runs. Here the deserializer answers an empty request
instead and remembers it as undecodable; the method then answers INVALID_ARGUMENT naming the
message and why it did not decode (interceptors, auth among them, see the empty request first:
a caller without a token still gets UNAUTHENTICATED). A remembered request is held (so its id
cannot be reused) until its method sees it, at most MAX_PENDING of them.

A request with Tensor fields is parsed with their bytes left in place (protos/framing.parsed): the
servicer reads them as read-only arrays over the received bytes, with no copy (protobuf's parse
and each read of a bytes field would copy them twice).
"""

from __future__ import annotations

import collections
import threading

import grpc
from google.protobuf.message import DecodeError
from monim.protos import framing, shared_memory
from monim.protos import memory_pb2 as pb
from monim.protos.errors import InvalidArgument

MAX_PENDING = 1024
SERVICE = pb.DESCRIPTOR.services_by_name["MemoryService"]

_pending: collections.OrderedDict[int, tuple[object, str]] = collections.OrderedDict()
_lock = threading.Lock()


class ParsedRequest:
    """A request parsed by framing.parsed: it reads as its message (``request.namespace``,
    ``request.HasField(...)``); ``payloads`` holds its Tensor fields' bytes (field name -> view)."""

    __slots__ = ("message", "payloads")

    def __init__(self, message, payloads: dict):
        self.message, self.payloads = message, payloads

    def __getattr__(self, name):
        return getattr(self.message, name)


def payloads_of(request) -> dict | None:
    """The Tensor bytes framing.parsed left out of the request (None for a message parsed whole)."""
    return request.payloads if isinstance(request, ParsedRequest) else None


def _has_tensor_fields(message_class) -> bool:
    return any(field.message_type is pb.Tensor.DESCRIPTOR for field in message_class.DESCRIPTOR.fields)


def _deserializer(message_class):
    in_place = _has_tensor_fields(message_class)

    def deserialize(data: bytes):
        try:
            if in_place:
                return ParsedRequest(*framing.parsed(message_class, data, shared=shared_memory.copied))
            return message_class.FromString(data)
        except (DecodeError, InvalidArgument) as error:
            request = message_class()
            problem = (str(error) if isinstance(error, InvalidArgument) else
                       f"the request is not a valid {message_class.__name__} message ({len(data)} bytes): {error}")
            with _lock:
                _pending[id(request)] = (request, problem)
                while len(_pending) > MAX_PENDING:
                    _pending.popitem(last=False)
            return request

    return deserialize


def undecodable(request) -> str | None:
    """Why this request did not decode (once: the record is dropped), or None if it did."""
    with _lock:
        held = _pending.get(id(request))
        if held is None or held[0] is not request:
            return None
        del _pending[id(request)]
        return held[1]


def _answer_placer(context):
    """Where the call's answer may put its large tensors: the client's shared memory region that its
    metadata names (protos/shared_memory.py), or None."""
    for key, value in context.invocation_metadata() or ():
        if key == shared_memory.ANSWER_REGION_KEY:
            try:
                return shared_memory.answer_placer(value)
            except InvalidArgument as error:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message)
    return None


def _refuse_undecodable(request, context) -> None:
    problem = undecodable(request)
    if problem is not None:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)


def _checked(behavior):
    def handle(request, context):
        _refuse_undecodable(request, context)
        with framing.answers_placed(_answer_placer(context)):
            return behavior(request, context)

    return handle


def _checked_parts(behavior):
    """_checked for a method that answers a stream of messages (each framed as it goes out)."""
    def handle(request, context):
        _refuse_undecodable(request, context)
        placer = _answer_placer(context)
        answers = behavior(request, context)
        while True:
            with framing.answers_placed(placer):
                answer = next(answers, None)
            if answer is None:
                return
            yield answer

    return handle


def _serialize(response) -> bytes:
    """An answer the servicer framed already (protos/framing.py: answers with tensors) as it is, any
    other message serialized by protobuf."""
    return response if isinstance(response, bytes) else response.SerializeToString()


def add_memory_service(servicer, server: grpc.Server, methods: frozenset[str] | None = None) -> None:
    """Registers the servicer's methods on the server: unary-unary ones, stream-stream ones (Decode),
    whose servicer method checks each message with undecodable(), and unary-stream ones (Reshard).
    methods: only these (a shard's read endpoint serves Decode alone; gRPC answers UNIMPLEMENTED
    for the others); None: all of them."""
    handlers = {method.name: method_handler(servicer, method.name) for method in SERVICE.methods
                if methods is None or method.name in methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))


def method_handler(servicer, name: str) -> grpc.RpcMethodHandler:
    """The servicer's method as gRPC serves it: stream-stream (Decode), whose servicer method checks
    each message with undecodable(); unary-stream (Reshard: one request, a stream of progress;
    SearchParts, RetrieveParts); unary-unary (the rest)."""
    method = SERVICE.methods_by_name[name]
    request = getattr(pb, method.input_type.name)
    if method.client_streaming and method.server_streaming:
        return grpc.stream_stream_rpc_method_handler(
            getattr(servicer, name), request_deserializer=_deserializer(request), response_serializer=_serialize)
    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(
            _checked_parts(getattr(servicer, name)), request_deserializer=_deserializer(request),
            response_serializer=_serialize)
    return grpc.unary_unary_rpc_method_handler(
        _checked(getattr(servicer, name)), request_deserializer=_deserializer(request), response_serializer=_serialize)


class _CallDetails(grpc.HandlerCallDetails):
    def __init__(self, method: str):
        self.method, self.invocation_metadata = method, ()


def intercepted_handler(servicer, name: str, interceptors) -> grpc.RpcMethodHandler:
    """The handler a grpc.Server built with these interceptors runs for the method (the first
    interceptor outermost, as gRPC applies them): for serving it outside gRPC (workers/host_socket.py)."""
    details = _CallDetails(f"/{SERVICE.full_name}/{name}")

    def continuation(index: int):
        if index == len(interceptors):
            return lambda _: method_handler(servicer, name)
        return lambda call: interceptors[index].intercept_service(continuation(index + 1), call)

    return continuation(0)(details)
