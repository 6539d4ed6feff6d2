"""What runs around the gRPC server of one front end: the call gate, the health watch, the metrics
endpoint, and the drain that stops it.

- ``CallGate`` (an interceptor, outside auth) counts the MemoryService calls being served, refuses
  new ones with UNAVAILABLE once the front end drains, and reports every answered call (method,
  status code, seconds, token name) to the metrics.
- ``ShardProbe`` asks every shard for its metrics and state (Router.shard_metrics), and for a scrape
  also where its process runs and the memory it uses (the runtime's shard_host), each shard at most
  ``PROBE_WAIT_S``, all at once; a shard that hangs holds up neither the health watch nor a scrape.
- ``Frontend`` is what ``start_server`` returns: the grpc.Server (every method of it passes through),
  plus a thread that polls the shards every ``health_poll_s`` and sets the standard health service
  to NOT_SERVING while any shard is not serving (recovering, unavailable, failed), SERVING again once
  all are; and ``stop(grace)``, which drains.

Draining (``Frontend.stop(grace)``; SIGTERM or SIGINT in ``monim serve``), in order:
1. health answers NOT_SERVING for good (load balancers and probes stop sending here);
2. MemoryService calls that arrive are refused with UNAVAILABLE ("shutting down"), which clients
   retry elsewhere; health and reflection still answer;
3. calls in flight finish, for up to ``grace`` seconds;
4. the gRPC server stops (cancelling what is still running, and open health Watch streams after
   at most ``FINAL_GRACE_S``); the health watch and the metrics endpoint end.
Closing the shards' logs is the runtime's part, after this (EmbeddedStore.stop).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time

import grpc
from grpc_health.v1 import health, health_pb2
from monim.protos import memory_pb2 as pb
from monim.workers.auth import AuthPolicy, bearer_secret

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MemoryService"].full_name
HEALTH_POLL_S = 2.0
# How long a probe waits for one shard; a shard busy in one call for longer counts as not answering.
PROBE_WAIT_S = 3.0
# After the drain, how long the gRPC server waits for what is left (health Watch streams never end).
FINAL_GRACE_S = 1.0
SHUTTING_DOWN = "the server is shutting down; retry on another front end"
# Calls that stream their answer and are gated as calls (in flight until their last part; reported).
ANSWERED_IN_PARTS = frozenset({"SearchParts", "RetrieveParts"})
_STATUS_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


class CallGate(grpc.ServerInterceptor):
    """Counts MemoryService calls in flight, refuses new ones once closed, reports each answered call.

    auth: the server's AuthPolicy (for the token-name label; None: no auth); observer:
    ``observer(method, request, code, seconds, token_name)`` after every call (None: nobody)."""

    def __init__(self, auth: AuthPolicy | None = None, observer=None, max_streams: int = 8):
        self.auth = auth
        self.observer = observer
        self.max_streams = max_streams  # open Decode streams at once: each holds a thread of the server's pool
        self.streams = 0
        self.in_flight = 0
        self.closed = False
        self._calls = threading.Condition()
        self._prefix = f"/{SERVICE_NAME}/"

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        full_method = handler_call_details.method
        if handler is None or not full_method.startswith(self._prefix):
            return handler  # health, reflection
        method = full_method[len(self._prefix):]
        if handler.stream_stream is not None:
            return handler._replace(stream_stream=self._gated_stream(method, handler.stream_stream))
        if handler.unary_stream is not None and method in ANSWERED_IN_PARTS:
            return handler._replace(unary_stream=self._gated_parts(method, handler.unary_stream))
        if handler.unary_unary is None:
            return handler  # Reshard: an admin's long call, not drained for
        return handler._replace(unary_unary=self._gated(method, handler.unary_unary))

    def _token_name(self, context) -> str:
        if self.auth is None:
            return ""
        secret, _ = bearer_secret(context.invocation_metadata())
        token = self.auth.find(secret) if secret is not None else None
        return "" if token is None else token.name

    def _gated(self, method: str, behavior):
        def gated(request, context):
            with self._call(method, request, context):
                return behavior(request, context)

        return gated

    def _gated_parts(self, method: str, behavior):
        """A call answered in parts (SearchParts, RetrieveParts): in flight until its last part is
        sent (or the client goes), reported as one call."""
        def gated(request, context):
            with self._call(method, request, context):
                yield from behavior(request, context)

        return gated

    @contextlib.contextmanager
    def _call(self, method: str, request, context):
        """One call: admitted and counted in flight unless the gate is closed (UNAVAILABLE), reported
        to the observer with the code the client saw when it ends."""
        started = time.perf_counter()
        with self._calls:
            admitted = not self.closed
            if admitted:
                self.in_flight += 1
        code = grpc.StatusCode.OK
        try:
            if not admitted:
                code = grpc.StatusCode.UNAVAILABLE
                context.abort(code, SHUTTING_DOWN)
            yield
            code = context.code() or grpc.StatusCode.OK  # a servicer may set_code and return
            if not context.is_active():  # the client gave up first: that is what it saw
                remaining = context.time_remaining()
                code = grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 \
                    else grpc.StatusCode.CANCELLED
        except GeneratorExit:  # an answer in parts the client stopped reading
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            # context.abort raises with the code set; anything else reaches the client as UNKNOWN
            code = context.code() or grpc.StatusCode.UNKNOWN
            raise
        finally:
            if admitted:
                with self._calls:
                    self.in_flight -= 1
                    self._calls.notify_all()
            if self.observer is not None:
                try:
                    self.observer(method, request, code, time.perf_counter() - started, self._token_name(context))
                except Exception:  # noqa: BLE001 - metrics never fail a call
                    log.exception("could not record the metrics of a %s call", method)

    def _gated_stream(self, method: str, behavior):
        """A Decode stream: each step counts as a call in flight while it is served, and is reported
        (its code is the step's); once closed, the stream ends with UNAVAILABLE before its next step.
        A stream waiting for its client's next step holds no call in flight, so draining does not
        wait for it (the server's stop cancels it)."""
        def gated(request_iterator, context):
            started: list[tuple[object, float]] = []  # the steps being served, oldest first

            def admitted_steps():
                for step in request_iterator:
                    with self._calls:
                        if self.closed:
                            context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
                        self.in_flight += 1
                    started.append((step, time.perf_counter()))
                    yield step

            with self._calls:
                if self.closed:
                    context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
                if self.streams >= self.max_streams:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"{self.streams} decode streams are open, the most this server takes at once "
                                  "(each holds one of its threads); send Search and Retrieve calls instead")
                self.streams += 1
            try:
                for result in behavior(admitted_steps(), context):
                    step, began = started.pop(0)
                    self._step_done(method, step, result, time.perf_counter() - began, context)
                    yield result
            finally:
                for step, began in started:  # steps the client did not wait for
                    self._step_done(method, step, None, time.perf_counter() - began, context)
                with self._calls:
                    self.streams -= 1

        return gated

    def _step_done(self, method: str, step, result, seconds: float, context) -> None:
        with self._calls:
            self.in_flight -= 1
            self._calls.notify_all()
        if self.observer is None:
            return
        if result is None:
            code = grpc.StatusCode.CANCELLED
        elif isinstance(result, bytes):  # an answer the servicer framed (protos/framing.py): only successes are
            code = grpc.StatusCode.OK
        else:
            code = _STATUS_BY_VALUE.get(result.code, grpc.StatusCode.UNKNOWN)
        inner = getattr(step, step.WhichOneof("step") or "search", None)
        try:
            self.observer(method, inner, code, seconds, self._token_name(context))
        except Exception:  # noqa: BLE001 - metrics never fail a call
            log.exception("could not record the metrics of a %s step", method)

    def close(self) -> None:
        """From now on, MemoryService calls are refused with UNAVAILABLE."""
        with self._calls:
            self.closed = True
            self._calls.notify_all()

    def wake(self) -> None:
        """Waiters in wait_idle look at their deadline again."""
        with self._calls:
            self._calls.notify_all()

    def wait_idle(self, deadline) -> bool:
        """Waits until no call is in flight or time.monotonic() passes deadline() (read again after
        every wake-up: a second stop may bring it forward). True if none is in flight."""
        with self._calls:
            while self.in_flight:
                left = deadline() - time.monotonic()
                if left <= 0:
                    return False
                self._calls.wait(left)
            return True


class ShardProbe:
    """Every shard's Router.shard_metrics, asked at once; one question per shard at a time (a poll
    that finds one still pending waits for that one rather than asking again). With hosts, each
    shard's process is also asked where it runs and what memory it uses (the runtime's shard_host:
    workers/machine.py), in parallel with the metrics, so that it never changes a shard's state."""

    def __init__(self, router, wait_s: float = PROBE_WAIT_S):
        self.router = router
        self.wait_s = wait_s
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2 * router.num_shards,
                                                           thread_name_prefix="monim-probe")
        self._pending: dict[tuple[str, int], concurrent.futures.Future] = {}
        self._lock = threading.Lock()

    def _ask(self, kind: str, shard: int, function) -> concurrent.futures.Future:
        future = self._pending.get((kind, shard))
        if future is None or future.done():
            future = self._pending[(kind, shard)] = self._pool.submit(function, shard, self.wait_s)
        return future

    def poll(self, hosts: bool = False) -> list[dict]:
        """[shard_metrics of each shard] in shard order, within about wait_s. A shard whose answer
        did not come in time, or that failed to answer, is "recovering" or "unavailable". hosts: each
        answer has "host" (workers/machine.py's report) where the shard's process gave one in time."""
        shard_host = getattr(self.router.runtime, "shard_host", None) if hosts else None
        with self._lock:
            futures = [self._ask("metrics", shard, self.router.shard_metrics) for shard in range(self.router.num_shards)]
            host_futures = [] if shard_host is None else \
                [self._ask("host", shard, shard_host) for shard in range(self.router.num_shards)]
        concurrent.futures.wait(futures + host_futures, timeout=self.wait_s + 0.5)
        silent = "recovering" if getattr(self.router.runtime, "restarts", False) else "unavailable"
        answers = []
        for shard, future in enumerate(futures):
            if future.done() and future.exception() is None:
                answers.append(dict(future.result()))
            else:
                if future.done():
                    log.warning("shard %d: metrics failed: %s", shard, future.exception())
                answers.append({"shard": shard, "state": silent})
        for shard, future in enumerate(host_futures):
            if future.done() and future.exception() is None:
                answers[shard]["host"] = future.result()
            elif future.done():
                log.debug("shard %d: no host report: %s", shard, future.exception())
        return answers

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Frontend:
    """One front end's gRPC server with its health watch, metrics endpoint and drain. Made by
    ``start_server`` (workers/server.py): ``interceptors`` and ``health`` go into the grpc.Server,
    then ``attach(server)`` starts the watch. Any grpc.Server method not defined here is the server's.

    metrics_port: serve Prometheus text on http://metrics_host:metrics_port/metrics (0: a free port,
    then ``metrics_port`` is the bound one; None: no metrics)."""

    def __init__(self, router, auth: AuthPolicy | None = None, metrics_port: int | None = None,
                 metrics_host: str = "127.0.0.1", health_poll_s: float = HEALTH_POLL_S):
        self.router = router
        self.health = health.HealthServicer()
        self.probe = ShardProbe(router)
        self.gate = CallGate(auth)
        self.health_poll_s = health_poll_s
        self.server: grpc.Server | None = None
        self.host_socket = None  # workers/host_socket.py: stopped after the server
        self.metrics = None
        self.metrics_port = None
        self._httpd = None
        if metrics_port is not None:
            from monim.workers.metrics import ServerMetrics, serve_metrics

            self.metrics = ServerMetrics(self.probe, lambda: self.gate.in_flight, getattr(router, "forwards", None),
                                         lambda: self.host_socket)
            self.gate.observer = self.metrics.observe
            self._httpd, self.metrics_port = serve_metrics(self.metrics, metrics_host, metrics_port)
        self.shard_states: list[str] = []
        self._lock = threading.Lock()
        self._until: float | None = None  # the drain's deadline (time.monotonic()), once stop() was called
        self._finished = False
        self._stopped = threading.Event()
        self._watch_stop = threading.Event()
        self._watch = threading.Thread(target=self._watch_shards, name="monim-health", daemon=True)

    @property
    def interceptors(self) -> list[grpc.ServerInterceptor]:
        return [self.gate]

    def attach(self, server: grpc.Server) -> None:
        """The started server this front end wraps; the health watch starts."""
        self.server = server
        self._watch.start()

    def __getattr__(self, name):  # add_insecure_port, wait_for_termination, ...: the grpc.Server's
        server = self.__dict__.get("server")
        if server is None:
            raise AttributeError(name)
        return getattr(server, name)

    # ----- health -----------------------------------------------------------------------------
    def _watch_shards(self) -> None:
        """Health follows the shards: SERVING while every one serves, NOT_SERVING otherwise. Once the
        front end drains, the health servicer ignores this (enter_graceful_shutdown)."""
        serving = True
        while not self._watch_stop.is_set():
            try:
                shards = self.probe.poll()
                if self.metrics is not None:
                    self.metrics.learn_shards(shards)
                self.shard_states = [shard["state"] for shard in shards]
                now_serving = all(state == "serving" for state in self.shard_states)
                if now_serving != serving:
                    log.warning("health: %s (shard states: %s)", "SERVING" if now_serving else "NOT_SERVING",
                                ", ".join(f"{i}: {s}" for i, s in enumerate(self.shard_states)))
                    status = health_pb2.HealthCheckResponse.SERVING if now_serving else \
                        health_pb2.HealthCheckResponse.NOT_SERVING
                    for service in ("", SERVICE_NAME):
                        self.health.set(service, status)
                    serving = now_serving
            except RuntimeError as error:
                if "after" in str(error) and "shutdown" in str(error):
                    return  # the probe's pool takes no more work: the front end or the interpreter is ending
                log.exception("health: could not poll the shards")
            except Exception:  # noqa: BLE001 - the watch must outlive one bad poll
                log.exception("health: could not poll the shards")
            self._watch_stop.wait(self.health_poll_s)

    # ----- stopping ---------------------------------------------------------------------------
    @property
    def draining(self) -> bool:
        return self._until is not None

    def stop(self, grace: float | None = None) -> threading.Event:
        """Drains (see the module docstring) for up to ``grace`` seconds, in a background thread;
        returns an Event set once the server, the health watch and the metrics endpoint have stopped.
        grace None or 0 stops at once, before returning. A second call may bring the deadline forward."""
        with self._lock:
            until = time.monotonic() + (grace or 0.0)
            first = self._until is None
            self._until = until if first else min(self._until, until)
        self.health.enter_graceful_shutdown()
        self.gate.close()
        if not grace:
            self.gate.wake()
            self._finish(0.0)
        elif first:
            threading.Thread(target=self._drain, name="monim-drain", daemon=True).start()
        else:
            self.gate.wake()
        return self._stopped

    def _drain(self) -> None:
        idle = self.gate.wait_idle(lambda: self._until)
        if not idle:
            log.warning("drain: %d call(s) still in flight after the grace period; cancelling them",
                        self.gate.in_flight)
        self._finish(max(0.0, min(FINAL_GRACE_S, self._until - time.monotonic())))

    def _finish(self, grace_s: float) -> None:
        if self.server is not None:
            self.server.stop(grace_s).wait()  # a second stop with less grace cuts the first short
        if self.host_socket is not None:
            self.host_socket.stop()
        with self._lock:
            if self._finished:
                return
            self._finished = True
        self._watch_stop.set()
        if self._httpd is not None:  # before the probe: a scrape in progress still gets its answer
            self._httpd.shutdown()
            self._httpd.server_close()
        self.probe.close()
        if self._watch.is_alive() and self._watch is not threading.current_thread():
            # A poll in flight ends within its probe's wait; until the watch has ended it holds the
            # router, and a daemon thread that frees the shards' tensors while the interpreter
            # finalizes is killed mid-free (SIGABRT at the exit of a process that stopped its server).
            self._watch.join(self.probe.wait_s + 1.0)
        self._stopped.set()

    def close(self) -> None:
        """Releases what was started before the server (a server that could not bind)."""
        self._until = time.monotonic()
        self._finish(0.0)
