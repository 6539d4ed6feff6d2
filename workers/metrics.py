"""Prometheus metrics of one front end (``monim serve --metrics-port P``), through prometheus-client.

Every front end has its own CollectorRegistry (never the process-wide one), so several front ends
and tests in one process do not collide. What it exports (docs/OPERATIONS.md, "Watch it"):

    monim_requests_total{method, namespace, code, token}   counter: MemoryService calls, by gRPC status
                                                          (OK too; refused by auth or by a drain too)
    monim_request_duration_seconds{method}                histogram: from arrival to answer
    monim_requests_in_flight                              gauge: calls being served (queue depth)
    monim_namespace_rows{namespace, shard}                gauge: rows each shard holds
    monim_namespace_bytes{namespace, shard}               gauge: bytes their columns hold (allocated)
    monim_namespace_index_state{namespace, shard, state}  gauge: 1 for the state of the namespace's approximate
                                                          index on the shard (exact, training, trained), 0 for
                                                          the others
    monim_namespace_index_builds_total{namespace, shard}  counter: builds of it swapped in (first, retrain, rebuild),
                                                          since the shard started
    monim_namespace_index_tombstones{namespace, shard}    gauge: deleted rows still in it (excluded from searches)
    monim_namespace_index_unindexed_rows{namespace, shard}  gauge: rows waiting to enter it (hnsw's tail; 0 for ivf)
    monim_namespace_index_drift{namespace, shard}         gauge: ivf's drift ratio (a retrain past 2; none for hnsw)
    monim_namespace_index_build_seconds{namespace, shard}  gauge: its latest build's seconds (once there is one)
    monim_shard_state{shard, state}                       gauge: 1 for the shard's state, 0 for the others
    monim_wal_bytes{shard}                                gauge: the shard's log segments (data dir only)
    monim_snapshot_age_seconds{shard}                     gauge: since its latest snapshot (once there is one)
    monim_shard_info{shard, node, node_id, device}        gauge, always 1: where the shard runs
    monim_shard_memory_used_bytes{shard, memory}          gauge: memory="host": its process's resident set;
                                                          memory="gpu": what torch holds on its GPU
    monim_shard_memory_free_bytes{shard, memory}          gauge: available on its node / free on its GPU
    monim_read_endpoint_info{shard, target}               gauge, always 1: where clients reach the shard's own read endpoint
    monim_read_endpoint_streams{shard}                    gauge: Decode streams open on it
    monim_read_endpoint_calls_total{shard, method, code}  counter: calls (a Decode step: one) it answered, by gRPC
                                                          status, since it started
    monim_read_endpoint_host_socket_connections{shard}    gauge: connections on its Unix socket for clients on its host
    monim_read_endpoint_host_socket_refused_total{shard}  counter: connections turned away there past its most
    monim_read_endpoint_forward_states{shard}             gauge: Retrieve states its router keeps for their backward
    monim_read_endpoint_forward_state_bytes{shard}        gauge: the bytes they hold
    monim_read_endpoint_forward_states_dropped_total{shard, why}  counter: evicted, expired or missed, as
                                                          monim_forward_states_dropped_total on the front end
    monim_shard_staged_steps{shard}                       gauge: steps whose parts wait on the shard for their commit
    monim_shard_staged_step_bytes{shard}                  gauge: the bytes those parts hold (workers/staged_steps.py)
    monim_shard_staged_steps_dropped_total{shard, why}    counter: expired (10 minutes uncommitted) or evicted (idle,
                                                          for room); their commits answer ABORTED
    monim_namespace_requests_per_second{namespace}        gauge: data calls over the last minute
    monim_namespace_request_p99_seconds{namespace}        gauge: their 99th percentile latency, same minute
    monim_read_endpoint_namespace_requests_per_second{namespace}  gauge: the same of the calls the shards'
    monim_read_endpoint_namespace_request_p99_seconds{namespace}  read endpoints answered (one per deployment)

The namespace_index families have a sample for each namespace with an approximate index (ivf_flat,
ivf_pq, hnsw) on each shard, none for a flat one; the shard reads them without its stores' locks
(BackgroundIndex.metrics).

The per-shard gauges are read when Prometheus scrapes (``ShardCollector``), through the front end's
ShardProbe: a shard that does not answer within its wait is reported by its state only, and never
holds the scrape up. The last two are for ``monim status``, which reads one scrape: they cover the
data calls (Search, Add, Get, Delete, Retrieve, RetrieveBackward, ApplyGradients, CommitStep,
AbortStep) of any status code, in one-second slots (``RecentCalls``); the two after them the reads the
shards' read endpoints answered (Search, Retrieve, Decode steps: their counts come with the shards'
metrics, polled every few seconds by the health watch and at each scrape; every front end reports
the same figure, so ``monim status`` adds it once to the front ends' summed rates); dashboards should
rather use rate() and histogram_quantile() over the counters.

Label values stay bounded: ``namespace`` is a namespace that exists (a call on any other name, say
one refused for a typo, counts under "unknown"; a call that names none under ""), and ``token``
is a token name from the auth file ("" without auth or for an unknown token); ``node`` and
``device`` are one per shard.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time

import grpc
from monim.workers.auth import METHOD_ACCESS, READ, WRITE
from monim.workers.forwards import DROP_REASONS
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

SHARD_STATES = ("serving", "recovering", "unavailable", "failed")
UNKNOWN_NAMESPACE = "unknown"
# Seconds; gRPC calls here take from a millisecond (a cached config) to minutes (a restore).
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
RECENT_WINDOW_S = 60
MEMORY_KINDS = ("host", "gpu")
INDEX_STATES = ("exact", "training", "trained")  # datastore/background_index.py


def bucket_quantile(q: float, counts: list[int], bounds=LATENCY_BUCKETS_S) -> float | None:
    """The q-quantile of observations counted in buckets (counts[i]: those <= bounds[i] and above
    bounds[i-1]; counts[-1]: those above bounds[-1]), interpolated within its bucket as Prometheus's
    histogram_quantile does (the +Inf bucket answers its lower bound). None when nothing was counted."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    below = 0
    for index, count in enumerate(counts):
        if count and below + count >= rank:
            if index == len(bounds):
                return bounds[-1]
            lower = bounds[index - 1] if index else 0.0
            return lower + (bounds[index] - lower) * (rank - below) / count
        below += count
    return bounds[-1]


class RecentCalls:
    """Calls per namespace over the last ``window_s`` seconds, in one-second slots: how many, and how
    their latencies fall in ``bounds``. Memory: namespaces x window_s x len(bounds) counts; a
    namespace without calls in the window is forgotten."""

    def __init__(self, window_s: int = RECENT_WINDOW_S, bounds=LATENCY_BUCKETS_S, clock=time.monotonic):
        self.window_s = window_s
        self.bounds = tuple(bounds)
        self.clock = clock
        self.started = clock()
        self._slots: dict[str, list] = {}  # namespace -> window_s slots of [second, counts] (or None)
        self._lock = threading.Lock()

    def observe(self, namespace: str, seconds: float) -> None:
        now = int(self.clock())
        bucket = bisect.bisect_left(self.bounds, seconds)  # the first bound >= seconds; len(bounds): +Inf
        with self._lock:
            slots = self._slots.setdefault(namespace, [None] * self.window_s)
            slot = slots[now % self.window_s]
            if slot is None or slot[0] != now:
                slot = slots[now % self.window_s] = [now, [0] * (len(self.bounds) + 1)]
            slot[1][bucket] += 1

    def window_counts(self) -> dict[str, list[int]]:
        """namespace -> its calls in each latency bucket over the window (a namespace without calls in
        it is forgotten)."""
        now = int(self.clock())
        answers = {}
        with self._lock:
            for namespace, slots in list(self._slots.items()):
                counts = [0] * (len(self.bounds) + 1)
                for slot in slots:
                    if slot is not None and now - slot[0] < self.window_s:
                        counts = [a + b for a, b in zip(counts, slot[1])]
                if sum(counts) == 0:
                    del self._slots[namespace]
                    continue
                answers[namespace] = counts
        return answers

    def span_s(self) -> float:
        """The seconds the window covers now: window_s, or the time since this object was made when
        that is shorter (at least 1 s)."""
        return min(float(self.window_s), max(self.clock() - self.started, 1.0))

    def summary(self, q: float = 0.99) -> dict[str, tuple[float, float | None]]:
        """namespace -> (calls per second, q-quantile of their latency in seconds) over span_s()."""
        return rates([(self.span_s(), self.window_counts())], q, self.bounds)


def rates(sources, q: float = 0.99, bounds=LATENCY_BUCKETS_S) -> dict[str, tuple[float, float | None]]:
    """sources: [(span_s, {namespace: bucket counts})] (RecentCalls.span_s and window_counts of one or
    several places) -> namespace -> (calls per second, summed over the sources; q-quantile of all
    their latencies)."""
    per_second: dict[str, float] = {}
    counts: dict[str, list[int]] = {}
    for span_s, by_namespace in sources:
        for namespace, theirs in by_namespace.items():
            per_second[namespace] = per_second.get(namespace, 0.0) + sum(theirs) / span_s
            ours = counts.get(namespace)
            counts[namespace] = list(theirs) if ours is None else [a + b for a, b in zip(ours, theirs)]
    return {namespace: (per_second[namespace], bucket_quantile(q, c, bounds)) for namespace, c in counts.items()}


class ServerMetrics:
    """The metrics of one front end. probe: its ShardProbe (workers/frontend.py); in_flight: a
    function that returns the number of calls being served."""

    def __init__(self, probe, in_flight, forwards=None, host_socket=None):
        """forwards: the router's ForwardStates (workers/forwards.py), to report its table. host_socket:
        a function that returns the front end's HostSocket (workers/host_socket.py), or None while it has none."""
        self.registry = CollectorRegistry()
        self.probe = probe
        self.requests = Counter("monim_requests", "MemoryService calls answered, by method, namespace, gRPC status "
                                "code and token name", ("method", "namespace", "code", "token"), registry=self.registry)
        self.latency = Histogram("monim_request_duration_seconds", "Time from a MemoryService call's arrival to "
                                 "its answer", ("method",), buckets=LATENCY_BUCKETS_S, registry=self.registry)
        gauge = Gauge("monim_requests_in_flight", "MemoryService calls being served by this front end",
                      registry=self.registry)
        gauge.set_function(in_flight)
        self._known: set[str] = set()  # namespaces seen to exist: the only ones a label may name
        self._known_lock = threading.Lock()
        self.recent = RecentCalls()
        self.endpoint_recent: dict[int, dict] = {}  # shard -> its read endpoint's {"span_s", "counts"}
        self.registry.register(ShardCollector(self))
        self.registry.register(RecentCollector(lambda: self.recent.summary(), "monim_namespace"))
        self.registry.register(RecentCollector(lambda: rates([(r["span_s"], r["counts"])
                                                              for r in list(self.endpoint_recent.values())]),
                                               "monim_read_endpoint_namespace"))
        if forwards is not None:
            self.registry.register(ForwardsCollector(forwards))
        if host_socket is not None:
            self.registry.register(HostSocketCollector(host_socket))

    def learn(self, namespaces) -> None:
        """Namespaces that exist (as shards or a successful call report them) may be labels."""
        with self._known_lock:
            self._known.update(namespaces)

    def learn_shards(self, shards: list[dict]) -> None:
        """What a poll of the shards (ShardProbe.poll) tells the metrics: the namespaces that exist, and
        the recent calls each shard's read endpoint answered (for the per-namespace rates)."""
        self.learn(name for shard in shards for name in shard.get("namespaces", {}))
        for shard in shards:
            endpoint = shard.get("read_endpoint")
            if endpoint is not None and "recent" in endpoint:
                self.endpoint_recent[shard["shard"]] = endpoint["recent"]

    def namespace_label(self, method: str, request, code: grpc.StatusCode) -> str:
        """The namespace a call concerns, as a label: "" for none; the name when it exists (the call
        succeeded, or a shard reported it); else "unknown", so that names of refused calls, which
        anyone may invent, cannot grow the series without bound."""
        access = METHOD_ACCESS.get(method)
        try:
            namespace = access.namespace_of(request) if access is not None else None
        except AttributeError:
            namespace = None
        if not namespace:
            return ""
        if code == grpc.StatusCode.OK:
            self.learn((namespace,))
            return namespace
        with self._known_lock:
            return namespace if namespace in self._known else UNKNOWN_NAMESPACE

    def observe(self, method: str, request, code: grpc.StatusCode, seconds: float, token: str) -> None:
        """One MemoryService call answered (CallGate's observer)."""
        namespace = self.namespace_label(method, request, code)
        self.requests.labels(method, namespace, code.name, token).inc()
        self.latency.labels(method).observe(seconds)
        access = METHOD_ACCESS.get(method)
        if access is not None and access.scope in (READ, WRITE):
            self.recent.observe(namespace, seconds)


class ShardCollector(Collector):
    """Reads every shard's rows, bytes, state, log size and snapshot age when Prometheus scrapes."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    @staticmethod
    def _families() -> dict[str, GaugeMetricFamily | CounterMetricFamily]:
        return {
            "rows": GaugeMetricFamily("monim_namespace_rows", "Rows a shard holds of a namespace",
                                      labels=("namespace", "shard")),
            "bytes": GaugeMetricFamily("monim_namespace_bytes", "Bytes a namespace's columns hold on a shard's "
                                       "device (allocated)", labels=("namespace", "shard")),
            "index_state": GaugeMetricFamily("monim_namespace_index_state", "1 for the state of the namespace's "
                                             "approximate index on the shard (exact: searched exactly, too few "
                                             "rows; training: a build runs; trained), 0 for the others",
                                             labels=("namespace", "shard", "state")),
            "index_builds": CounterMetricFamily("monim_namespace_index_builds", "Builds of the namespace's index "
                                                "swapped in on the shard (first build, retrain, rebuild), since the "
                                                "shard started", labels=("namespace", "shard")),
            "index_tombstones": GaugeMetricFamily("monim_namespace_index_tombstones", "Deleted rows still in the "
                                                  "namespace's index on the shard, excluded from searches (cleared "
                                                  "past 10% of its rows, at least 1,024)", labels=("namespace", "shard")),
            "index_unindexed": GaugeMetricFamily("monim_namespace_index_unindexed_rows", "Rows waiting to enter the "
                                                 "namespace's index on the shard (hnsw: its tail, searched exactly; "
                                                 "at most 16,384), 0 for ivf", labels=("namespace", "shard")),
            "index_drift": GaugeMetricFamily("monim_namespace_index_drift", "ivf: mean quantization error of the "
                                             "recent adds over the training sample's (a retrain past 2)",
                                             labels=("namespace", "shard")),
            "index_build_seconds": GaugeMetricFamily("monim_namespace_index_build_seconds", "Seconds the latest "
                                                     "build of the namespace's index on the shard took, from its "
                                                     "start to its swap", labels=("namespace", "shard")),
            "state": GaugeMetricFamily("monim_shard_state", "1 for the shard's state (serving, recovering, "
                                       "unavailable, failed), 0 for the others", labels=("shard", "state")),
            "wal": GaugeMetricFamily("monim_wal_bytes", "Bytes of the shard's write-ahead log segments",
                                     labels=("shard",)),
            "age": GaugeMetricFamily("monim_snapshot_age_seconds", "Seconds since the shard's latest snapshot "
                                     "was written", labels=("shard",)),
            "info": GaugeMetricFamily("monim_shard_info", "Always 1: the node (host name and Ray node id) and "
                                      "device the shard runs on", labels=("shard", "node", "node_id", "device")),
            "used": GaugeMetricFamily("monim_shard_memory_used_bytes", "memory=host: the resident set of the "
                                      "shard's process; memory=gpu: the bytes torch holds on its GPU",
                                      labels=("shard", "memory")),
            "free": GaugeMetricFamily("monim_shard_memory_free_bytes", "memory=host: memory available on the "
                                      "shard's node; memory=gpu: free memory on its GPU", labels=("shard", "memory")),
            "endpoint": GaugeMetricFamily("monim_read_endpoint_info", "Always 1: the address (host:port) at which "
                                          "clients reach the shard's own read endpoint", labels=("shard", "target")),
            "streams": GaugeMetricFamily("monim_read_endpoint_streams", "Decode streams open on the shard's own "
                                         "read endpoint", labels=("shard",)),
            "socket_connections": GaugeMetricFamily("monim_read_endpoint_host_socket_connections", "Connections "
                                                    "on the read endpoint's Unix socket for clients on its host",
                                                    labels=("shard",)),
            "socket_refused": CounterMetricFamily("monim_read_endpoint_host_socket_refused", "Connections the read "
                                                  "endpoint's socket turned away past its most (they went over "
                                                  "gRPC)", labels=("shard",)),
            "calls": CounterMetricFamily("monim_read_endpoint_calls", "Calls (a Decode step: one) the shard's own "
                                         "read endpoint answered, by gRPC status (since it started)",
                                         labels=("shard", "method", "code")),
            "forwards": GaugeMetricFamily("monim_read_endpoint_forward_states", "Retrieve states the shard's own "
                                          "read endpoint keeps for their backward (handles)", labels=("shard",)),
            "forward_bytes": GaugeMetricFamily("monim_read_endpoint_forward_state_bytes", "Bytes those states hold",
                                               labels=("shard",)),
            "staged": GaugeMetricFamily("monim_shard_staged_steps", "Steps whose parts wait on the shard for their "
                                        "commit", labels=("shard",)),
            "staged_bytes": GaugeMetricFamily("monim_shard_staged_step_bytes", "Bytes the staged parts hold (their "
                                              "ids and value gradients, on the shard's device)", labels=("shard",)),
            "staged_dropped": CounterMetricFamily("monim_shard_staged_steps_dropped", "Staged steps dropped before "
                                                  "their commit: expired (uncommitted for 10 minutes) or evicted "
                                                  "(idle, for room)", labels=("shard", "why")),
            "forwards_dropped": CounterMetricFamily("monim_read_endpoint_forward_states_dropped", "Its kept states "
                                                    "dropped: evicted for room, expired unused, or asked for and not "
                                                    "found (missed)", labels=("shard", "why")),
        }

    def describe(self):
        return list(self._families().values())  # names only: registering must not ask the shards

    def collect(self):
        families = self._families()
        shards = self.metrics.probe.poll(hosts=True)
        self.metrics.learn_shards(shards)
        for shard in shards:
            label = str(shard["shard"])
            for state in SHARD_STATES:
                families["state"].add_metric((label, state), 1.0 if shard["state"] == state else 0.0)
            for name, held in sorted(shard.get("namespaces", {}).items()):
                families["rows"].add_metric((name, label), held["rows"])
                families["bytes"].add_metric((name, label), held["bytes"])
                index = held.get("index")
                if index is not None:
                    for state in INDEX_STATES:
                        families["index_state"].add_metric((name, label, state), float(index["state"] == state))
                    families["index_builds"].add_metric((name, label), index["builds"])
                    families["index_tombstones"].add_metric((name, label), index["tombstones"])
                    families["index_unindexed"].add_metric((name, label), index["unindexed"])
                    if index["drift"] is not None:
                        families["index_drift"].add_metric((name, label), index["drift"])
                    if index["builds"]:
                        families["index_build_seconds"].add_metric((name, label), index["train_seconds"])
            if shard.get("wal_bytes") is not None:
                families["wal"].add_metric((label,), shard["wal_bytes"])
            if shard.get("snapshot_age_s") is not None:
                families["age"].add_metric((label,), shard["snapshot_age_s"])
            staged = shard.get("staged")
            if staged is not None:
                families["staged"].add_metric((label,), staged["steps"])
                families["staged_bytes"].add_metric((label,), staged["bytes"])
                for why, count in sorted(staged["dropped"].items()):
                    families["staged_dropped"].add_metric((label, why), count)
            endpoint = shard.get("read_endpoint")
            if endpoint is not None:
                families["endpoint"].add_metric((label, endpoint["target"]), 1.0)
                families["streams"].add_metric((label,), endpoint["streams"])
                socket = endpoint.get("host_socket")
                if socket is not None:
                    families["socket_connections"].add_metric((label,), socket["connections"])
                    families["socket_refused"].add_metric((label,), socket["refused"])
                for (method, code), count in sorted(endpoint["calls"].items()):
                    families["calls"].add_metric((label, method, code), count)
                forwards = endpoint.get("forwards")
                if forwards is not None:
                    families["forwards"].add_metric((label,), forwards["states"])
                    families["forward_bytes"].add_metric((label,), forwards["bytes"])
                    for why, count in sorted(forwards["dropped"].items()):
                        families["forwards_dropped"].add_metric((label, why), count)
            host = shard.get("host")
            if host is not None:
                families["info"].add_metric((label, host["node"], host.get("node_id", ""), host["device"]), 1.0)
                for kind in MEMORY_KINDS:
                    for key in ("used", "free"):
                        value = host.get(f"{kind}_{key}_bytes")
                        if value is not None:
                            families[key].add_metric((label, kind), value)
        yield from families.values()


class RecentCollector(Collector):
    """Each namespace's data calls per second and their p99 latency over the last minute: summary() ->
    {namespace: (per second, p99)} (RecentCalls.summary, or rates() of the shards' read endpoints);
    prefix: the families' names, ``<prefix>_requests_per_second`` and ``<prefix>_request_p99_seconds``."""

    def __init__(self, summary, prefix: str):
        self.summary = summary
        self.prefix = prefix

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        whose = "this front end's" if self.prefix == "monim_namespace" else \
            "the shards' read endpoints' (as of the last poll of the shards; every front end reports the same)"
        return (GaugeMetricFamily(f"{self.prefix}_requests_per_second", f"Data calls on the namespace per second "
                                  f"over the last minute (any status code), {whose}", labels=("namespace",)),
                GaugeMetricFamily(f"{self.prefix}_request_p99_seconds", "99th percentile latency of those calls "
                                  "over the last minute (interpolated in the latency buckets)", labels=("namespace",)))

    def describe(self):
        return list(self._families())

    def collect(self):
        rate, p99 = self._families()
        for namespace, (per_second, quantile) in sorted(self.summary().items()):
            rate.add_metric((namespace,), per_second)
            if quantile is not None:
                p99.add_metric((namespace,), quantile)
        yield rate
        yield p99


class ForwardsCollector(Collector):
    """The front end's table of Retrieve states kept for their backward (workers/forwards.py)."""

    def __init__(self, forwards):
        self.forwards = forwards

    @staticmethod
    def _families():
        return (GaugeMetricFamily("monim_forward_states", "Retrieve states kept for their backward (handles)"),
                GaugeMetricFamily("monim_forward_state_bytes", "Bytes those states hold"),
                CounterMetricFamily("monim_forward_states_dropped", "Kept states dropped: evicted for room, expired "
                                    "unused, or asked for and not found (missed)", labels=("why",)))

    def describe(self):
        return list(self._families())

    def collect(self):
        states, held, dropped = self._families()
        states.add_metric((), len(self.forwards))
        held.add_metric((), self.forwards.bytes)
        for why in DROP_REASONS:
            dropped.add_metric((why,), self.forwards.counts[why])
        yield from (states, held, dropped)


class HostSocketCollector(Collector):
    """The front end's Unix socket for clients on its host (workers/host_socket.py)."""

    def __init__(self, host_socket):
        self.host_socket = host_socket

    @staticmethod
    def _families():
        return (GaugeMetricFamily("monim_host_socket_connections", "Connections served on the host socket "
                                  "(decode streams and calls connections of this host's clients)"),
                CounterMetricFamily("monim_host_socket_calls", "Calls taken on the host socket"),
                CounterMetricFamily("monim_host_socket_refused", "Connections turned away past the socket's "
                                    "most (their calls and streams went over gRPC)"))

    def describe(self):
        return list(self._families())

    def collect(self):
        host_socket = self.host_socket()
        if host_socket is None:
            return
        connections, calls, refused = self._families()
        connections.add_metric((), host_socket.connections)
        calls.add_metric((), host_socket.calls)
        refused.add_metric((), host_socket.refused)
        yield from (connections, calls, refused)


def serve_metrics(metrics: ServerMetrics, host: str, port: int):
    """Serves ``http://host:port/metrics`` (port 0: a free one) from a daemon thread; returns
    (the HTTP server, for shutdown(), and the bound port). OSError if it cannot listen there."""
    try:
        httpd, _ = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as error:
        raise OSError(error.errno, f"cannot serve metrics on {host}:{port}: {error.strerror or error}") from None
    return httpd, httpd.server_address[1]
