"""`monim namespace` and `monim status` against a server on loopback: two in-process shards on a data
dir (LocalRuntime, no Ray) with metrics, two namespaces with rows, writes and searches."""

from __future__ import annotations

import io
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from monim.model_client import MemoryClient
from monim.workers.auth import AuthPolicy
from monim.workers.cli import main
from monim.workers.cli_status import COLUMNS, SHARD_FIELDS
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime
from monim.workers.server import start_server

ROOT = pathlib.Path(__file__).resolve().parents[2]
RNG = np.random.default_rng(11)
# Data calls made on each namespace before the status is asked (Add and Search).
CALLS = {"wiki": 6 + 10, "news": 2 + 3}


class Deployment:
    def __init__(self, data_dir, auth=None):
        self.runtime = LocalRuntime(2, data_dir=str(data_dir), fsync="never", snapshot_every=4)
        self.server, port = start_server(Router(self.runtime), port=0, auth=auth, metrics_port=0, health_poll_s=0.3)
        self.address = f"127.0.0.1:{port}"
        self.metrics = f"127.0.0.1:{self.server.metrics_port}"

    def close(self):
        self.server.stop(0).wait()
        self.runtime.shutdown()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    deployment = Deployment(tmp_path_factory.mktemp("cli-admin"))
    with MemoryClient(deployment.address, token="") as client:
        client.create_namespace("wiki", dim=8, value_dim=4)
        client.create_namespace("news", dim=16, metric="ip", key_dtype="float16")
        for name, dim, adds, searches in (("wiki", 8, 6, 10), ("news", 16, 2, 3)):
            for _ in range(adds):
                client.add(name, RNG.standard_normal((40, dim), dtype=np.float32), tokens=np.arange(40))
            for _ in range(searches):
                client.search(name, RNG.standard_normal((2, dim), dtype=np.float32), k=4)
    yield deployment
    deployment.close()


@pytest.fixture(autouse=True)
def no_token_in_the_environment(monkeypatch):
    monkeypatch.delenv("MONIM_TOKEN", raising=False)


def monim(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


class Terminal(io.StringIO):
    """stdin as a person at a terminal types it."""

    def isatty(self) -> bool:
        return True


# ----- monim namespace ----------------------------------------------------------------------------
def test_create_list_describe_drop(deployment, capsys, monkeypatch):
    at = ("--address", deployment.address)
    code, out, err = monim(capsys, "namespace", "create", "cli-made", "--dim", "12", "--value-dim", "3", "--metric",
                           "ip", "--optimizer", "adam", "--lr", "0.002", "--beta1", "0.8", "--max-k", "64", *at)
    assert code == 0, err
    assert out.startswith("created cli-made: dim 12, ip, flat, value_dim 3, max_k 64")
    code, out, _ = monim(capsys, "namespace", "list", "--json", *at)
    configs = {config["name"]: config for config in json.loads(out)}
    assert set(configs) >= {"wiki", "news", "cli-made"}
    made = configs["cli-made"]
    assert (made["dim"], made["metric"], made["value_dim"], made["max_k"]) == (12, "ip", 3, 64)
    assert (made["optimizer"]["name"], made["optimizer"]["lr"], made["optimizer"]["beta1"]) == ("adam", 0.002, 0.8)
    assert made["optimizer"]["beta2"] == 0.999  # not given: the optimizer's default
    code, out, _ = monim(capsys, "namespace", "list", *at)
    assert code == 0 and all(name in out for name in ("wiki", "news", "cli-made", "adam (lr 0.002)"))

    code, out, _ = monim(capsys, "namespace", "describe", "wiki", "--json", *at)
    described = json.loads(out)
    assert described["rows"] == 6 * 40 and described["config"]["value_dim"] == 4
    assert [s["shard"] for s in described["shards"]] == [0, 1]
    assert sum(s["rows"] for s in described["shards"]) == 240 and {s["state"] for s in described["shards"]} == {"serving"}
    code, out, _ = monim(capsys, "namespace", "describe", "wiki", *at)
    assert code == 0 and "240 rows" in out and "serving" in out and "faiss" in out

    # drop: refused without --yes when nobody can confirm; a wrong name typed keeps it; the name drops it.
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, _, err = monim(capsys, "namespace", "drop", "cli-made", *at)
    assert code == 2 and "pass --yes" in err and err.count("\n") == 1
    monkeypatch.setattr(sys, "stdin", Terminal("cli-mad\n"))
    code, out, err = monim(capsys, "namespace", "drop", "cli-made", *at)
    assert code == 1 and "'cli-made' and its 0 rows" in out and "not dropped" in err
    assert "cli-made" in {c.name for c in MemoryClient(deployment.address).list_namespaces()}
    monkeypatch.setattr(sys, "stdin", Terminal("cli-made\n"))
    code, out, _ = monim(capsys, "namespace", "drop", "cli-made", *at)
    assert code == 0 and out.rstrip().endswith("dropped cli-made: 0 rows")
    assert "cli-made" not in {c.name for c in MemoryClient(deployment.address).list_namespaces()}

    code, _, _ = monim(capsys, "namespace", "create", "gone-soon", "--dim", "4", *at)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, out, _ = monim(capsys, "namespace", "drop", "gone-soon", "--yes", *at)
    assert code == 0 and out == "dropped gone-soon: 0 rows\n"


@pytest.mark.parametrize("args, message", [
    (("create", "bad", "--dim", "0"), "dim must be in [1, 65536], got 0"),
    (("create", "wiki", "--dim", "8"), "wiki"),
    (("describe", "nope"), "nope"),
    (("drop", "nope", "--yes"), "nope"),
])
def test_namespace_errors_are_one_line_and_exit_2(deployment, capsys, args, message):
    code, out, err = monim(capsys, "namespace", *args, "--address", deployment.address)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"monim namespace {args[0]}: ") and message in err


def test_namespace_commands_send_the_token(tmp_path, capsys, monkeypatch):
    auth_file = tmp_path / "auth.toml"
    auth_file.write_text('[[token]]\nname = "ops"\nsecret = "ops-secret-1"\nadmin = true\n\n'
                         '[[token]]\nname = "reader"\nsecret = "reader-secret-1"\nread = ["*"]\n')
    secured = Deployment(tmp_path / "data", auth=AuthPolicy.load(str(auth_file)))
    try:
        at = ("--address", secured.address)
        code, _, err = monim(capsys, "namespace", "create", "t", "--dim", "4", *at)
        assert code == 2 and "no token" in err
        code, _, err = monim(capsys, "namespace", "create", "t", "--dim", "4", "--token", "reader-secret-1", *at)
        assert code == 2 and "may not call CreateNamespace" in err and "reader-secret-1" not in err
        monkeypatch.setenv("MONIM_TOKEN", "ops-secret-1")
        code, out, err = monim(capsys, "namespace", "create", "t", "--dim", "4", *at)
        assert code == 0, err
        code, out, _ = monim(capsys, "status", "--json", "--metrics", secured.metrics, *at)
        assert code == 0 and [n["name"] for n in json.loads(out)["namespaces"]] == ["t"]
    finally:
        secured.close()


# ----- monim status -------------------------------------------------------------------------------
def test_status_prints_every_column_for_every_namespace_and_shard(deployment, capsys):
    code, out, err = monim(capsys, "status", "--address", deployment.address, "--metrics", deployment.metrics)
    assert code == 0, err
    assert out.startswith(f"{deployment.address}: 2 namespace(s), 2 shard(s); metrics from http://")
    header, *sections = re.split(r"\n(?=(?:wiki|news): dim)", out)
    tables = {section.split(":")[0]: section for section in sections}
    assert set(tables) == {"wiki", "news"}
    assert tables["wiki"].startswith("wiki: dim 8, l2, flat, value_dim 4, keys auto")
    assert tables["news"].startswith("news: dim 16, ip, flat, value_dim 0, keys float16")
    host = socket.gethostname()
    for name, total_rows in (("wiki", "240"), ("news", "80")):
        table = tables[name]
        header = next(line for line in table.splitlines() if "shard" in line and "node" in line)
        assert all(column in header for column in COLUMNS), header
        rows = [line for line in table.splitlines() if line.startswith("│")]
        shard_rows = [line for line in rows if line.split("│")[1].strip() in ("0", "1")]
        total = next(line for line in rows if line.split("│")[1].strip() == "all")
        assert len(shard_rows) == 2
        for line in shard_rows:
            cells = [cell.strip() for cell in line.split("│")[1:-1]]
            shard, node, device, rows_held, size, host_memory, gpu_memory, rate, p99, state, snapshot, endpoint = cells
            assert node == host and device == "cpu" and int(rows_held.replace(",", "")) > 0
            assert size.endswith("iB") and " / " in host_memory and host_memory.count("iB") == 2
            assert gpu_memory == "-" and (rate, p99) == ("", "")  # a CPU shard; rate and p99 are the namespace's
            assert state == "serving" and snapshot.endswith("ago")
            assert endpoint == "-"  # this server runs no read endpoints (test_read_endpoints.py shows one)
        cells = [cell.strip() for cell in total.split("│")[1:-1]]
        assert cells[3] == total_rows and cells[4].endswith("iB")
        assert float(cells[7]) > 0 and cells[8].endswith("ms") and cells[9] == "serving"


def test_status_json_has_every_field(deployment, capsys):
    code, out, err = monim(capsys, "status", "--json", "--address", deployment.address, "--metrics",
                           f"http://{deployment.metrics}/metrics")
    assert code == 0, err
    report = json.loads(out)
    assert report["address"] == deployment.address and report["metrics_errors"] == {}
    by_name = {namespace["name"]: namespace for namespace in report["namespaces"]}
    assert set(by_name) == {"wiki", "news"}
    described = {name: MemoryClient(deployment.address).describe_namespace(name) for name in by_name}
    for name, namespace in by_name.items():
        assert namespace["config"]["name"] == name and namespace["rows"] == described[name].rows
        assert namespace["next_id"] == described[name].next_id
        # Calls of the last minute over at most a minute: between calls/60 and calls per second.
        assert CALLS[name] / 60 - 1e-9 <= namespace["requests_per_s"] <= CALLS[name]
        assert 0 < namespace["p99_latency_s"] < 30
        assert [shard["shard"] for shard in namespace["shards"]] == [0, 1]
        for shard, stats in zip(namespace["shards"], described[name].shards):
            assert set(shard) == set(SHARD_FIELDS)
            assert shard["rows"] == stats["rows"] and shard["device"] == "cpu" and shard["state"] == "serving"
            assert shard["node"] == socket.gethostname() and shard["node_id"] == ""
            assert shard["bytes"] > 0 and shard["wal_bytes"] >= 0 and shard["snapshot_age_s"] >= 0
            assert shard["host_memory_used_bytes"] > 0 and shard["host_memory_free_bytes"] > 0
            assert shard["gpu_memory_used_bytes"] is None and shard["gpu_memory_free_bytes"] is None


def test_status_without_metrics_shows_dashes_and_a_dead_endpoint_says_so(deployment, capsys):
    code, out, _ = monim(capsys, "status", "--address", deployment.address)
    assert code == 0 and "need --metrics URL" in out and "240" in out
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{unused.getsockname()[1]}"
    code, out, _ = monim(capsys, "status", "--json", "--address", deployment.address, "--metrics", dead)
    report = json.loads(out)
    assert code == 0 and list(report["metrics_errors"]) == [f"http://{dead}/metrics"]
    shard = report["namespaces"][0]["shards"][0]
    assert shard["rows"] > 0 and shard["node"] is None and shard["host_memory_used_bytes"] is None
    assert report["namespaces"][0]["requests_per_s"] is None
    code, out, _ = monim(capsys, "status", "--address", deployment.address, "--metrics", dead)
    assert code == 0 and f"metrics http://{dead}/metrics:" in out


def test_status_of_a_server_that_does_not_answer(capsys):
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{unused.getsockname()[1]}"
    code, out, err = monim(capsys, "status", "--address", address, "--timeout-s", "2")
    assert code == 2 and out == "" and err.startswith(f"monim status: {address}: ") and err.count("\n") == 1


@pytest.mark.parametrize("as_json", [False, True])
def test_status_watch_redraws_until_ctrl_c(deployment, as_json):
    env = {k: v for k, v in os.environ.items() if k != "MONIM_TOKEN"}
    command = [sys.executable, "-m", "monim.workers.cli", "status", "--address", deployment.address, "--metrics",
               deployment.metrics, "--watch", "0.3"] + (["--json"] if as_json else [])
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    views: list[str] = []
    reader = threading.Thread(target=lambda: views.extend(process.stdout), daemon=True)
    reader.start()
    try:
        marker = '"address"' if as_json else f"{deployment.address}: 2 namespace(s)"
        deadline = time.monotonic() + 60
        while sum(marker in line for line in list(views)) < 3:
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "".join(views)
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(10)
    if as_json:
        reports = [json.loads(line) for line in views]
        assert len(reports) >= 3 and all({n["name"] for n in r["namespaces"]} == {"wiki", "news"} for r in reports)
    else:
        assert "last snapshot" in "".join(views) and "Traceback" not in "".join(views)


def test_an_hnsw_namespace_made_and_described_from_the_command_line(deployment, capsys):
    at = ("--address", deployment.address)
    code, out, err = monim(capsys, "namespace", "create", "cli-graph", "--dim", "8", "--index", "hnsw", "--hnsw-m", "16",
                           "--ef-construction", "40", "--train-min-rows", "100", *at)
    assert code == 0, err
    assert "hnsw (hnsw_m 16, ef_construction 40, builds at 100 rows a shard)" in out
    try:
        with MemoryClient(deployment.address) as client:
            client.add("cli-graph", np.random.default_rng(5).standard_normal((400, 8)).astype(np.float32),
                       np.zeros(400, np.int32))
            deadline = time.monotonic() + 60
            while any(s["index_state"] != "trained" for s in client.describe_namespace("cli-graph").shards):
                assert time.monotonic() < deadline, client.describe_namespace("cli-graph").shards
                time.sleep(0.1)
        code, out, _ = monim(capsys, "namespace", "describe", "cli-graph", *at)
        assert code == 0 and out.count("trained (1 builds, 0 tombstones)") == 2, out
        code, out, _ = monim(capsys, "namespace", "describe", "cli-graph", "--json", *at)
        described = json.loads(out)
        assert (described["config"]["hnsw_m"], described["config"]["ef_construction"]) == (16, 40)
        assert [s["index_unindexed"] for s in described["shards"]] == [0, 0]
    finally:
        MemoryClient(deployment.address).drop_namespace("cli-graph")
    code, _, err = monim(capsys, "namespace", "create", "cli-flat", "--dim", "8", "--hnsw-m", "16", *at)
    assert code == 2 and "hnsw_m applies to index hnsw, not 'flat'" in err and err.count("\n") == 1
    assert "cli-flat" not in {c.name for c in MemoryClient(deployment.address).list_namespaces()}
