"""The client's end of a server's Unix socket for clients on its host (workers/host_socket.py; the
frames: protos/socket_frames.py): Decode streams (``SocketStream``) and calls (``SocketCalls``).

A server names its socket in ProbeSharedMemory's answer; a client that passed the probe (the same
host, user and /dev/shm) sends its calls and decode steps there instead of over gRPC, whose Python
ends hand each message between threads on both sides. What a call answers, and how it fails, is
gRPC's: the server runs the same handlers, and an error comes back as a status that this module
raises as a ``SocketRpcError`` (a grpc.RpcError: the client maps it to its typed errors as any other).
A socket the client cannot open raises ``NoSocket`` before anything is sent: the call then goes over
gRPC.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time

import grpc
from monim.model_client.errors import CHANNEL_CLOSED
from monim.protos import memory_pb2 as pb
from monim.protos.errors import InvalidArgument
from monim.protos.socket_frames import (
    CALL,
    CALLS,
    HELLO,
    MESSAGE,
    REFUSED_KEY,
    STATUS,
    call_payload,
    recv_frame,
    send_frame,
    spin_until_readable,
)

# Connections a client keeps open to one socket between its calls (one per call in flight at once).
MAX_IDLE_CONNECTIONS = 16
# A call's socket waits this much past the call's own deadline for the server's DEADLINE_EXCEEDED.
_DEADLINE_MARGIN_S = 5.0
SPIN_ENV = "MONIM_SOCKET_SPIN_US"
log = logging.getLogger(__name__)


def _spin_s() -> float:
    """The most a thread waiting for an answer polls its connection before it sleeps on it:
    MONIM_SOCKET_SPIN_US (0: never); by default 5 ms on a host of 4 or more CPUs (the server beside this
    client needs its own), else 0."""
    value = os.environ.get(SPIN_ENV)
    if value is None:
        return 0.005 if (os.cpu_count() or 1) >= 4 else 0.0
    try:
        return max(0.0, float(value)) / 1e6
    except ValueError:
        log.warning("%s=%r is not a number of microseconds: no spin", SPIN_ENV, value)
        return 0.0


# A call or decode step polls for its answer up to this long before its thread sleeps (an answer read by
# a sleeping thread waits for its wake-up: tens of microseconds, and code that runs on a cold cache
# after), where its method's answers have lately come within it. One thread of the process spins at a
# time; the others sleep at once.
SPIN_S = _spin_s()
_spinning = threading.Lock()


class AnswerWait:
    """How long the answers of one method (or one decode stream's steps) have lately taken to come,
    from the request sent: a mean over the last few, weighted to the recent. Answers that take longer
    than SPIN_S are waited for asleep from the start, with no spin first."""

    def __init__(self):
        self.seconds = 0.0

    def spin_s(self) -> float:
        return SPIN_S if self.seconds <= SPIN_S else 0.0

    def waited(self, seconds: float) -> None:
        self.seconds += 0.25 * (seconds - self.seconds)  # threads may race here: it is a hint


def _answer_frame(connection: socket.socket, wait: AnswerWait):
    """recv_frame of an answer, after a spin (wait.spin_s()) where no other thread of this process is
    spinning."""
    started = time.perf_counter()
    spin_s = wait.spin_s()
    if spin_s > 0 and _spinning.acquire(blocking=False):
        try:
            readable = spin_until_readable(connection, spin_s)
        finally:
            _spinning.release()
        if not readable:
            return None
    frame = recv_frame(connection)
    wait.waited(time.perf_counter() - started)
    return frame


class NoSocket(Exception):
    """The socket could not be opened (gone, or this process cannot reach it): nothing was sent."""


class SocketFull(NoSocket):
    """The server turned the connection away before reading anything from it (it serves as many at once
    as it takes): nothing ran; this call or stream goes over gRPC, and later ones try the socket again."""


class SocketRpcError(grpc.RpcError):
    """A status from the socket, as grpc.RpcError's call-error interface presents one."""

    def __init__(self, code: str, details: str, trailing=()):
        super().__init__(details)
        self._code = getattr(grpc.StatusCode, code, grpc.StatusCode.UNKNOWN)
        self._details, self._trailing = details, tuple(tuple(pair) for pair in trailing)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self):
        return self._trailing


def _status_error(payload: bytes) -> SocketRpcError:
    """The status as an error; SocketFull (raised) for the server's refusal of the connection."""
    status = json.loads(bytes(payload))
    trailing = status.get("trailing") or ()
    if any(pair[0] == REFUSED_KEY for pair in trailing):
        raise SocketFull(status.get("message", ""))
    return SocketRpcError(status.get("code", "UNKNOWN"), status.get("message", ""), trailing)


def _connect(path: str, timeout_s: float | None) -> socket.socket:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.settimeout(timeout_s)
        connection.connect(path)
    except OSError as error:
        connection.close()
        raise NoSocket(str(error)) from None
    return connection


def _metadata_pairs(metadata) -> list:
    return [[str(key), str(value)] for key, value in metadata or ()]


class SocketStream:
    """One Decode stream on the socket: the calling thread sends each step and reads its answer, no
    other thread involved. A step unanswered within timeout_s raises DEADLINE_EXCEEDED; a broken
    connection, UNAVAILABLE (the DecodeStream opens another stream); both as SocketRpcError."""

    def __init__(self, path: str, metadata, timeout_s: float):
        self._wait = AnswerWait()  # its steps' answers
        self._socket = _connect(path, timeout_s)
        try:
            send_frame(self._socket, HELLO, json.dumps(_metadata_pairs(metadata)).encode())
        except (BrokenPipeError, ConnectionResetError):
            pass  # turned away at once: the status it sent answers the first step (SocketFull)
        except OSError as error:
            self._socket.close()
            raise NoSocket(str(error)) from None

    def step(self, request: pb.DecodeStep) -> pb.DecodeStepResult:
        try:
            # A server that refused the stream before its first step (too many streams, draining, no
            # token) sent its status and closed: the send fails, and that status is the answer.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                send_frame(self._socket, MESSAGE, request.SerializeToString())
            frame = _answer_frame(self._socket, self._wait)
        except socket.timeout:
            raise SocketRpcError("DEADLINE_EXCEEDED", "a decode step on the server's socket was not answered "
                                 "in time") from None
        except OSError as error:
            raise SocketRpcError("UNAVAILABLE", f"the server's socket broke: {error}") from None
        if frame is None:
            raise SocketRpcError("UNAVAILABLE", "the server closed its socket")
        kind, payload = frame
        if kind == MESSAGE:
            return pb.DecodeStepResult.FromString(payload)
        error = _status_error(payload) if kind == STATUS else None
        if error is None or error.code() == grpc.StatusCode.OK:
            raise SocketRpcError("UNAVAILABLE", "the server ended the decode stream")
        raise error

    def close(self) -> None:
        self._socket.close()


class SocketCalls:
    """Calls on one server's socket, over connections kept between calls (a call takes a free one or
    opens one, and gives it back once answered). Thread-safe. max_message_bytes: the client's limit on
    a message either way, as its gRPC channel has it (a larger request is refused here; the server
    refuses to send a larger answer)."""

    def __init__(self, path: str, max_message_bytes: int):
        self.path, self.max_message_bytes = path, max_message_bytes
        self._free: list[socket.socket] = []
        self._busy: set[socket.socket] = set()  # connections of calls in flight (close() cuts them)
        self._closed = False
        self._lock = threading.Lock()

    def callable(self, method: str, request_serializer, response_deserializer, answered_in_parts: bool):
        """call(request, timeout=, metadata=) as a grpc multi-callable's, on this socket."""
        answer_wait = AnswerWait()  # this method's answers

        def call(request, timeout=None, metadata=None):
            body = request if request_serializer is None else request_serializer(request)
            if len(body) > self.max_message_bytes:  # as gRPC's channel refuses it, before sending
                raise SocketRpcError("RESOURCE_EXHAUSTED",
                                     f"Sent message larger than max ({len(body)} vs. {self.max_message_bytes})")
            header = {"method": method, "metadata": _metadata_pairs(metadata), "timeout": timeout,
                      "limit": self.max_message_bytes}
            answers = self._call(call_payload(header, body), timeout, answered_in_parts, answer_wait)
            parsed = [response_deserializer(answer) for answer in answers]
            return parsed if answered_in_parts else parsed[0]

        return call

    def _call(self, payload: bytes, timeout: float | None, answered_in_parts: bool,
              answer_wait: AnswerWait) -> list[bytes]:
        connection = self._take(timeout)
        wait = None if timeout is None else timeout + _DEADLINE_MARGIN_S
        try:
            connection.settimeout(wait)
            # A server that turned a new connection away sent its status and closed: the send may fail,
            # and that status is the answer (SocketFull).
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                send_frame(connection, CALL, payload)
            answers, error = _answers(connection, answered_in_parts, answer_wait)
        except SocketFull:
            connection.close()
            raise
        except socket.timeout:
            connection.close()  # its answer may still come: the connection is left
            raise SocketRpcError("DEADLINE_EXCEEDED", f"no answer on the server's socket within {wait} s") from None
        except (OSError, InvalidArgument) as error:
            connection.close()
            if self._closed:  # the client closed meanwhile, as a gRPC channel's close cancels its calls
                raise SocketRpcError("CANCELLED", CHANNEL_CLOSED) from None
            raise SocketRpcError("UNAVAILABLE", f"the server's socket broke: {error}") from None
        finally:
            with self._lock:
                self._busy.discard(connection)
        self._give(connection)  # answered (a status ends a call too): it serves the next one
        if error is not None:
            raise error
        return answers

    def _take(self, timeout: float | None) -> socket.socket:
        """A free connection the server has not closed, else a new one (NoSocket if it cannot be made)."""
        while True:
            with self._lock:
                if self._closed:
                    raise SocketRpcError("CANCELLED", CHANNEL_CLOSED)
                connection = self._free.pop() if self._free else None
                if connection is not None:
                    self._busy.add(connection)
            if connection is None:
                break
            if _open(connection):
                return connection
            with self._lock:
                self._busy.discard(connection)
            connection.close()
        connection = _connect(self.path, timeout)
        try:
            send_frame(connection, CALLS, b"")
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed at once: a refusal's status is read as the call's answer (_call)
        except OSError as error:
            connection.close()
            raise NoSocket(str(error)) from None
        with self._lock:
            self._busy.add(connection)
        return connection

    def _give(self, connection: socket.socket) -> None:
        with self._lock:
            if not self._closed and len(self._free) < MAX_IDLE_CONNECTIONS:
                self._free.append(connection)
                return
        connection.close()

    def close(self) -> None:
        """Closes the idle connections and cuts those of calls in flight (they raise CANCELLED)."""
        with self._lock:
            self._closed = True
            free, self._free = self._free, []
            busy = list(self._busy)
        for connection in free:
            connection.close()
        for connection in busy:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _answers(connection: socket.socket, answered_in_parts: bool,
             wait: AnswerWait) -> tuple[list[bytes], SocketRpcError | None]:
    """A call's answer: its messages, and its error if a status other than OK ended it."""
    answers = []
    while True:
        frame = _answer_frame(connection, wait)
        if frame is None:
            raise ConnectionError("the server closed its socket during the call")
        kind, payload = frame
        if kind == MESSAGE:
            answers.append(payload)
            if not answered_in_parts:
                return answers, None
        elif kind == STATUS:
            error = _status_error(payload)
            return answers, None if error.code() == grpc.StatusCode.OK else error
        else:
            raise ConnectionError(f"a frame of kind {kind} in an answer")


def _open(connection: socket.socket) -> bool:
    """Whether an idle connection is still open at the server's end: nothing to read, no end of file
    (a server that stopped closed it; one that left bytes no call asked for is no use either)."""
    connection.setblocking(False)  # a timeout would wait for readiness before the peek
    try:
        connection.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False
