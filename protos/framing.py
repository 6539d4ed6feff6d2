"""Requests that carry tensors, serialized with one copy of each tensor's bytes.

Building a protobuf request copies a tensor's bytes three times before gRPC has them (the array
into ``bytes``, those into the message's field, the message into its serialized form), and a
Tensor passed to a request's constructor copies them once more: for a 400 MB Add, four copies on
the client, measured as the larger part of an Add's time through the service on the GPU host
(docs/BENCHMARKS.md, "The data plane on a GPU"). Here the request's other fields are serialized by
protobuf, and each Tensor field is appended in protobuf's wire format (a length-delimited field
holding the Tensor's dtype and shape, then its data as one length-delimited bytes field). Fields
may come in any order on the wire, so the server parses exactly the message the generated code
would have sent; each tensor's bytes are copied once, by the final join.
"""

from __future__ import annotations

import numpy as np
from monim.protos import convert
from monim.protos import memory_pb2 as pb

_LENGTH_DELIMITED = 2


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(number: int) -> bytes:
    return _varint(number << 3 | _LENGTH_DELIMITED)


_DATA_KEY = _key(pb.Tensor.DESCRIPTOR.fields_by_name["data"].number)


def serialized_request(message, tensors: dict) -> bytes:
    """The wire form of ``message`` with each Tensor field named in ``tensors`` set to its array
    (numpy or torch; None leaves the field unset). ``message`` must not set those fields itself."""
    fields = message.DESCRIPTOR.fields_by_name
    parts: list = [message.SerializeToString()]
    for name, array in tensors.items():
        if array is None:
            continue
        dtype, array = convert.wire_array(array)
        head = pb.Tensor(dtype=dtype, shape=array.shape).SerializeToString()
        data = memoryview(np.ascontiguousarray(array)).cast("B") if array.size else b""
        length = _varint(len(data))
        parts += [_key(fields[name].number), _varint(len(head) + len(_DATA_KEY) + len(length) + len(data)),
                  head, _DATA_KEY, length, data]
    return b"".join(parts)
