"""The frames on a server's Unix socket for clients on its host (workers/host_socket.py): one byte of
kind, four of length (little-endian), the payload. A connection carries one Decode stream or calls.

A Decode stream:
- HELLO (client, first): JSON [[key, value], ...], the call metadata (its ``authorization``);
- MESSAGE: a serialized DecodeStep (client) or DecodeStepResult (server);
- STATUS (server, last): JSON {"code": status code name, "message": ..., "trailing": [[key, value]]}:
  the stream ended (OK when the client closed its side).

Calls, one after another (a client keeps the connection for its next call):
- CALLS (client, first; empty);
- CALL (client): a call_payload: its header (JSON {"method", "metadata": [[key, value]], "timeout":
  seconds or null}) and its serialized request;
- the answer (server): a unary call's MESSAGE (its reply), or a STATUS (its error); a call answered in
  parts (SearchParts, RetrieveParts) MESSAGEs, then a STATUS (OK, or the error that ended it).
"""

from __future__ import annotations

import json
import socket
import struct
import time

from monim.protos.errors import InvalidArgument

HELLO, MESSAGE, STATUS, CALLS, CALL = 1, 2, 3, 4, 5
# Methods that stay on gRPC: Reshard streams a long admin's move that stops when its client goes;
# Decode has streams of its own here; ProbeSharedMemory is how a client learns of the socket.
NOT_CALLED_HERE = frozenset({"Reshard", "Decode", "ProbeSharedMemory"})
# The trailing metadata key of the status a server sends a connection it will not serve (too many at
# once), before it read anything from it: the connection's call or stream never ran.
REFUSED_KEY = "monim-socket-refused"
_HEADER_LENGTH = struct.Struct("<I")
_HEADER = struct.Struct("<BI")
# A step's request is one batch of queries: far below this (a larger length is a broken peer).
MAX_FRAME_BYTES = 1 << 30
_JOINED_BELOW = 1 << 16  # a payload smaller than this is copied behind its header and sent in one write


def send_frame(sock: socket.socket, kind: int, payload) -> None:
    """payload: bytes, or a list of buffers that are the payload one after another (sent as they are:
    a call's header and its request of 200 KB are not joined into a third copy first)."""
    # Byte views, made once: their sizes (len of a memoryview counts its items) and what is sent.
    views = [memoryview(piece).cast("B") for piece in (payload if isinstance(payload, list) else [payload])]
    size = sum(view.nbytes for view in views)
    header = _HEADER.pack(kind, size)
    if size < _JOINED_BELOW:
        sock.sendall(b"".join([header, *views]))  # one write: a step's answer is small
    else:
        _send_all(sock, [memoryview(header), *views])


def _send_all(sock: socket.socket, views: list) -> None:
    """sendall of the byte views in order, gathered by sendmsg (one system call where the socket takes them)."""
    views = [view for view in views if view.nbytes]
    while views:
        sent = sock.sendmsg(views)
        while sent:
            if sent >= len(views[0]):
                sent -= len(views.pop(0))
            else:
                views[0], sent = views[0][sent:], 0


def recv_frame(sock: socket.socket) -> tuple[int, bytes | memoryview] | None:
    """The next frame, or None when the peer closed its side between frames. A payload of
    _JOINED_BELOW bytes or more is a read-only view of the buffer it was received into (not copied
    again: a 67 MB answer's copy cost milliseconds); a smaller one is bytes."""
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


def spin_until_readable(sock: socket.socket, spin_s: float) -> bool:
    """Polls sock, without sleeping, for up to spin_s until it has bytes to read: True then, or when the
    spin ends without them (a blocking read follows); False if the peer closed it leaving nothing to
    read. The socket is non-blocking meanwhile (one with a timeout would wait for readiness before each
    read). A frame that comes within the spin is read without the wake-up of a sleeping thread."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    ends = time.perf_counter() + spin_s
    try:
        while True:
            try:
                return bool(sock.recv(1, socket.MSG_PEEK))
            except (BlockingIOError, InterruptedError):
                if time.perf_counter() >= ends:
                    return True
    finally:
        sock.settimeout(timeout)


def _recv_exactly(sock: socket.socket, size: int) -> bytes | memoryview | None:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        count = sock.recv_into(view[got:])
        if count == 0:
            if got:
                raise ConnectionError("the peer closed the decode socket inside a frame")
            return None
        got += count
    return bytes(buffer) if size < _JOINED_BELOW else view.toreadonly()


def call_payload(header: dict, request: bytes) -> list:
    """A CALL frame's payload (send_frame's buffers): the header's JSON behind its length, then the request."""
    encoded = json.dumps(header).encode()
    return [_HEADER_LENGTH.pack(len(encoded)) + encoded, request]


def split_call(payload: bytes) -> tuple[dict, memoryview]:
    """call_payload's (header, request); InvalidArgument for a payload that is not one."""
    view = memoryview(payload)
    if len(view) < _HEADER_LENGTH.size:
        raise InvalidArgument("a call frame without its header")
    (length,) = _HEADER_LENGTH.unpack(view[:_HEADER_LENGTH.size])
    end = _HEADER_LENGTH.size + length
    try:
        header = json.loads(bytes(view[_HEADER_LENGTH.size:end]))
    except ValueError:
        raise InvalidArgument("a call frame whose header is not JSON") from None
    if len(view) < end or not isinstance(header, dict) or not isinstance(header.get("method"), str):
        raise InvalidArgument("a call frame whose header names no method")
    return header, view[end:]


def status_payload(code: str, message: str, trailing=()) -> bytes:
    return json.dumps({"code": code, "message": message, "trailing": [list(pair) for pair in trailing]}).encode()
