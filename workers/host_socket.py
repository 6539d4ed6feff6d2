"""The server's Unix socket for clients on its host: their calls and Decode streams without gRPC.

A small call or a decoding step through gRPC spends much of its time in gRPC's Python machinery, not
in the store: each message crosses threads on both sides (the client's request consumer and channel
spin threads, the server's completion queue and pool threads). So every process that serves
MemoryService (a front end, a shard's read endpoint) also listens on a Unix socket, and a client that
shares its host sends its calls and opens its Decode streams there: one thread per connection reads a
request, runs it and writes the answer, with no hand-off. On the 2-core VM (bench/host_socket_bench.py,
2,000 x 64 keys, k=32): a Search of one query 0.53 ms there against 0.79 over gRPC and 0.16
in-process; a decoding step 0.37 against 0.62 (0.16).

What a call or a step does is gRPC's, by construction: the connection runs the handler a grpc.Server
with the same interceptors would run (decoding.intercepted_handler: the call gate's drain, stream
limit and metrics, auth's token checks, the servicer's method), with a context that carries the
call's metadata and deadline; a status (code, message, trailing metadata) answers what gRPC would
answer with one.

Who may connect: the socket is a file in the host's shared memory folder (protos/shared_memory.py),
mode 0600: processes of the server's user (and root). A client learns its path from
ProbeSharedMemory, which it passes only by reading a file the server wrote into the client's own
region: the same host, user and /dev/shm. Tokens are checked as on gRPC; TLS has nothing to add on a
socket no other host or user can open.

The frames (a connection carries one Decode stream, or calls one after another) are
protos/socket_frames.py's: both ends use them. At most MAX_CONNECTIONS connections are served at once
(a thread each); the next is turned away with a status naming REFUSED_KEY, and its client goes over
gRPC for that call or stream.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import struct
import threading
import time

import grpc
from monim.protos import shared_memory
from monim.protos.errors import InvalidArgument
from monim.protos.framing import DEFAULT_MAX_MESSAGE_BYTES
from monim.protos.shared_memory import SHARED_MEMORY_DIR
from monim.protos.socket_frames import (
    CALL,
    CALLS,
    HELLO,
    MESSAGE,
    NOT_CALLED_HERE,
    REFUSED_KEY,
    STATUS,
    recv_frame,
    send_frame,
    split_call,
    status_payload,
)
from monim.workers.decoding import SERVICE, intercepted_handler

log = logging.getLogger(__name__)

HELLO_WAIT_S = 10.0  # a connection that sends no hello within this is closed
# Connections served at once (each holds a thread of the server). One past it is answered with a
# RESOURCE_EXHAUSTED status naming REFUSED_KEY before anything is read, and closed: its client sends
# that call over gRPC (model_client/host_socket.py), which has limits of its own.
MAX_CONNECTIONS = 512
_PREFIX = "monim-host-"
_CREDENTIALS = struct.Struct("3i")  # SO_PEERCRED: pid, uid, gid


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class _SocketContext:
    """What a handler and its interceptors ask of a grpc.ServicerContext. deadline: time.monotonic()
    by which the client gives up (None: none, as a decode stream)."""

    def __init__(self, metadata: tuple, peer: str, deadline: float | None = None):
        self._metadata, self._peer, self._deadline = metadata, peer, deadline
        self._code = None
        self.trailing: tuple = ()
        self.active = True

    def invocation_metadata(self):
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def time_remaining(self):
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def is_active(self) -> bool:
        return self.active

    def code(self):
        return self._code

    def set_code(self, code) -> None:
        self._code = code

    def set_details(self, details) -> None:
        pass

    def set_trailing_metadata(self, metadata) -> None:
        self.trailing = tuple(metadata)

    def abort(self, code: grpc.StatusCode, details: str):
        self._code = code
        raise _Aborted(code, details)


def serve_host_socket(servicer, interceptors, methods: frozenset[str] | None = None) -> "HostSocket | None":
    """A HostSocket for the servicer, its path set where ProbeSharedMemory names it; None where shared
    memory is turned off (MONIM_SHARED_MEMORY=0: the probe fails, no client would find it) or the
    socket cannot be made (the folder is not writable: clients use gRPC)."""
    if not shared_memory.enabled():
        return None
    try:
        host_socket = HostSocket(servicer, interceptors, methods)
    except OSError as error:
        log.warning("no host socket in %s (%s): this host's clients use gRPC", SHARED_MEMORY_DIR, error)
        return None
    servicer.host_socket = host_socket.path
    return host_socket


class HostSocket:
    """Serves this host's clients on a Unix socket (``path``): Decode streams and calls, each with the
    handler a grpc.Server with ``interceptors`` runs for the servicer's method. methods: the methods it
    serves (None: every MemoryService method but Reshard; a shard's read endpoint passes its own).
    stop() closes it and its connections."""

    def __init__(self, servicer, interceptors, methods: frozenset[str] | None = None,
                 max_connections: int = MAX_CONNECTIONS):
        self._servicer, self._interceptors, self._methods = servicer, list(interceptors), methods
        self.max_connections = max_connections
        self.refused = 0  # connections turned away past max_connections
        # gRPC's limit on a message either way, kept here too: a call answers as it would there.
        self.max_message_bytes = servicer.max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES
        self._handlers: dict[str, grpc.RpcMethodHandler | None] = {}
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = False
        self.calls = 0  # calls taken (each Decode stream's steps are counted by the gate, as on gRPC)
        _remove_orphans()
        self.path = os.path.join(SHARED_MEMORY_DIR, f"{_PREFIX}{os.getpid()}-{secrets.token_hex(8)}.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(self.path)
            os.chmod(self.path, 0o600)  # before listen(): until then no one can connect
            self._listener.listen(64)
        except OSError:
            self._listener.close()
            raise
        self._thread = threading.Thread(target=self._accept, name="monim-host-socket", daemon=True)
        self._thread.start()

    def _handler(self, method: str) -> grpc.RpcMethodHandler | None:
        """The method's handler as gRPC would run it; None for a method this socket does not serve."""
        with self._lock:
            if method not in self._handlers:
                served = method in SERVICE.methods_by_name and (self._methods is None or method in self._methods)
                self._handlers[method] = intercepted_handler(self._servicer, method, self._interceptors) \
                    if served else None
            return self._handlers[method]

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return  # stopped
            with self._lock:
                if self._stopped:
                    connection.close()
                    return
                full = len(self._connections) >= self.max_connections
                if full:
                    self.refused += 1
                else:
                    self._connections.add(connection)
            if full:
                self._refuse(connection)
                continue
            threading.Thread(target=self._serve, args=(connection,), name="monim-host-socket-client",
                             daemon=True).start()

    def _refuse(self, connection: socket.socket) -> None:
        """Tells a connection past max_connections so, before reading anything from it, and closes it."""
        message = (f"the server's host socket serves at most {self.max_connections} connections at once; "
                   "this one goes over gRPC")
        try:
            connection.settimeout(1.0)
            send_frame(connection, STATUS, status_payload("RESOURCE_EXHAUSTED", message, ((REFUSED_KEY, "1"),)))
        except OSError:
            pass
        finally:
            connection.close()

    def _serve(self, connection: socket.socket) -> None:
        """One connection: its first frame says whether it carries a Decode stream or calls."""
        peer = _peer(connection)
        try:
            connection.settimeout(HELLO_WAIT_S)
            hello = recv_frame(connection)
            connection.settimeout(None)
            if hello is not None and hello[0] == HELLO:
                self._serve_stream(connection, peer, _metadata(json.loads(bytes(hello[1]))))
            elif hello is not None and hello[0] == CALLS:
                self._serve_calls(connection, peer)
        except (OSError, ValueError, TypeError, InvalidArgument) as error:
            log.debug("a host socket connection ended: %s", error)
        except Exception:  # noqa: BLE001 - one broken connection never takes the listener down
            log.exception("a host socket connection failed")
        finally:
            with self._lock:
                self._connections.discard(connection)
            connection.close()

    def _serve_stream(self, connection: socket.socket, peer: str, metadata: tuple) -> None:
        """A Decode stream: the handler's answers to the steps read, then a status."""
        context = _SocketContext(metadata, peer)
        handler = self._handler("Decode")
        code, message = grpc.StatusCode.OK, ""
        answers = handler.stream_stream(self._steps(connection, handler.request_deserializer), context)
        try:
            for answer in answers:
                send_frame(connection, MESSAGE, handler.response_serializer(answer))
        except _Aborted as aborted:
            code, message = aborted.code, aborted.details
        finally:
            answers.close()  # a client gone mid-stream: the handler's finally blocks run now
            context.active = False
        send_frame(connection, STATUS, status_payload(code.name, message, context.trailing))

    def _steps(self, connection: socket.socket, deserialize):
        """The client's steps, parsed as gRPC's deserializer parses them; ends when the client closes
        its side (or the socket is shut down by stop())."""
        while True:
            try:
                frame = recv_frame(connection)
            except OSError:
                return
            if frame is None or frame[0] != MESSAGE:
                return
            if len(frame[1]) > self.max_message_bytes:  # gRPC ends the stream so
                raise _Aborted(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"Received message larger than max ({len(frame[1])} vs. {self.max_message_bytes})")
            yield deserialize(frame[1])

    def _serve_calls(self, connection: socket.socket, peer: str) -> None:
        """Calls, one after another, each answered before the next is read."""
        while True:
            frame = recv_frame(connection)
            if frame is None or frame[0] != CALL:
                return
            header, request = split_call(frame[1])
            with self._lock:
                self.calls += 1
            timeout = header.get("timeout")
            context = _SocketContext(_metadata(header.get("metadata")), peer,
                                     None if timeout is None else time.monotonic() + float(timeout))
            handler = None if header["method"] in NOT_CALLED_HERE else self._handler(header["method"])
            if handler is None:
                send_frame(connection, STATUS, status_payload(
                    "UNIMPLEMENTED", f"{header['method']} is not served on this socket"))
                continue
            # gRPC's limits: the server's on what it takes and sends, the client's on what it takes.
            answer_limit = min(self.max_message_bytes, int(header.get("limit") or self.max_message_bytes))
            try:
                if len(request) > self.max_message_bytes:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"Received message larger than max "
                                  f"({len(request)} vs. {self.max_message_bytes})")
                parsed = handler.request_deserializer(request)  # a view of the received bytes
                if handler.unary_unary is not None:
                    send_frame(connection, MESSAGE, _within(
                        handler.response_serializer(handler.unary_unary(parsed, context)), answer_limit, context))
                    continue
                for answer in handler.unary_stream(parsed, context):
                    send_frame(connection, MESSAGE, _within(handler.response_serializer(answer), answer_limit, context))
                code, message = grpc.StatusCode.OK, ""
            except _Aborted as aborted:
                code, message = aborted.code, aborted.details
            except OSError:
                raise  # the client went away: nothing to answer
            except Exception as error:  # noqa: BLE001 - as gRPC answers an exception in a handler
                log.exception("%s on the host socket failed", header["method"])
                code, message = grpc.StatusCode.UNKNOWN, f"Exception calling application: {error}"
            finally:
                context.active = False
            send_frame(connection, STATUS, status_payload(code.name, message, context.trailing))

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def stop(self) -> None:
        """No new connections; open ones are shut down (their handler ends as a cancelled stream's)."""
        with self._lock:
            self._stopped = True
            connections = list(self._connections)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._thread.join(timeout=5)


def _metadata(pairs) -> tuple:
    """A frame's [[key, value], ...] as grpc's invocation metadata: a tuple of string pairs."""
    return tuple((str(key), str(value)) for key, value in pairs or ())


def _within(answer: bytes, limit: int, context) -> bytes:
    """The answer, if it is within the limit; else RESOURCE_EXHAUSTED, as gRPC answers one that is not."""
    if len(answer) > limit:
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"Received message larger than max ({len(answer)} vs. {limit})")
    return answer


def _peer(connection: socket.socket) -> str:
    """What the logs call the client: "unix:pid=<its pid>" (SO_PEERCRED), as gRPC's "ipv4:host:port"."""
    try:
        pid, _, _ = _CREDENTIALS.unpack(connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              _CREDENTIALS.size))
        return f"unix:pid={pid}"
    except (AttributeError, OSError):  # no SO_PEERCRED (not Linux)
        return "unix:"


def _remove_orphans() -> None:
    """The sockets of this user's servers that died without stop() (monim-host-<pid>-*, no such process)."""
    try:
        names = [name for name in os.listdir(SHARED_MEMORY_DIR) if name.startswith(_PREFIX)]
    except OSError:
        return
    for name in names:
        path = os.path.join(SHARED_MEMORY_DIR, name)
        try:
            pid = int(name[len(_PREFIX):].split("-", 1)[0])
            if os.stat(path).st_uid != os.getuid() or _alive(pid):
                continue
            os.unlink(path)
        except (ValueError, OSError):
            continue


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
