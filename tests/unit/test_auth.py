"""Auth and TLS without a server: the auth file, who may call what, the TLS files, the client's options."""

from __future__ import annotations

import pytest
from monim.model_client.client import MemoryClient
from monim.model_client.errors import transport_hint
from monim.protos import memory_pb2 as pb
from monim.protos.errors import InvalidArgument
from monim.workers.auth import (
    ADMIN,
    METHOD_ACCESS,
    SERVICE_NAME,
    STREAMING_METHODS,
    AuthPolicy,
    bearer_secret,
    loose_permissions,
    refusal,
)
from monim.workers.tls import ServerTls

from tests.tls_certs import make_pki

SECRETS = {"ops": "ops-secret-7f3a", "trainer": "trainer-secret-91bc", "reader": "reader-secret-c0de"}
GOOD = f"""
[[token]]
name = "ops"
secret = "{SECRETS['ops']}"
admin = true

[[token]]
name = "trainer"
secret = "{SECRETS['trainer']}"
read = ["wiki-*", "news"]
write = ["wiki-*"]

[[token]]
name = "reader"
secret = "{SECRETS['reader']}"
read = ["a*"]
admin = false
"""
ADMIN_METHODS = {"CreateNamespace", "DropNamespace", "CreateSnapshot", "ListSnapshots", "RestoreSnapshot", "Reshard"}


@pytest.fixture
def policy(tmp_path):
    path = tmp_path / "auth.toml"
    path.write_text(GOOD)
    return AuthPolicy.load(str(path))


def tokens_by_name(policy):
    return {token.name: token for token in policy.tokens}


# ----- the auth file -------------------------------------------------------------------------
def test_a_good_file_gives_each_token_its_patterns_and_keeps_no_secret(policy):
    tokens = tokens_by_name(policy)
    assert set(tokens) == {"ops", "trainer", "reader"}
    assert tokens["ops"].admin and not tokens["ops"].read and not tokens["ops"].write
    assert tokens["trainer"].read == ("wiki-*", "news") and tokens["trainer"].write == ("wiki-*",)
    assert not tokens["reader"].admin
    text = repr(policy) + str(policy.tokens)
    for secret in SECRETS.values():
        assert secret not in text


BAD_FILES = {
    "not TOML": ('[[token]]\nname = "x\n', "not valid TOML"),
    "no tokens": ("# nothing\n", "no [[token]] tables"),
    "a table, not an array": ('[token]\nname = "x"\nsecret = "hidden-1"\n', "array of tables"),
    "missing secret": ('[[token]]\nname = "x"\nread = ["*"]\n', "token 'x': missing 'secret'"),
    "missing name": ('[[token]]\nsecret = "hidden-1"\n', "[[token]] number 1: missing 'name'"),
    "secret of the wrong type": ('[[token]]\nname = "x"\nsecret = 12345\n', "secret must be a str, got int"),
    "read not a list": ('[[token]]\nname = "x"\nsecret = "hidden-1"\nread = "a*"\n', "read must be a list"),
    "admin not a boolean": ('[[token]]\nname = "x"\nsecret = "hidden-1"\nadmin = "yes"\n', "admin must be a boolean"),
    "a pattern not a string": ('[[token]]\nname = "x"\nsecret = "hidden-1"\nwrite = [1]\n', "list of non-empty"),
    "empty secret": ('[[token]]\nname = "x"\nsecret = ""\n', "secret is empty"),
    "empty name": ('[[token]]\nname = " "\nsecret = "hidden-1"\n', "name is empty"),
    "secret with a space": ('[[token]]\nname = "x"\nsecret = "hidden 1"\n', "printable ASCII without spaces"),
    "unknown key": ('[[token]]\nname = "x"\nsecret = "hidden-1"\nwirte = ["*"]\n', "unknown key(s) wirte"),
    "unknown top-level key": ('port = 1\n[[token]]\nname = "x"\nsecret = "hidden-1"\n', "unknown top-level key"),
    "duplicate name": ('[[token]]\nname = "x"\nsecret = "hidden-1"\n[[token]]\nname = "x"\nsecret = "hidden-2"\n',
                       "two tokens are named 'x'"),
    "duplicate secret": ('[[token]]\nname = "x"\nsecret = "hidden-1"\n[[token]]\nname = "y"\nsecret = "hidden-1"\n',
                         "tokens 'x' and 'y' have the same secret"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_file_is_refused_naming_the_file_and_the_problem_never_the_secret(tmp_path, case):
    text, problem = BAD_FILES[case]
    path = tmp_path / "auth.toml"
    path.write_text(text)
    with pytest.raises(InvalidArgument) as raised:
        AuthPolicy.load(str(path))
    message = raised.value.message
    assert str(path) in message and problem in message, message
    assert "\n" not in message
    assert "hidden-1" not in message and "hidden 1" not in message and "12345" not in message


def test_a_missing_or_unreadable_file_is_refused(tmp_path):
    with pytest.raises(InvalidArgument, match="no such file"):
        AuthPolicy.load(str(tmp_path / "absent.toml"))
    with pytest.raises(InvalidArgument, match="is a directory"):
        AuthPolicy.load(str(tmp_path))


def test_a_file_others_may_read_gets_a_warning(tmp_path):
    path = tmp_path / "auth.toml"
    path.write_text(GOOD)
    path.chmod(0o644)
    assert "chmod 600" in loose_permissions(str(path))
    path.chmod(0o600)
    assert loose_permissions(str(path)) is None


def test_a_secret_finds_its_token_and_nothing_else_does(policy):
    for name, secret in SECRETS.items():
        assert policy.find(secret).name == name
    for wrong in ("", "ops-secret", SECRETS["ops"] + "x", SECRETS["ops"].upper(), "trainer"):
        assert policy.find(wrong) is None


# ----- who may call what -----------------------------------------------------------------------
def test_every_memory_service_method_has_an_access_rule_and_streams_are_known():
    """A client-streaming method is guarded only if the interceptor knows it (STREAMING_METHODS: the
    stream is authenticated, its steps checked one by one); any other is refused. One that streams
    only its reply (Reshard, SearchParts, RetrieveParts) is checked as a unary call, on its one request."""
    service = pb.DESCRIPTOR.services_by_name["MemoryService"]
    assert SERVICE_NAME == "monim.v1.MemoryService"
    assert {m.name for m in service.methods} == set(METHOD_ACCESS)
    assert {m.name for m in service.methods if m.client_streaming} == STREAMING_METHODS
    assert {m.name for m in service.methods if m.server_streaming and not m.client_streaming} == {
        "Reshard", "SearchParts", "RetrieveParts"}
    assert {name for name, access in METHOD_ACCESS.items() if access.scope == ADMIN} == ADMIN_METHODS


def request_of(method: str, namespace: str):
    """A request of ``method`` that concerns ``namespace``."""
    cls = getattr(pb, pb.DESCRIPTOR.services_by_name["MemoryService"].methods_by_name[method].input_type.name)
    if method == "CreateNamespace":
        return cls(config=pb.NamespaceConfig(name=namespace, dim=4))
    return cls(namespace=namespace) if "namespace" in cls.DESCRIPTOR.fields_by_name else cls()


def test_read_token_may_read_but_not_write(policy):
    reader = tokens_by_name(policy)["reader"]
    for method in ("Search", "Get", "Retrieve", "DescribeNamespace", "ListNamespaces"):
        assert refusal(reader, method, METHOD_ACCESS[method].namespace_of(request_of(method, "a1"))) is None
    for method in ("Add", "Delete", "ApplyGradients", "RetrieveBackward", "CommitStep", "AbortStep"):
        message = refusal(reader, method, "a1")
        assert message == (f"token 'reader' may not call {method} on namespace 'a1': it has no write access to it "
                           "(its write patterns: none)")


def test_a_pattern_grants_only_the_namespaces_it_matches(policy):
    reader, trainer = tokens_by_name(policy)["reader"], tokens_by_name(policy)["trainer"]
    assert refusal(reader, "Search", "a") is None and refusal(reader, "Search", "abc") is None
    assert "namespace 'b1'" in refusal(reader, "Search", "b1")
    assert refusal(reader, "Search", "A1") is not None  # case-sensitive on every platform
    assert refusal(trainer, "Add", "wiki-en") is None
    assert refusal(trainer, "Search", "news") is None and refusal(trainer, "Add", "news") is not None
    # Describe needs read or write; a write-only grant is enough (the client splits batches with it).
    assert refusal(trainer, "DescribeNamespace", "wiki-en") is None
    assert "neither read nor write" in refusal(trainer, "DescribeNamespace", "b1")


@pytest.mark.parametrize("method", sorted(ADMIN_METHODS))
def test_admin_methods_need_admin_whatever_the_namespace(policy, method):
    tokens = tokens_by_name(policy)
    namespace = METHOD_ACCESS[method].namespace_of(request_of(method, "wiki-en"))
    assert refusal(tokens["ops"], method, namespace) is None
    message = refusal(tokens["trainer"], method, namespace)
    assert message.startswith(f"token 'trainer' may not call {method}") and message.endswith("it needs admin")


def test_a_method_the_table_does_not_know_needs_admin(policy):
    tokens = tokens_by_name(policy)
    assert refusal(tokens["ops"], "Reshard", None) is None
    assert refusal(tokens["trainer"], "Reshard", None) == "token 'trainer' may not call Reshard: it needs admin"


def test_list_namespaces_shows_what_a_token_may_read_or_write(policy):
    tokens = tokens_by_name(policy)
    names = ["a1", "b1", "news", "wiki-en"]
    assert [n for n in names if tokens["reader"].sees(n)] == ["a1"]
    assert [n for n in names if tokens["trainer"].sees(n)] == ["news", "wiki-en"]
    assert [n for n in names if tokens["ops"].sees(n)] == names


@pytest.mark.parametrize("metadata, secret, problem", [
    ((), None, "no token"),
    ((("x-other", "1"),), None, "no token"),
    ((("authorization", "Bearer abc"),), "abc", None),
    ((("authorization", "bearer  abc "),), "abc", None),
    ((("authorization", "Basic abc"),), None, "must be 'Bearer <token>'"),
    ((("authorization", "Bearer "),), None, "must be 'Bearer <token>'"),
    ((("authorization", "abc"),), None, "must be 'Bearer <token>'"),
    ((("authorization", "Bearer abc"), ("authorization", "Bearer def")), None, "must be 'Bearer <token>'"),
])
def test_the_bearer_header(metadata, secret, problem):
    found, why = bearer_secret(metadata)
    assert found == secret
    assert (why is None) if problem is None else (problem in why and "abc" not in why)


# ----- TLS files --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_good_tls_files_load(pki):
    assert ServerTls.load(None, None) is None
    tls = ServerTls.load(pki.server_cert, pki.server_key)
    assert not tls.mutual and b"PRIVATE KEY" not in repr(tls).encode()
    assert ServerTls.load(pki.server_cert, pki.server_key, pki.ca).mutual


def test_bad_tls_files_are_refused_naming_the_file(pki, tmp_path):
    missing = str(tmp_path / "absent.pem")
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("hello\n")
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_text("-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n")
    cases = [
        ((missing, pki.server_key, None), f"TLS certificate {missing}: no such file"),
        ((pki.server_cert, missing, None), f"TLS key {missing}: no such file"),
        ((str(not_pem), pki.server_key, None), f"TLS certificate {not_pem}: no PEM 'CERTIFICATE' block"),
        ((pki.server_cert, pki.server_cert, None), f"TLS key {pki.server_cert}: no PEM 'PRIVATE KEY' block"),
        ((pki.server_cert, pki.other_key, None), f"TLS key {pki.other_key} does not match the certificate"),
        ((pki.server_cert, str(encrypted), None), "protected by a passphrase"),
        ((pki.server_cert, pki.server_key, missing), f"TLS client CA {missing}: no such file"),
        ((pki.server_cert, None, None), "--tls-cert"),
        ((None, pki.server_key, None), "needs --tls-cert"),
        ((None, None, pki.ca), "mutual TLS needs a server certificate"),
    ]
    for args, problem in cases:
        with pytest.raises(InvalidArgument) as raised:
            ServerTls.load(*args)
        assert problem in raised.value.message, (args, raised.value.message)


# ----- the client's options ---------------------------------------------------------------------
def test_client_reads_its_token_from_the_environment_unless_given(monkeypatch):
    monkeypatch.setenv("MONIM_TOKEN", "from-env")
    with MemoryClient("127.0.0.1:1") as client:
        assert client._store.metadata == (("authorization", "Bearer from-env"),)
    with MemoryClient("127.0.0.1:1", token="given") as client:
        assert client._store.metadata == (("authorization", "Bearer given"),)
    monkeypatch.delenv("MONIM_TOKEN")
    with MemoryClient("127.0.0.1:1") as client:
        assert client._store.metadata is None and not client._store.tls


def test_client_tls_options_are_checked(pki, tmp_path):
    with MemoryClient("127.0.0.1:1", tls_ca=pki.ca) as client:
        assert client._store.tls
    with pytest.raises(InvalidArgument, match="tls_ca .*absent.pem: no such file"):
        MemoryClient("127.0.0.1:1", tls_ca=str(tmp_path / "absent.pem"))
    with pytest.raises(InvalidArgument, match="tls_cert and tls_key go together"):
        MemoryClient("127.0.0.1:1", tls_ca=pki.ca, tls_cert=pki.client_cert)
    with pytest.raises(InvalidArgument, match="not to the in-process store"):
        MemoryClient(":memory:", tls_ca=pki.ca)


def test_transport_hints_name_the_likely_tls_mismatch():
    closed = "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:5: Socket closed"
    assert "may require TLS" in transport_hint(closed, tls=False)
    assert "client certificate" in transport_hint(closed, tls=True)
    assert "not signed by the CA" in transport_hint("... CERTIFICATE_VERIFY_FAILED: unable to get ...", tls=True)
    assert "may not use TLS" in transport_hint("... WRONG_VERSION_NUMBER ...", tls=True)
    assert transport_hint("... Failed to connect to remote host: Connection refused", tls=False) == ""
    # A server that dies in the middle of a call (python -m reliability.run kills front ends) is not a TLS mismatch.
    assert transport_hint("Stream removed (Socket closed)", tls=False) == ""
    assert transport_hint("Stream removed (recvmsg:Connection reset by peer (104))", tls=True) == ""
