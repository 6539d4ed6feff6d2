"""Prometheus metrics, health that follows the shards, and the drain of a stopping front end,
against in-process shards (LocalRuntime with a data dir, no Ray) served on loopback; and a real
Prometheus scraping the endpoint where the `prometheus` binary is installed (CI installs it)."""

from __future__ import annotations

import collections
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from monim.protos import convert
from monim.protos import memory_pb2 as pb
from monim.protos import memory_pb2_grpc as pb_grpc
from monim.protos.config import NamespaceConfig
from monim.workers.auth import AuthPolicy
from monim.workers.frontend import PROBE_WAIT_S
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime
from monim.workers.server import start_server
from prometheus_client.parser import text_string_to_metric_families

DIM = 8
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
RNG = np.random.default_rng(7)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_prometheus(config, tsdb, log_path, tries: int = 5):
    """A Prometheus on a free loopback port: (process, port). A port picked and freed here can be
    taken before Prometheus binds it; then it exits saying so, and another port is tried."""
    for _ in range(tries):
        port = _free_port()
        with open(log_path, "w") as log:
            prometheus = subprocess.Popen(
                ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tsdb}",
                 f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and prometheus.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2):
                    return prometheus, port
            except OSError:  # not listening yet, or not ready
                time.sleep(0.2)
        if prometheus.poll() is None:
            return prometheus, port  # up but slow to say ready: the test's own deadline decides
        if "address already in use" not in log_path.read_text():
            raise AssertionError("prometheus exited:\n" + log_path.read_text())
    raise AssertionError(f"prometheus found no free port in {tries} tries:\n" + log_path.read_text())


class Deployment:
    """Two in-process shards on a data dir, served with metrics on a free port."""

    def __init__(self, data_dir, auth=None, snapshot_every=6):
        self.data_dir = pathlib.Path(data_dir)
        self.runtime = LocalRuntime(2, data_dir=str(data_dir), fsync="never", snapshot_every=snapshot_every)
        self.router = Router(self.runtime)
        self.server, port = start_server(self.router, port=0, auth=auth, metrics_port=0, health_poll_s=0.3)
        self.address = f"127.0.0.1:{port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.MemoryServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.calls: collections.Counter = collections.Counter()  # (method, namespace label, code) -> calls

    def call(self, method: str, request, namespace_label: str = "", metadata=None):
        """One RPC; counts it under the code it ended with; returns (code, response or None)."""
        try:
            response = getattr(self.stub, method)(request, timeout=30, metadata=metadata)
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            response, code = None, error.code()
        self.calls[(method, namespace_label, code.name)] += 1
        return code, response

    def scrape(self) -> dict:
        """Every sample of /metrics: {metric name: [(labels, value)]}."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.server.metrics_port}/metrics", timeout=30) as answer:
            text = answer.read().decode()
        samples = collections.defaultdict(list)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[sample.name].append((sample.labels, sample.value))
        return samples

    def health_status(self, service: str = "") -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status

    def close(self):
        self.channel.close()
        self.server.stop(0).wait()
        self.runtime.shutdown()


@pytest.fixture
def deployment(tmp_path):
    deployment = Deployment(tmp_path / "data")
    yield deployment
    deployment.close()


def create(deployment, name: str, expect=grpc.StatusCode.OK):
    config = convert.config_to_proto(NamespaceConfig(name=name, dim=DIM, max_k=16))
    code, _ = deployment.call("CreateNamespace", pb.CreateNamespaceRequest(config=config), name)  # OK: it exists
    assert code == expect


def add_request(name: str, rows: int) -> pb.AddRequest:
    return pb.AddRequest(namespace=name, keys=convert.tensor_to_proto(RNG.standard_normal((rows, DIM), np.float32)),
                         tokens=convert.tensor_to_proto(np.arange(rows, dtype=np.int32)))


def search_request(name: str, dim: int = DIM) -> pb.SearchRequest:
    return pb.SearchRequest(namespace=name, k=4,
                            queries=convert.tensor_to_proto(RNG.standard_normal((3, dim), np.float32)))


def a_mix_of_calls(deployment) -> None:
    """OK calls on two namespaces, and failing ones: INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS."""
    ok, invalid, not_found = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    create(deployment, "metrics-a")
    create(deployment, "metrics-b")
    for rows in (10, 20, 7):
        assert deployment.call("Add", add_request("metrics-a", rows), "metrics-a")[0] == ok
    assert deployment.call("Add", add_request("metrics-b", 5), "metrics-b")[0] == ok
    for _ in range(2):
        assert deployment.call("Search", search_request("metrics-a"), "metrics-a")[0] == ok
    # A bad query on a namespace that exists keeps its name; a namespace that does not exist is
    # "unknown" (anyone may invent names: they must not become series).
    assert deployment.call("Search", search_request("metrics-a", dim=DIM + 1), "metrics-a")[0] == invalid
    assert deployment.call("Add", add_request("metrics-b", 0), "metrics-b")[0] == invalid
    for name in ("no-such-namespace", "another-typo"):
        assert deployment.call("Search", search_request(name), "unknown")[0] == not_found
    assert deployment.call("Get", pb.GetRequest(namespace="metrics-a", ids=convert.tensor_to_proto(
        np.array([10**9], np.int64))), "metrics-a")[0] == not_found
    create(deployment, "metrics-b", expect=grpc.StatusCode.ALREADY_EXISTS)
    assert deployment.call("ListNamespaces", pb.ListNamespacesRequest())[0] == ok


def test_request_counters_rows_and_latency_match_the_calls(deployment):
    a_mix_of_calls(deployment)
    described = {}
    for name in ("metrics-a", "metrics-b"):
        code, described[name] = deployment.call("DescribeNamespace", pb.DescribeNamespaceRequest(namespace=name),
                                                name)
        assert code == grpc.StatusCode.OK
    for shard in deployment.runtime.shards:
        shard.wait_for_snapshot()  # the log's segments stay as they are while we compare them
    samples = deployment.scrape()

    counted = collections.Counter()
    for labels, value in samples["monim_requests_total"]:
        assert labels["token"] == ""
        counted[(labels["method"], labels["namespace"], labels["code"])] += value
    assert counted == deployment.calls
    by_method = collections.Counter()
    for (method, _, _), calls in deployment.calls.items():
        by_method[method] += calls
    histogram = {labels["method"]: value for labels, value in samples["monim_request_duration_seconds_count"]}
    assert histogram == by_method
    assert all(value > 0 for _, value in samples["monim_request_duration_seconds_sum"])
    assert samples["monim_requests_in_flight"] == [({}, 0.0)]

    rows = {(labels["namespace"], int(labels["shard"])): value for labels, value in samples["monim_namespace_rows"]}
    assert rows == {(name, s.shard): s.rows for name, d in described.items() for s in d.shards}
    assert sum(rows[("metrics-a", s)] for s in (0, 1)) == 37
    for labels, value in samples["monim_namespace_bytes"]:
        assert value >= rows[(labels["namespace"], int(labels["shard"]))] * DIM * 4 and value > 0

    states = {(int(labels["shard"]), labels["state"]): value for labels, value in samples["monim_shard_state"]}
    assert states == {(s, state): float(state == "serving") for s in (0, 1)
                      for state in ("serving", "recovering", "unavailable", "failed")}
    for labels, value in samples["monim_wal_bytes"]:
        segments = (deployment.data_dir / f"shard-{labels['shard']}" / "wal").glob("*.wal")
        assert value == sum(path.stat().st_size for path in segments)
    ages = {int(labels["shard"]): value for labels, value in samples["monim_snapshot_age_seconds"]}
    assert set(ages) == {0, 1}  # 6 records per shard: each has written a snapshot
    assert all(0 <= age < 120 for age in ages.values())


def test_calls_refused_by_auth_are_counted_without_inventing_namespaces(tmp_path):
    auth_file = tmp_path / "auth.toml"
    auth_file.write_text('[[token]]\nname = "ops"\nsecret = "ops-secret-1"\nadmin = true\nread = ["*"]\n'
                         'write = ["*"]\n\n[[token]]\nname = "reader"\nsecret = "reader-secret-2"\nread = ["*"]\n')
    deployment = Deployment(tmp_path / "data", auth=AuthPolicy.load(str(auth_file)))
    try:
        ops = [("authorization", "Bearer ops-secret-1")]
        reader = [("authorization", "Bearer reader-secret-2")]
        config = convert.config_to_proto(NamespaceConfig(name="guarded", dim=DIM))
        assert deployment.call("CreateNamespace", pb.CreateNamespaceRequest(config=config), "guarded",
                               metadata=ops)[0] == grpc.StatusCode.OK
        code, _ = deployment.call("Search", search_request("made-up-by-a-stranger"), "unknown")
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, _ = deployment.call("Add", add_request("guarded", 3), "guarded", metadata=reader)
        assert code == grpc.StatusCode.PERMISSION_DENIED
        samples = deployment.scrape()
        counted = {(labels["method"], labels["namespace"], labels["code"], labels["token"]): value
                   for labels, value in samples["monim_requests_total"]}
        assert counted == {("CreateNamespace", "guarded", "OK", "ops"): 1,
                           ("Search", "unknown", "UNAUTHENTICATED", ""): 1,
                           ("Add", "guarded", "PERMISSION_DENIED", "reader"): 1}
    finally:
        deployment.close()


def wait_for_health(deployment, status: int, within_s: float) -> float:
    started = time.monotonic()
    while deployment.health_status() != status:
        assert time.monotonic() - started < within_s, f"health did not turn {status} within {within_s} s"
        time.sleep(0.05)
    return time.monotonic() - started


def test_health_turns_not_serving_when_a_shard_dies(deployment):
    assert deployment.health_status() == SERVING
    assert deployment.health_status("monim.v1.MemoryService") == SERVING
    deployment.runtime.kill_shard(1)
    wait_for_health(deployment, NOT_SERVING, within_s=5)
    assert deployment.health_status("monim.v1.MemoryService") == NOT_SERVING
    states = {(labels["shard"], labels["state"]): value for labels, value in deployment.scrape()["monim_shard_state"]}
    assert states[("1", "unavailable")] == 1 and states[("1", "serving")] == 0
    assert states[("0", "serving")] == 1


def test_a_hung_shard_never_holds_a_scrape_up_and_health_recovers(deployment):
    """A shard that takes calls but never answers them (a hung process). A shard merely busy under its
    lock still answers health: tests/unit/test_shard_probe.py."""
    create(deployment, "hang")
    shard = deployment.runtime.shards[0]
    answer = threading.Event()
    shard.metrics = lambda: answer.wait(30) and {}  # shard 0 stops answering
    try:
        started = time.monotonic()
        samples = deployment.scrape()
        assert time.monotonic() - started < PROBE_WAIT_S + 2
        states = {(labels["shard"], labels["state"]): value for labels, value in samples["monim_shard_state"]}
        assert states[("0", "unavailable")] == 1 and states[("1", "serving")] == 1
        assert {labels["shard"] for labels, _ in samples["monim_namespace_rows"]} == {"1"}
        wait_for_health(deployment, NOT_SERVING, within_s=PROBE_WAIT_S + 3)
    finally:
        del shard.metrics
        answer.set()
    wait_for_health(deployment, SERVING, within_s=PROBE_WAIT_S + 3)


# ----- approximate indexes ------------------------------------------------------------------------
INDEX_FAMILIES = ("monim_namespace_index_state", "monim_namespace_index_builds_total",
                  "monim_namespace_index_tombstones", "monim_namespace_index_unindexed_rows",
                  "monim_namespace_index_drift", "monim_namespace_index_build_seconds")


def create_indexed(deployment) -> dict[str, np.ndarray]:
    """An hnsw and an ivf_flat namespace (train_min_rows 200) with 600 rows each (300 a shard: ids go
    to shard id % 2), built on both shards, and a flat one; {name: the ids added}."""
    configs = (NamespaceConfig(name="graph", dim=DIM, max_k=16, index="hnsw", train_min_rows=200),
               NamespaceConfig(name="lists", dim=DIM, max_k=16, index="ivf_flat", nlist=4, train_min_rows=200),
               NamespaceConfig(name="plain", dim=DIM, max_k=16))
    added = {}
    for config in configs:
        request = pb.CreateNamespaceRequest(config=convert.config_to_proto(config))
        assert deployment.call("CreateNamespace", request, config.name)[0] == grpc.StatusCode.OK
        code, response = deployment.call("Add", add_request(config.name, 600), config.name)
        assert code == grpc.StatusCode.OK
        added[config.name] = convert.tensor_from_proto(response.ids, "ids")
    for shard in deployment.runtime.shards:
        for name in ("graph", "lists"):
            assert shard.stores[name].wait_for_index(60)
    return added


def index_samples(samples: dict, family: str) -> dict:
    """{(namespace, shard) or (namespace, shard, state): value} of one family."""
    return {tuple(labels[key] for key in ("namespace", "shard", "state") if key in labels): value
            for labels, value in samples[family]}


def test_index_metrics_follow_the_builds_and_the_deletes(deployment):
    added = create_indexed(deployment)
    deleted = {"graph": np.concatenate([added["graph"][:5], added["graph"][-4:]]), "lists": added["lists"][10:16]}
    for name, ids in deleted.items():
        code, response = deployment.call("Delete", pb.DeleteRequest(namespace=name, ids=convert.tensor_to_proto(ids)),
                                         name)
        assert code == grpc.StatusCode.OK and response.deleted == ids.size
    samples = deployment.scrape()
    keys = {(name, shard) for name in ("graph", "lists") for shard in ("0", "1")}

    states = index_samples(samples, "monim_namespace_index_state")
    assert states == {(name, shard, state): float(state == "trained") for name, shard in keys
                      for state in ("exact", "training", "trained")}
    builds = index_samples(samples, "monim_namespace_index_builds_total")
    assert set(builds) == keys and all(value >= 1 for value in builds.values())
    tombstones = index_samples(samples, "monim_namespace_index_tombstones")
    assert tombstones == {(name, str(shard)): float((deleted[name] % 2 == shard).sum())
                          for name in deleted for shard in (0, 1)}
    assert sum(tombstones[("graph", shard)] for shard in ("0", "1")) == 9
    assert sum(tombstones[("lists", shard)] for shard in ("0", "1")) == 6
    assert index_samples(samples, "monim_namespace_index_unindexed_rows") == {key: 0.0 for key in keys}
    drift = index_samples(samples, "monim_namespace_index_drift")
    assert set(drift) == {("lists", "0"), ("lists", "1")} and all(value >= 0 for value in drift.values())
    seconds = index_samples(samples, "monim_namespace_index_build_seconds")
    assert set(seconds) == keys and all(value > 0 for value in seconds.values())
    for family in INDEX_FAMILIES:  # a flat namespace has no index, so no index sample
        assert all(labels["namespace"] != "plain" for labels, _ in samples[family])
    assert {labels["namespace"] for labels, _ in samples["monim_namespace_rows"]} == {"graph", "lists", "plain"}

    # The same figures as DescribeNamespace's (under the stores' locks).
    for name in ("graph", "lists"):
        code, described = deployment.call("DescribeNamespace", pb.DescribeNamespaceRequest(namespace=name), name)
        assert code == grpc.StatusCode.OK
        for stats in described.shards:
            assert stats.index_state == "trained"
            assert stats.index_trainings == builds[(name, str(stats.shard))]
            assert stats.index_tombstones == tombstones[(name, str(stats.shard))]


def test_index_metrics_are_read_without_the_stores_lock(deployment):
    """A store busy under its lock (a long search or add) must not stall health or a scrape."""
    create_indexed(deployment)
    shard = deployment.runtime.shards[0]
    held, release = threading.Event(), threading.Event()

    def busy(store):
        with store._lock:
            held.set()
            release.wait(30)

    holders = []
    try:
        for name in ("graph", "lists"):
            held.clear()
            holders.append(threading.Thread(target=busy, args=(shard.stores[name],), daemon=True))
            holders[-1].start()
            assert held.wait(5)
        answer = {}
        reading = threading.Thread(target=lambda: answer.update(shard.metrics()), daemon=True)
        reading.start()
        reading.join(5)
        assert not reading.is_alive(), "Shard.metrics waited for a store's lock"
        assert answer["namespaces"]["graph"]["index"]["state"] == "trained"
        assert answer["namespaces"]["lists"]["index"]["builds"] >= 1
        assert "index" not in answer["namespaces"]["plain"]
        states = index_samples(deployment.scrape(), "monim_namespace_index_state")  # shard 0 answered in time
        assert states[("graph", "0", "trained")] == 1 and states[("lists", "0", "trained")] == 1
    finally:
        release.set()
        for holder in holders:
            holder.join(10)


# ----- draining ---------------------------------------------------------------------------------
def test_stop_drains_calls_in_flight_and_refuses_new_ones(deployment):
    create(deployment, "drain")
    assert deployment.call("Add", add_request("drain", 8), "drain")[0] == grpc.StatusCode.OK
    shard = deployment.runtime.shards[0]
    shard._lock.acquire()  # the search below waits for shard 0 until we let it go
    answer = {}
    try:
        searching = threading.Thread(target=lambda: answer.update(code=deployment.call(
            "Search", search_request("drain"), "drain")[0]))
        searching.start()
        deadline = time.monotonic() + 10
        while deployment.server.gate.in_flight < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        stopped = deployment.server.stop(30)
        assert deployment.health_status() == NOT_SERVING
        code, _ = deployment.call("ListNamespaces", pb.ListNamespacesRequest())
        assert code == grpc.StatusCode.UNAVAILABLE
        try:
            deployment.stub.ListNamespaces(pb.ListNamespacesRequest(), timeout=10)
        except grpc.RpcError as error:
            assert "shutting down" in error.details()
        assert not stopped.wait(0.5)  # the search is still running: the server waits for it
    finally:
        shard._lock.release()
    searching.join(30)
    assert answer == {"code": grpc.StatusCode.OK}
    assert stopped.wait(10)


def test_stop_cancels_what_outlasts_the_grace_period(deployment):
    create(deployment, "late")
    shard = deployment.runtime.shards[1]
    shard._lock.acquire()
    answer = {}
    try:
        searching = threading.Thread(target=lambda: answer.update(code=deployment.call(
            "Search", search_request("late"), "late")[0]))
        searching.start()
        deadline = time.monotonic() + 10
        while deployment.server.gate.in_flight < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        started = time.monotonic()
        assert deployment.server.stop(1.0).wait(10)
        assert time.monotonic() - started < 4
        searching.join(10)
        assert answer["code"] != grpc.StatusCode.OK
    finally:
        shard._lock.release()


# ----- a real Prometheus ------------------------------------------------------------------------
def _prometheus_query(port: int, query: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as answer:
        body = json.load(answer)
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="the prometheus binary is not on PATH (Debian: apt-get install prometheus; CI installs it)")
def test_a_real_prometheus_scrapes_the_counters(deployment, tmp_path):
    a_mix_of_calls(deployment)
    expected = collections.Counter()
    for (method, _, code), calls in deployment.calls.items():
        expected[(method, code)] += calls
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: monim
    scrape_interval: 1s
    scrape_timeout: 1s
    static_configs:
      - targets: ["127.0.0.1:{deployment.server.metrics_port}"]
""")
    log_path = tmp_path / "prometheus.log"
    prometheus, port = _start_prometheus(config, tmp_path / "tsdb", log_path)
    try:
        deadline = time.monotonic() + 60
        seen: collections.Counter = collections.Counter()
        while time.monotonic() < deadline:
            assert prometheus.poll() is None, "prometheus exited:\n" + log_path.read_text()
            try:
                result = _prometheus_query(port, "monim_requests_total")
            except OSError:  # not listening yet
                result = []
            seen = collections.Counter()
            for series in result:
                labels = series["metric"]
                assert labels["job"] == "monim"
                seen[(labels["method"], labels["code"])] += float(series["value"][1])
            if seen == expected:
                break
            time.sleep(0.5)
        assert seen == expected, "prometheus log:\n" + log_path.read_text()[-3000:]
        rows = _prometheus_query(port, 'sum by (namespace) (monim_namespace_rows{namespace="metrics-a"})')
        assert [float(series["value"][1]) for series in rows] == [37.0]
    finally:
        prometheus.send_signal(signal.SIGTERM)
        try:
            prometheus.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(prometheus.pid, signal.SIGKILL)
            prometheus.wait()
