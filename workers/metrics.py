"""Prometheus metrics of one front end (``monim serve --metrics-port P``), through prometheus-client.

Every front end has its own CollectorRegistry (never the process-wide one), so several front ends
and tests in one process do not collide. What it exports (docs/OPERATIONS.md, "Watch it"):

    monim_requests_total{method, namespace, code, token}   counter: MemoryService calls, by gRPC status
                                                          (OK too; refused by auth or by a drain too)
    monim_request_duration_seconds{method}                histogram: from arrival to answer
    monim_requests_in_flight                              gauge: calls being served (queue depth)
    monim_namespace_rows{namespace, shard}                gauge: rows each shard holds
    monim_namespace_bytes{namespace, shard}               gauge: bytes their columns hold (allocated)
    monim_shard_state{shard, state}                       gauge: 1 for the shard's state, 0 for the others
    monim_wal_bytes{shard}                                gauge: the shard's log segments (data dir only)
    monim_snapshot_age_seconds{shard}                     gauge: since its latest snapshot (once there is one)

The per-shard gauges are read when Prometheus scrapes (``ShardCollector``), through the front end's
ShardProbe: a shard that does not answer within its wait is reported by its state only, and never
holds the scrape up. Label values stay bounded: ``namespace`` is a namespace that exists (a call on
any other name, say one refused for a typo, counts under "unknown"; a call that names none under
""), and ``token`` is a token name from the auth file ("" without auth or for an unknown token).
"""

from __future__ import annotations

import logging
import threading

import grpc
from monim.workers.auth import METHOD_ACCESS
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

SHARD_STATES = ("serving", "recovering", "unavailable", "failed")
UNKNOWN_NAMESPACE = "unknown"
# Seconds; gRPC calls here take from a millisecond (a cached config) to minutes (a restore).
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServerMetrics:
    """The metrics of one front end. probe: its ShardProbe (workers/frontend.py); in_flight: a
    function that returns the number of calls being served."""

    def __init__(self, probe, in_flight):
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
        self.registry.register(ShardCollector(self))

    def learn(self, namespaces) -> None:
        """Namespaces that exist (as shards or a successful call report them) may be labels."""
        with self._known_lock:
            self._known.update(namespaces)

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
        self.requests.labels(method, self.namespace_label(method, request, code), code.name, token).inc()
        self.latency.labels(method).observe(seconds)


class ShardCollector(Collector):
    """Reads every shard's rows, bytes, state, log size and snapshot age when Prometheus scrapes."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    @staticmethod
    def _families() -> dict[str, GaugeMetricFamily]:
        return {
            "rows": GaugeMetricFamily("monim_namespace_rows", "Rows a shard holds of a namespace",
                                      labels=("namespace", "shard")),
            "bytes": GaugeMetricFamily("monim_namespace_bytes", "Bytes a namespace's columns hold on a shard's "
                                       "device (allocated)", labels=("namespace", "shard")),
            "state": GaugeMetricFamily("monim_shard_state", "1 for the shard's state (serving, recovering, "
                                       "unavailable, failed), 0 for the others", labels=("shard", "state")),
            "wal": GaugeMetricFamily("monim_wal_bytes", "Bytes of the shard's write-ahead log segments",
                                     labels=("shard",)),
            "age": GaugeMetricFamily("monim_snapshot_age_seconds", "Seconds since the shard's latest snapshot "
                                     "was written", labels=("shard",)),
        }

    def describe(self):
        return list(self._families().values())  # names only: registering must not ask the shards

    def collect(self):
        families = self._families()
        shards = self.metrics.probe.poll()
        self.metrics.learn(name for shard in shards for name in shard.get("namespaces", {}))
        for shard in shards:
            label = str(shard["shard"])
            for state in SHARD_STATES:
                families["state"].add_metric((label, state), 1.0 if shard["state"] == state else 0.0)
            for name, held in sorted(shard.get("namespaces", {}).items()):
                families["rows"].add_metric((name, label), held["rows"])
                families["bytes"].add_metric((name, label), held["bytes"])
            if shard.get("wal_bytes") is not None:
                families["wal"].add_metric((label,), shard["wal_bytes"])
            if shard.get("snapshot_age_s") is not None:
                families["age"].add_metric((label,), shard["snapshot_age_s"])
        yield from families.values()


def serve_metrics(metrics: ServerMetrics, host: str, port: int):
    """Serves ``http://host:port/metrics`` (port 0: a free one) from a daemon thread; returns
    (the HTTP server, for shutdown(), and the bound port). OSError if it cannot listen there."""
    try:
        httpd, _ = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as error:
        raise OSError(error.errno, f"cannot serve metrics on {host}:{port}: {error.strerror or error}") from None
    return httpd, httpd.server_address[1]
