"""Auth and TLS through gRPC on loopback, against in-process shards (LocalRuntime, no Ray),
and `monim serve` refusing bad auth and TLS files at start."""

from __future__ import annotations

import logging
import os
import pathlib
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from monim.model_client import MemoryClient
from monim.protos.errors import PermissionDenied, Unauthenticated, Unavailable
from monim.workers.auth import AuthPolicy
from monim.workers.router import Router
from monim.workers.runtime import LocalRuntime
from monim.workers.server import start_server
from monim.workers.snapshots import Snapshots
from monim.workers.tls import ServerTls

from tests.tls_certs import make_pki

ROOT = pathlib.Path(__file__).resolve().parents[2]
DIM = 8
SECRETS = {"ops": "ops-9d1f0c2b7e", "trainer": "trainer-5a6e8b3c1d", "reader": "reader-0e4f7a9b2c"}
AUTH_FILE = f"""
[[token]]
name = "ops"
secret = "{SECRETS['ops']}"
read = ["*"]
write = ["*"]
admin = true

[[token]]
name = "trainer"
secret = "{SECRETS['trainer']}"
read = ["a*", "b*"]
write = ["a*", "b*"]

[[token]]
name = "reader"
secret = "{SECRETS['reader']}"
read = ["a*"]
"""


@pytest.fixture(autouse=True)
def no_token_in_the_environment(monkeypatch):
    monkeypatch.delenv("MONIM_TOKEN", raising=False)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def auth_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "auth.toml"
    path.write_text(AUTH_FILE)
    path.chmod(0o600)
    return str(path)


def serve(auth=None, tls=None, snapshot_root=None, read_endpoints=False):
    """An in-process deployment of 2 shards on a free loopback port: (address, stop)."""
    runtime = LocalRuntime(2)
    router = Router(runtime)
    if snapshot_root is not None:
        router.snapshots = Snapshots(router, str(snapshot_root))
    server, port = start_server(router, port=0, auth=auth, tls=tls, read_endpoints=read_endpoints)

    def stop():
        server.stop(0).wait()
        runtime.shutdown()

    return f"127.0.0.1:{port}", stop


@pytest.fixture(scope="module")
def secured(auth_file, tmp_path_factory):
    """A plaintext server with auth: its address, namespaces a1 and b1 (40 rows each) made by ops."""
    address, stop = serve(auth=AuthPolicy.load(auth_file), snapshot_root=tmp_path_factory.mktemp("snapshots"))
    keys = np.random.default_rng(0).standard_normal((40, DIM), dtype=np.float32)
    with MemoryClient(address, token=SECRETS["ops"], timeout_s=30) as ops:
        for name in ("a1", "b1"):
            ops.create_namespace(name, dim=DIM)
            ops.add(name, keys, np.arange(40))
    yield {"address": address, "keys": keys}
    stop()


def client(secured, who=None, **options):
    return MemoryClient(secured["address"], token=SECRETS.get(who, who), timeout_s=30, retries=0, **options)


def queries():
    return np.random.default_rng(1).standard_normal((3, DIM), dtype=np.float32)


# ----- auth -----------------------------------------------------------------------------------
def test_no_token_or_an_unknown_one_is_unauthenticated(secured):
    with client(secured) as anonymous, pytest.raises(Unauthenticated, match="no token"):
        anonymous.search("a1", queries(), 4)
    with client(secured, "not-a-token") as stranger, pytest.raises(Unauthenticated, match="unknown token"):
        stranger.list_namespaces()


def test_the_token_comes_from_monim_token(secured, monkeypatch):
    monkeypatch.setenv("MONIM_TOKEN", SECRETS["reader"])
    with client(secured) as reader:
        assert reader.search("a1", queries(), 4).ids.shape == (3, 4)


def test_a_read_token_cannot_write_and_the_refused_write_changes_nothing(secured):
    with client(secured, "ops") as ops:
        before_rows = ops.describe_namespace("a1").rows
        before = ops.search("a1", queries(), 5)
    with client(secured, "reader") as reader:
        assert reader.search("a1", queries(), 5).ids.tolist() == before.ids.tolist()
        refused = [
            lambda: reader.add("a1", queries(), np.arange(3)),
            lambda: reader.delete("a1", ids=np.arange(40)),
            lambda: reader.delete("a1", source=""),
        ]
        for call in refused:
            with pytest.raises(PermissionDenied) as raised:
                call()
            message = raised.value.message
            assert "'reader'" in message and "namespace 'a1'" in message and "no write access" in message
            assert ("Add" in message) or ("Delete" in message)
    with client(secured, "ops") as ops:
        assert ops.describe_namespace("a1").rows == before_rows
        after = ops.search("a1", queries(), 5)
        assert after.ids.tolist() == before.ids.tolist()
        np.testing.assert_array_equal(after.distances, before.distances)


def test_a_token_for_a_star_cannot_read_b1(secured):
    with client(secured, "reader") as reader:
        with pytest.raises(PermissionDenied, match=r"token 'reader' may not call Search on namespace 'b1'"):
            reader.search("b1", queries(), 4)
        with pytest.raises(PermissionDenied, match="Get on namespace 'b1'"):
            reader.get("b1", np.arange(3))
        with pytest.raises(PermissionDenied, match="DescribeNamespace on namespace 'b1'"):
            reader.describe_namespace("b1")
        # ListNamespaces lists only what the token may read or write.
        assert [c.name for c in reader.list_namespaces()] == ["a1"]
    with client(secured, "trainer") as trainer:
        assert sorted(c.name for c in trainer.list_namespaces()) == ["a1", "b1"]


def test_a_decode_stream_needs_a_token_and_each_step_the_read_access(secured):
    """The stream is refused without a valid token; under one, each step is checked as the Search or
    Retrieve it is, a refused step is answered PERMISSION_DENIED, and the stream goes on."""
    with client(secured) as anonymous, anonymous.decode() as stream:
        with pytest.raises(Unauthenticated, match="no token"):
            stream.search("a1", queries(), 4)
    with client(secured, "reader") as reader, reader.decode() as stream:
        with pytest.raises(PermissionDenied, match=r"token 'reader' may not call Search on namespace 'b1'"):
            stream.search("b1", queries(), 4)
        with pytest.raises(PermissionDenied, match=r"may not call Retrieve on namespace 'b1'"):
            stream.retrieve("b1", queries(), 4)
        assert stream.search("a1", queries(), 4).ids.tolist() == reader.search("a1", queries(), 4).ids.tolist()


def test_admin_rpcs_need_admin(secured):
    with client(secured, "trainer") as trainer:
        refused = {
            "CreateNamespace": lambda: trainer.create_namespace("a-new", dim=DIM),
            "DropNamespace": lambda: trainer.drop_namespace("a1"),
            "CreateSnapshot": lambda: trainer.create_snapshot("by-trainer"),
            "ListSnapshots": lambda: trainer.list_snapshots(),
            "RestoreSnapshot": lambda: trainer.restore_snapshot("by-ops", "a-copy"),
            "Reshard": lambda: list(trainer.reshard(3)),
        }
        for method, call in refused.items():
            with pytest.raises(PermissionDenied, match=f"token 'trainer' may not call {method}.*: it needs admin"):
                call()
        assert sorted(c.name for c in trainer.list_namespaces()) == ["a1", "b1"]  # a-new was not made
        assert len(trainer.describe_namespace("a1").shards) == 2  # nor a reshard begun
    with client(secured, "ops") as ops:
        ops.create_namespace("a-new", dim=DIM)
        info = ops.create_snapshot("by-ops", "a1")
        assert info["rows"] == {"a1": 40}
        assert [s["location"] for s in ops.list_snapshots()] == [info["location"]]
        assert ops.drop_namespace("a-new") == 0


def test_health_and_reflection_answer_without_a_token(secured):
    with grpc.insecure_channel(secured["address"]) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                            timeout=10)
        services = {s.name for reply in replies for s in reply.list_services_response.service}
        assert "monim.v1.MemoryService" in services


def test_no_secret_reaches_an_error_message_or_the_log(secured, caplog):
    caplog.set_level(logging.DEBUG)
    messages = []
    with client(secured, "reader") as reader, client(secured, "trainer") as trainer:
        for call in (lambda: reader.add("a1", queries(), np.arange(3)), lambda: reader.search("b1", queries(), 2),
                     lambda: trainer.drop_namespace("b1"), lambda: trainer.create_snapshot("x"),
                     lambda: trainer.search("zzz", queries(), 2)):
            with pytest.raises(PermissionDenied) as raised:
                call()
            messages.append(raised.value.message)
    for wrong in (SECRETS["reader"] + "-wrong", "Bearer-less"):
        with client(secured, wrong) as stranger, pytest.raises(Unauthenticated) as raised:
            stranger.search("a1", queries(), 2)
        messages.append(raised.value.message)
    # Each refused call is logged once; a new client's own ReadEndpoints (where its reads may go) and
    # ProbeSharedMemory (whether it shares the server's host) too.
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()
                and not r.getMessage().startswith(("ReadEndpoints", "ProbeSharedMemory"))]
    assert len(refusals) == len(messages)
    assert any("'reader'" in line for line in refusals)
    text = "\n".join(messages) + "\n" + caplog.text
    for secret in SECRETS.values():
        assert secret not in text


# ----- TLS ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_server(pki, auth_file):
    address, stop = serve(auth=AuthPolicy.load(auth_file), tls=ServerTls.load(pki.server_cert, pki.server_key))
    yield {"address": address}
    stop()


@pytest.fixture(scope="module")
def mutual_tls_server(pki):
    address, stop = serve(tls=ServerTls.load(pki.server_cert, pki.server_key, pki.ca))
    yield {"address": address}
    stop()


def test_over_tls_with_the_tests_ca_a_search_works(tls_server, pki):
    keys = np.random.default_rng(2).standard_normal((20, DIM), dtype=np.float32)
    with client(tls_server, "ops", tls_ca=pki.ca) as ops:
        ops.create_namespace("a-tls", dim=DIM)
        ids = ops.add("a-tls", keys, np.arange(20))
    with client(tls_server, "reader", tls_ca=pki.ca) as reader:
        result = reader.search("a-tls", keys[:4], 1)
        assert result.ids[:, 0].tolist() == ids[:4].tolist()
        np.testing.assert_allclose(result.distances[:, 0], 0, atol=1e-4)


def test_a_plaintext_client_to_the_tls_port_is_told_the_server_may_require_tls(tls_server):
    with client(tls_server, "ops") as plaintext, pytest.raises(Unavailable, match="may require TLS"):
        plaintext.list_namespaces()


def test_a_client_that_does_not_trust_the_servers_ca_fails_clearly(tls_server, pki):
    with client(tls_server, "ops", tls_ca=pki.other_ca) as wrong, pytest.raises(Unavailable, match="not signed by"):
        wrong.list_namespaces()


def test_mutual_tls_needs_a_client_certificate(mutual_tls_server, pki):
    with client(mutual_tls_server, tls_ca=pki.ca) as no_cert, pytest.raises(Unavailable, match="client certificate"):
        no_cert.list_namespaces()
    with client(mutual_tls_server, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key) as with_cert:
        assert with_cert.list_namespaces() == []


def test_the_shards_read_endpoints_speak_the_front_ends_mutual_tls(pki):
    address, stop = serve(tls=ServerTls.load(pki.server_cert, pki.server_key, pki.ca), read_endpoints=True)
    secured = {"address": address}
    try:
        keys = np.random.default_rng(3).standard_normal((20, DIM), dtype=np.float32)
        with client(secured, tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key) as with_cert:
            with_cert.create_namespace("a-tls", dim=DIM)
            ids = with_cert.add("a-tls", keys, np.arange(20))
            found = with_cert.search("a-tls", keys[:4], 1)
            assert found.ids[:, 0].tolist() == ids[:4].tolist()
            endpoint = with_cert._store.read_routing.target()
            assert endpoint not in (None, address)  # the search went to a shard's endpoint, over mutual TLS
            with with_cert.decode() as stream:
                assert stream.search("a-tls", keys[:4], 1).ids[:, 0].tolist() == ids[:4].tolist()
                assert stream.target == endpoint
        with client({"address": endpoint}, tls_ca=pki.ca) as no_cert, \
                pytest.raises(Unavailable, match="client certificate"):
            no_cert.search("a-tls", keys[:4], 1)
        with client({"address": endpoint}) as plaintext, pytest.raises(Unavailable, match="may require TLS"):
            plaintext.search("a-tls", keys[:4], 1)
    finally:
        stop()


# ----- the CLI --------------------------------------------------------------------------------
def monim(*args, env_token=None, timeout_s=60):
    env = {k: v for k, v in os.environ.items() if k != "MONIM_TOKEN"}
    if env_token is not None:
        env["MONIM_TOKEN"] = env_token
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "monim.workers.cli", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout_s, env=env)
    return result, time.monotonic() - started


def test_cli_status_with_token_and_tls(tls_server, pki):
    address = tls_server["address"]
    result, _ = monim("status", "--address", address, "--tls-ca", pki.ca, env_token=SECRETS["reader"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{address}: ")
    result, _ = monim("status", "--address", address, "--tls-ca", pki.ca)
    assert result.returncode == 2 and "no token" in result.stderr
    result, _ = monim("snapshot", "list", "--address", address, "--tls-ca", pki.ca, "--token", SECRETS["reader"])
    assert result.returncode == 2 and "may not call ListSnapshots" in result.stderr
    assert SECRETS["reader"] not in result.stderr


def bad_serve_inputs(folder: pathlib.Path, pki):
    """(extra serve flags, the file stderr must name, what it must say) for each input `monim serve` refuses."""
    def auth(name, text):
        path = folder / name
        path.write_text(text)
        path.chmod(0o600)
        return str(path)

    token = '[[token]]\nname = "{}"\nsecret = "{}"\nread = ["*"]\n'
    cases = [
        (auth("broken.toml", "[[token]\n"), "not valid TOML"),
        (auth("dup.toml", token.format("a", "same-1") + token.format("b", "same-1")),
         "tokens 'a' and 'b' have the same secret"),
        (auth("dup-name.toml", token.format("a", "one-1") + token.format("a", "two-2")), "two tokens are named 'a'"),
        (auth("empty.toml", token.format("a", "")), "token 'a': secret is empty"),
        (auth("missing.toml", '[[token]]\nname = "a"\n'), "token 'a': missing 'secret'"),
        (auth("type.toml", '[[token]]\nname = "a"\nsecret = "s-1"\nadmin = 1\n'), "admin must be a boolean"),
        (str(folder / "absent.toml"), "no such file"),
    ]
    absent_cert, absent_key = str(folder / "absent.pem"), str(folder / "absent.key")
    return [(["--auth-file", path], path, problem) for path, problem in cases] + [
        (["--tls-cert", absent_cert, "--tls-key", pki.server_key], absent_cert, "no such file"),
        (["--tls-cert", pki.server_cert, "--tls-key", absent_key], absent_key, "no such file"),
        (["--tls-cert", pki.server_cert, "--tls-key", pki.other_key], pki.other_key, "does not match"),
        (["--tls-cert", pki.server_cert], pki.server_cert, "needs --tls-key"),
        (["--tls-cert", pki.server_cert, "--tls-key", pki.server_key, "--tls-client-ca", absent_cert], absent_cert,
         "no such file"),
    ]


def test_serve_refuses_bad_auth_and_tls_files_at_once_with_one_line(tmp_path, pki):
    for flags, path, problem in bad_serve_inputs(tmp_path, pki):
        result, took_s = monim("serve", "--ephemeral", "--port", "1", *flags)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (flags, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("monim serve: "), (flags, lines)
        assert path in lines[0] and problem in lines[0], (flags, lines[0])
        assert "serving" not in result.stdout and "ephemeral" not in result.stdout, flags
        assert "same-1" not in result.stderr and "one-1" not in result.stderr
        assert took_s < 15, f"{flags}: {took_s:.1f} s; the check must come before torch and Ray"
