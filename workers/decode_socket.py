"""Decode streams over a Unix socket, for clients on the server's host.

A decoding step through a gRPC stream spends most of its time in gRPC's Python machinery, not in the
search: each message crosses threads on both sides (the client's request consumer and channel spin
threads, the server's completion queue and pool threads). On the 2-core VM a step of B=1, k=32 over
20,000 x 64 keys took 0.12 ms in-process and 0.65 ms on a gRPC stream to the shard's endpoint
(bench/cpu_decode_bench.py); on this socket, 0.30 ms. So every process that serves Decode (a front end, a shard's read
endpoint) also listens on a Unix socket, and a client that shares its host opens its Decode streams
there: one thread per connection reads a step, runs it and writes the answer, with no hand-off.

What a step does is the gRPC stream's, by construction: the connection runs the handler a grpc.Server
with the same interceptors would run (decoding.intercepted_handler: the call gate's drain, stream
limit and per-step metrics, auth's token check and per-step authorization, the servicer's Decode),
with a context that carries the client's metadata. A refusal that ends a gRPC stream with a status
(UNAUTHENTICATED, RESOURCE_EXHAUSTED for too many streams, UNAVAILABLE while draining) ends the
connection with that status; a step's own error is its answer's code, as on gRPC.

Who may connect: the socket is a file in the host's shared memory folder (protos/shared_memory.py),
mode 0600: processes of the server's user (and root). A client learns its path from
ProbeSharedMemory, which it passes only by reading a file the server wrote into the client's own
region: the same host, user and /dev/shm. Tokens are checked as on gRPC; TLS has nothing to add on a
socket no other host or user can open.

The frames (a hello with the call metadata, then steps and answers, then a status) are
protos/socket_frames.py's: both ends use them.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading

import grpc
from monim.protos import shared_memory
from monim.protos.errors import InvalidArgument
from monim.protos.shared_memory import SHARED_MEMORY_DIR
from monim.protos.socket_frames import HELLO, MESSAGE, STATUS, recv_frame, send_frame
from monim.workers.decoding import intercepted_handler

log = logging.getLogger(__name__)

HELLO_WAIT_S = 10.0  # a connection that sends no hello within this is closed
_PREFIX = "monim-decode-"


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class _SocketContext:
    """What the Decode handler and its interceptors ask of a grpc.ServicerContext."""

    def __init__(self, metadata: tuple, peer: str):
        self._metadata, self._peer = metadata, peer
        self._code = None
        self.active = True

    def invocation_metadata(self):
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def time_remaining(self):
        return None  # a decode stream has no deadline (each step is answered before the next is sent)

    def is_active(self) -> bool:
        return self.active

    def code(self):
        return self._code

    def set_code(self, code) -> None:
        self._code = code

    def set_details(self, details) -> None:
        pass

    def abort(self, code: grpc.StatusCode, details: str):
        self._code = code
        raise _Aborted(code, details)


def serve_decode_socket(servicer, interceptors) -> "DecodeSocket | None":
    """A DecodeSocket for the servicer, its path set where ProbeSharedMemory names it; None where shared
    memory is turned off (MONIM_SHARED_MEMORY=0: the probe fails, no client would find it) or the
    socket cannot be made (the folder is not writable: clients stream over gRPC)."""
    if not shared_memory.enabled():
        return None
    try:
        decode_socket = DecodeSocket(servicer, interceptors)
    except OSError as error:
        log.warning("no decode socket in %s (%s): this host's clients stream over gRPC", SHARED_MEMORY_DIR, error)
        return None
    servicer.decode_socket = decode_socket.path
    return decode_socket


class DecodeSocket:
    """Serves Decode streams of this host's clients on a Unix socket (``path``) with the handler a
    grpc.Server with ``interceptors`` runs for ``servicer``'s Decode. stop() closes it and its
    connections."""

    def __init__(self, servicer, interceptors):
        handler = intercepted_handler(servicer, "Decode", list(interceptors))
        self._handler, self._deserialize = handler.stream_stream, handler.request_deserializer
        self._serialize = handler.response_serializer
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = False
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
        self._thread = threading.Thread(target=self._accept, name="monim-decode-socket", daemon=True)
        self._thread.start()

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
                self._connections.add(connection)
            threading.Thread(target=self._serve, args=(connection,), name="monim-decode-stream", daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        """One stream: the hello, then the handler's answers to the steps read, then a status."""
        context = None
        try:
            connection.settimeout(HELLO_WAIT_S)
            hello = recv_frame(connection)
            if hello is None or hello[0] != HELLO:
                return
            connection.settimeout(None)
            metadata = tuple((str(key), str(value)) for key, value in json.loads(hello[1]))
            context = _SocketContext(metadata, f"unix:{self.path}")
            code, message = grpc.StatusCode.OK, ""
            answers = self._handler(self._steps(connection), context)
            try:
                for answer in answers:
                    send_frame(connection, MESSAGE, self._serialize(answer))
            except _Aborted as aborted:
                code, message = aborted.code, aborted.details
            finally:
                answers.close()  # a client gone mid-stream: the handler's finally blocks run now
            send_frame(connection, STATUS, json.dumps({"code": code.name, "message": message}).encode())
        except (OSError, ConnectionError, ValueError, InvalidArgument) as error:
            log.debug("decode socket stream ended: %s", error)
        except Exception:  # noqa: BLE001 - one broken stream never takes the listener down
            log.exception("a decode socket stream failed")
        finally:
            if context is not None:
                context.active = False
            with self._lock:
                self._connections.discard(connection)
            connection.close()

    def _steps(self, connection: socket.socket):
        """The client's steps, parsed as gRPC's deserializer parses them; ends when the client closes
        its side (or the socket is shut down by stop())."""
        while True:
            try:
                frame = recv_frame(connection)
            except (OSError, ConnectionError):
                return
            if frame is None or frame[0] != MESSAGE:
                return
            yield self._deserialize(frame[1])

    @property
    def streams(self) -> int:
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


def _remove_orphans() -> None:
    """The sockets of this user's servers that died without stop() (monim-decode-<pid>-*, no such process)."""
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
