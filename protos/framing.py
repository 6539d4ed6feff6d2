"""Messages that carry tensors, serialized with one copy of each tensor's bytes, and parsed with none.

Building a protobuf request copies a tensor's bytes three times before gRPC has them (the array
into ``bytes``, those into the message's field, the message into its serialized form), and a
Tensor passed to a request's constructor copies them once more: for a 400 MB Add, four copies on
the client, measured as the larger part of an Add's time through the service on the GPU host
(docs/BENCHMARKS.md, "The data plane on a GPU"). Here the request's other fields are serialized by
protobuf, and each Tensor field is appended in protobuf's wire format (a length-delimited field
holding the Tensor's dtype and shape, then its data as one length-delimited bytes field). Fields
may come in any order on the wire, so the server parses exactly the message the generated code
would have sent; each tensor's bytes are copied once, by the final join. The server answers the
same way (a Search of 4096 x 1024 neighbours is a 67 MB answer: building and serializing it as a
message cost three copies and most of the call's time on the server), and ``parsed`` reads an
answer's Tensor payloads as views of the received bytes instead of copying them out of a parsed
message twice.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import NamedTuple

import numpy as np
from monim.protos import memory_pb2 as pb
from monim.protos.copies import copy_bytes
from monim.protos.errors import InvalidArgument
from monim.protos.shared_memory import PLACED_MIN_BYTES

WIRE_DTYPES = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "bool": np.dtype("bool"),
}

_LENGTH_DELIMITED = 2
# HTTP/2's largest frame (2^24 - 1 bytes; gRPC's default is 16 KiB): a large message then crosses in
# fewer frames. On an H100 host (16 cores, bare gRPC, both ends set it) a unary call of 12.6 MB up and
# 12.6 MB down took 26.5 instead of 33 ms and a 67 MB answer 63-66 instead of 70-75 ms; on the 2-core
# VM it made no difference (docs/BENCHMARKS.md, "Search split into calls").
MAX_FRAME_BYTES = (1 << 24) - 1
# The largest message a server takes or sends, and a client, unless they are told otherwise.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """The options of both ends of the service's channels: the message limit, each way, and the frame size."""
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.http2.max_frame_size", MAX_FRAME_BYTES)]


def _varint(value: int) -> bytes:
    if value < 0x80:  # a field's key, a small Tensor head's length
        return _ONE_BYTE[value]
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


_ONE_BYTE = [bytes((value,)) for value in range(0x80)]


def _key(number: int) -> bytes:
    return _varint(number << 3 | _LENGTH_DELIMITED)


_DATA_NUMBER = pb.Tensor.DESCRIPTOR.fields_by_name["data"].number
_DATA_KEY = _key(_DATA_NUMBER)


# The dtypes that travel as they are (native little-endian): looked up by the dtype itself, as
# dtype.name is a Python property in numpy 2 (~2.5 us a call on the 2-core VM, per tensor per call).
_WIRE_NAME = {dtype: name for name, dtype in WIRE_DTYPES.items()}


def wire_array(array) -> tuple[str, np.ndarray]:
    """(dtype name, numpy array in the wire's byte order) of what a Tensor carries: a torch tensor
    comes to the host, float64 goes as float32 (not necessarily contiguous: tobytes() and
    protos/framing.py each make one C-order copy). INVALID_ARGUMENT for a dtype that cannot travel."""
    if hasattr(array, "detach"):  # torch.Tensor, without importing torch here
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    name = _WIRE_NAME.get(array.dtype)
    if name is not None:
        return name, array
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    name = array.dtype.name
    if name not in WIRE_DTYPES:
        raise InvalidArgument(f"dtype {name} cannot travel; use one of {', '.join(WIRE_DTYPES)}")
    # astype only copies for a big-endian array.
    return name, array.astype(WIRE_DTYPES[name], copy=False)


# Where the answers of the call this thread serves may put their large tensors (a Placer of the
# client's shared memory region, protos/shared_memory.py), set by the server around each call.
_answer_placer: contextvars.ContextVar = contextvars.ContextVar("answer_placer", default=None)


@contextlib.contextmanager
def answers_placed(placer):
    """serialized() without a placer of its own uses ``placer`` inside (None: none)."""
    token = _answer_placer.set(placer)
    try:
        yield
    finally:
        _answer_placer.reset(token)


def serialized(message, tensors: dict, placer=None) -> bytes:
    """The wire form of ``message`` with each Tensor field named in ``tensors`` set to its array
    (numpy or torch; None leaves the field unset). ``message`` must not set those fields itself.
    placer (protos/shared_memory.Placer; default: the one answers_placed set): a tensor of
    PLACED_MIN_BYTES or more is copied into the shared memory range it hands out, and the message
    names where (Tensor.shared) instead of carrying it, while the range has room."""
    placer = placer if placer is not None else _answer_placer.get()
    fields = message.DESCRIPTOR.fields_by_name
    parts: list = [message.SerializeToString()]
    for name, array in tensors.items():
        if array is None:
            continue
        dtype, array = wire_array(array)
        data = memoryview(np.ascontiguousarray(array)).cast("B") if array.size else b""
        spot = placer.place(len(data)) if placer is not None and len(data) >= PLACED_MIN_BYTES else None
        if spot is not None:
            region, offset, target = spot
            copy_bytes(target, data)
            head = pb.Tensor(dtype=dtype, shape=array.shape,
                             shared=pb.SharedBytes(region=region, offset=offset)).SerializeToString()
            parts += [_key(fields[name].number), _varint(len(head)), head]
            continue
        head = pb.Tensor(dtype=dtype, shape=array.shape).SerializeToString()
        length = _varint(len(data))
        parts += [_key(fields[name].number), _varint(len(head) + len(_DATA_KEY) + len(length) + len(data)),
                  head, _DATA_KEY, length, data]
    return b"".join(parts)


def field(message_class, name: str, inner: bytes) -> bytes:
    """The wire form of a ``message_class`` whose one set field is the message field ``name``, given
    that field's own wire form (a decode step's answer around its Search or Retrieve answer)."""
    number = message_class.DESCRIPTOR.fields_by_name[name].number
    return b"".join([_key(number), _varint(len(inner)), inner])


# A message smaller than this is parsed by protobuf whole: its Tensors' bytes (a decoding step's few
# KB) are copied out of it, which costs less than walking its fields here (~1 against ~12 us for a
# Search answer of one query on the 2-core VM; read into arrays, a Search answer of B=1, k=1024 (16 KB)
# 15.6 against 39.6 us, of B=64, k=32 (33 KB) 17.1 against 28.4, of B=4, k=1024 (66 KB) 31.1 against
# 42.2); larger ones keep their Tensors' bytes in place.
PARSED_WHOLE_BELOW = 1 << 16


class Framed(NamedTuple):
    """A parsed answer: the message with its Tensor fields' dtype and shape but not their data, and
    each such field's data as a view of the received bytes (field name -> memoryview); a message
    under PARSED_WHOLE_BELOW bytes keeps its Tensors' data (payloads: those in shared memory only)."""

    message: object
    payloads: dict


class _Malformed(Exception):
    pass


def _read_varint(view: memoryview, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if position >= len(view) or shift > 63:
            raise _Malformed
        byte = view[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7


def _fields(view: memoryview):
    """(number, wire type, start of the field, end of its key, start of its value, end) of each field
    of a message."""
    position = 0
    while position < len(view):
        start = position
        key, position = _read_varint(view, position)
        key_end = position
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, end = _read_varint(view, position)
        elif wire == 1:
            end = position + 8
        elif wire == 2:
            length, position = _read_varint(view, position)
            end = position + length
        elif wire == 5:
            end = position + 4
        else:
            raise _Malformed
        if end > len(view):
            raise _Malformed
        yield number, wire, start, key_end, position, end
        position = end


def _repeated(field) -> bool:
    return field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED  # protobuf < 6


@functools.cache
def _tensor_fields(message_class) -> dict[int, str]:
    """The message's singular Tensor fields: number -> name."""
    return {f.number: f.name for f in message_class.DESCRIPTOR.fields
            if f.message_type is pb.Tensor.DESCRIPTOR and not _repeated(f)}


def parsed(message_class, data: bytes, shared=None) -> Framed:
    """``data`` (one serialized ``message_class``) parsed with the data of its singular Tensor fields
    left in place (a message under PARSED_WHOLE_BELOW bytes: protobuf parses it whole, its Tensors keep
    their bytes): read them with convert.tensor_from_proto(..., data=payloads.get(name)). Anything
    this reader does not expect (a Tensor field twice, a malformed field) is parsed by protobuf
    whole instead, which raises on what it cannot parse.
    shared(region, offset, size) -> the bytes of a Tensor that names shared memory (Tensor.shared)
    instead of carrying them (a view, or a copy); None: such a Tensor is INVALID_ARGUMENT."""
    tensor_fields = _tensor_fields(message_class)
    if len(data) < PARSED_WHOLE_BELOW:
        return _parsed_whole(message_class, data, tensor_fields, shared)
    view = memoryview(data)
    rest, payloads = [], {}
    try:
        for number, wire, start, key_end, value, end in _fields(view):
            name = tensor_fields.get(number)
            if name is None or wire != 2:
                rest.append(view[start:end])
                continue
            if name in payloads:
                raise _Malformed  # protobuf would merge the two; let it
            head = []
            payloads[name] = b""
            for inner, inner_wire, inner_start, _, inner_value, inner_end in _fields(view[value:end]):
                if inner == _DATA_NUMBER and inner_wire == 2:
                    payloads[name] = view[value + inner_value:value + inner_end]
                else:
                    head.append(view[value + inner_start:value + inner_end])
            head_bytes = b"".join(head)
            rest += [view[start:key_end], _varint(len(head_bytes)), head_bytes]
            if not len(payloads[name]) and head_bytes:
                in_shared_memory = _shared_payload(pb.Tensor.FromString(head_bytes), shared, name)
                if in_shared_memory is not None:
                    payloads[name] = in_shared_memory
    except _Malformed:
        return Framed(message_class.FromString(data), {})
    return Framed(message_class.FromString(b"".join(rest)), payloads)


def _parsed_whole(message_class, data: bytes, tensor_fields: dict, shared) -> Framed:
    """A small message parsed by protobuf whole (its Tensors keep their few bytes): payloads only for
    the Tensors that name shared memory."""
    message = message_class.FromString(data)
    payloads = {}
    for name in tensor_fields.values():
        if message.HasField(name):
            tensor = getattr(message, name)
            if tensor.HasField("shared") and not tensor.data:
                in_shared_memory = _shared_payload(tensor, shared, name)
                if in_shared_memory is not None:
                    payloads[name] = in_shared_memory
    return Framed(message, payloads)


def _shared_payload(tensor, shared, what: str):
    """The bytes a Tensor names in shared memory (None if it names none; a bad dtype or shape is
    left to tensor_from_proto, which says so)."""
    if not tensor.HasField("shared"):
        return None
    dtype = WIRE_DTYPES.get(tensor.dtype)
    if dtype is None or any(size < 0 for size in tensor.shape):
        return None
    if shared is None:
        raise InvalidArgument(f"{what} names shared memory, which is not used on this channel")
    size = math.prod(tensor.shape) * dtype.itemsize
    return shared(tensor.shared.region, tensor.shared.offset, size)
