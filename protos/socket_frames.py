"""The frames of a Decode stream on a server's Unix socket (workers/decode_socket.py): one byte of
kind, four of length (little-endian), the payload.

- HELLO (client, first): JSON [[key, value], ...], the call metadata (its ``authorization``);
- MESSAGE: a serialized DecodeStep (client) or DecodeStepResult (server);
- STATUS (server, last): JSON {"code": status code name, "message": ...}: the stream ended (OK when the
  client closed its side).
"""

from __future__ import annotations

import socket
import struct

from monim.protos.errors import InvalidArgument

HELLO, MESSAGE, STATUS = 1, 2, 3
_HEADER = struct.Struct("<BI")
# A step's request is one batch of queries: far below this (a larger length is a broken peer).
MAX_FRAME_BYTES = 1 << 30
_JOINED_BELOW = 1 << 16  # a payload smaller than this is copied behind its header and sent in one write


def send_frame(sock: socket.socket, kind: int, payload: bytes) -> None:
    header = _HEADER.pack(kind, len(payload))
    if len(payload) < _JOINED_BELOW:
        sock.sendall(header + payload)  # one write: a step's answer is small
    else:
        sock.sendall(header)
        sock.sendall(payload)


def recv_frame(sock: socket.socket) -> tuple[int, bytes] | None:
    """The next frame, or None when the peer closed its side between frames."""
    header = _recv_exactly(sock, _HEADER.size)
    if header is None:
        return None
    kind, length = _HEADER.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise InvalidArgument(f"a decode socket frame of {length} bytes (most: {MAX_FRAME_BYTES})")
    payload = _recv_exactly(sock, length) if length else b""
    if payload is None:
        raise ConnectionError("the peer closed the decode socket inside a frame")
    return kind, payload


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        count = sock.recv_into(view[got:])
        if count == 0:
            if got:
                raise ConnectionError("the peer closed the decode socket inside a frame")
            return None
        got += count
    return bytes(buffer)
