"""Token auth for MemoryService: the auth file, the scope each RPC needs, and the gRPC interceptor.

The auth file (``monim serve --auth-file FILE``) is TOML, one ``[[token]]`` table per client:

    [[token]]
    name = "trainer"          # shown in logs (never the secret)
    secret = "..."            # what the client sends: ``authorization: Bearer <secret>``
    read = ["wiki-*"]         # namespace patterns (fnmatch, case-sensitive) it may read
    write = ["wiki-*"]        # ... and write
    admin = false             # CreateNamespace, DropNamespace and the snapshot RPCs

What each RPC needs (``METHOD_ACCESS``):
- read: Search, Get, Retrieve on a namespace matching one of ``read``;
- write: Add, Delete, ApplyGradients, RetrieveBackward, CommitStep, AbortStep on one matching
  ``write`` (write does not imply read: a training job lists its namespaces under both);
- admin: CreateNamespace, DropNamespace, CreateSnapshot, ListSnapshots, RestoreSnapshot, Reshard, whatever
  the namespace, and any MemoryService method this table does not know yet (it fails closed);
- DescribeNamespace: read, write or admin (a writer needs the namespace's config to split a batch);
- ListNamespaces: any token; the reply lists only the namespaces the token may read or write
  (all of them for an admin token, which may create and drop any).

The standard health service and server reflection stay open: the interceptor guards
MemoryService only. Secrets are kept as SHA-256 digests and compared with
``hmac.compare_digest`` against every token (no early exit), so the time a lookup takes says
nothing about which secret, or how much of one, matched. Errors and logs name a token by its
``name`` only.
"""

from __future__ import annotations

import contextvars
import dataclasses
import fnmatch
import hashlib
import hmac
import logging
import os
import stat
from typing import Callable

import grpc
from monim.protos import memory_pb2 as pb
from monim.protos.errors import InvalidArgument, PermissionDenied
from monim.workers.server_files import read_toml

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MemoryService"].full_name
READ, WRITE, ADMIN, DESCRIBE, LIST = "read", "write", "admin", "describe", "list"
_TOKEN_KEYS = {"name": str, "secret": str, "read": list, "write": list, "admin": bool}
_REQUIRED_KEYS = ("name", "secret")
# The name of the token that authenticated the call being served (for logs), or None.
_caller: contextvars.ContextVar[str | None] = contextvars.ContextVar("monim_caller", default=None)


# The token of the Decode stream this thread is serving (its steps are checked one by one), or None.
_stream_token: contextvars.ContextVar["Token | None"] = contextvars.ContextVar("monim_stream_token", default=None)


def caller_name() -> str | None:
    """The ``name`` of the token of the call this thread is serving; None without auth."""
    return _caller.get()


def authorize_step(method: str, namespace: str) -> None:
    """A step of a Decode stream does what ``method`` does on ``namespace``: PermissionDenied if the
    stream's token may not (nothing to check without auth)."""
    token = _stream_token.get()
    if token is None:
        return
    problem = refusal(token, method, namespace or None)
    if problem is not None:
        raise PermissionDenied(problem)


# ----- the auth file --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Token:
    """One client's grant. The secret itself is not kept: ``secret_digest`` is its SHA-256."""

    name: str
    secret_digest: bytes = dataclasses.field(repr=False)
    read: tuple[str, ...] = ()
    write: tuple[str, ...] = ()
    admin: bool = False

    def may(self, scope: str, namespace: str | None) -> bool:
        """Whether this token may use ``scope`` (READ, WRITE, ADMIN, DESCRIBE, LIST) on namespace."""
        if scope == ADMIN:
            return self.admin
        if scope == LIST:
            return True
        if scope == DESCRIBE:
            return self.admin or self.may(READ, namespace) or self.may(WRITE, namespace)
        patterns = self.read if scope == READ else self.write
        return namespace is not None and any(fnmatch.fnmatchcase(namespace, p) for p in patterns)

    def sees(self, namespace: str) -> bool:
        """Whether ListNamespaces shows this namespace to the token."""
        return self.may(DESCRIBE, namespace)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def _parse_token(path: str, index: int, table) -> Token:
    """One ``[[token]]`` table -> Token. Errors name the table (its name, else its place), never the secret."""
    where = f"{path}: [[token]] number {index + 1}"
    if not isinstance(table, dict):
        raise InvalidArgument(f"{where} is not a table")
    if isinstance(table.get("name"), str) and table["name"]:
        where = f"{path}: token {table['name']!r}"
    unknown = sorted(set(table) - set(_TOKEN_KEYS))
    if unknown:
        raise InvalidArgument(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(_TOKEN_KEYS)})")
    for key in _REQUIRED_KEYS:
        if key not in table:
            raise InvalidArgument(f"{where}: missing {key!r}")
    for key, kind in _TOKEN_KEYS.items():
        if key in table and not isinstance(table[key], kind):
            raise InvalidArgument(f"{where}: {key} must be a {'boolean' if kind is bool else kind.__name__}, "
                                  f"got {type(table[key]).__name__}")
    if not table["name"].strip():
        raise InvalidArgument(f"{where}: name is empty")
    secret = table["secret"]
    if not secret:
        raise InvalidArgument(f"{where}: secret is empty")
    # gRPC metadata values are printable ASCII; a space would be cut off "Bearer <secret>".
    if not all(33 <= ord(c) <= 126 for c in secret):
        raise InvalidArgument(f"{where}: secret must be printable ASCII without spaces")
    patterns = {}
    for key in (READ, WRITE):
        values = table.get(key, [])
        if not all(isinstance(p, str) and p for p in values):
            raise InvalidArgument(f"{where}: {key} must be a list of non-empty namespace patterns (strings)")
        patterns[key] = tuple(values)
    return Token(name=table["name"], secret_digest=_digest(secret), read=patterns[READ], write=patterns[WRITE],
                 admin=table.get("admin", False))


@dataclasses.dataclass(frozen=True)
class AuthPolicy:
    """The tokens of an auth file; ``path`` is where they came from (for messages)."""

    tokens: tuple[Token, ...]
    path: str = ""

    def __post_init__(self):
        if not self.tokens:
            raise InvalidArgument(f"{self.path or 'auth policy'}: no tokens")

    @classmethod
    def load(cls, path: str) -> "AuthPolicy":
        """Reads and checks an auth file; InvalidArgument names the file and the first problem:
        unreadable, not TOML, no ``[[token]]``, a missing or unknown key, a wrong type, an empty
        name or secret, two tokens with one name or one secret."""
        data = read_toml(path, "auth file")
        unknown = sorted(set(data) - {"token"})
        if unknown:
            raise InvalidArgument(f"{path}: unknown top-level key(s) {', '.join(unknown)} (only [[token]] tables)")
        tables = data.get("token")
        if not tables:
            raise InvalidArgument(f"{path}: no [[token]] tables")
        if not isinstance(tables, list):
            raise InvalidArgument(f"{path}: 'token' must be an array of tables ([[token]], not [token])")
        tokens, by_name, by_digest = [], {}, {}
        for index, table in enumerate(tables):
            token = _parse_token(path, index, table)
            if token.name in by_name:
                raise InvalidArgument(f"{path}: two tokens are named {token.name!r}")
            if token.secret_digest in by_digest:
                raise InvalidArgument(f"{path}: tokens {by_digest[token.secret_digest]!r} and {token.name!r} "
                                      "have the same secret")
            by_name[token.name] = token
            by_digest[token.secret_digest] = token.name
            tokens.append(token)
        return cls(tuple(tokens), path)

    def find(self, secret: str) -> Token | None:
        """The token whose secret this is, or None. Every token is compared (no early exit),
        each in constant time over equal-length digests."""
        presented = _digest(secret)
        found = None
        for token in self.tokens:
            if hmac.compare_digest(token.secret_digest, presented):
                found = token
        return found


def loose_permissions(path: str) -> str | None:
    """A warning when other users may read the auth file (its secrets); None when they may not."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        return f"auth file {path} is readable by other users (mode {stat.S_IMODE(mode):o}); chmod 600 it"
    return None


# ----- what each RPC needs ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Access:
    """scope: READ, WRITE, ADMIN, DESCRIBE or LIST; namespace_of: request -> the namespace it
    concerns (None: none, or every one)."""

    scope: str
    namespace_of: Callable[[object], str | None]


def _namespace(request) -> str:
    return request.namespace


def _no_namespace(request) -> None:
    return None


def _created(request) -> str:
    return request.config.name


def _snapshot_namespace(request) -> str | None:
    return request.namespace or None  # "": every namespace


METHOD_ACCESS: dict[str, Access] = {
    "CreateNamespace": Access(ADMIN, _created),
    "ListNamespaces": Access(LIST, _no_namespace),
    "DescribeNamespace": Access(DESCRIBE, _namespace),
    "DropNamespace": Access(ADMIN, _namespace),
    "Add": Access(WRITE, _namespace),
    "Search": Access(READ, _namespace),
    "Get": Access(READ, _namespace),
    "Delete": Access(WRITE, _namespace),
    "Retrieve": Access(READ, _namespace),
    "SearchParts": Access(READ, _namespace),
    "RetrieveParts": Access(READ, _namespace),
    "RetrieveBackward": Access(WRITE, _namespace),
    "ApplyGradients": Access(WRITE, _namespace),
    "CommitStep": Access(WRITE, _namespace),
    "AbortStep": Access(WRITE, _namespace),
    "CreateSnapshot": Access(ADMIN, _snapshot_namespace),
    "ListSnapshots": Access(ADMIN, _no_namespace),
    "RestoreSnapshot": Access(ADMIN, _snapshot_namespace),
    # A stream needs a valid token; each of its steps is then checked as a Search or a Retrieve
    # (authorize_step), and a refused step is answered PERMISSION_DENIED while the stream goes on.
    "Decode": Access(READ, _namespace),  # its metrics label: the namespace of each step
    "Reshard": Access(ADMIN, _no_namespace),
    # Where a Decode stream may go instead (the shards' own endpoints): any token; each step there
    # is checked as it is here.
    "ReadEndpoints": Access(LIST, _no_namespace),
    # Whether the server can use a client's shared memory region (touches no namespace): any token.
    "ProbeSharedMemory": Access(LIST, _no_namespace),
}
STREAMING_METHODS = {"Decode"}
# A MemoryService method added to the proto but not to the table needs admin until it is.
_UNLISTED = Access(ADMIN, _no_namespace)

_NO_TOKEN = ("no token: send 'authorization: Bearer <token>' metadata "
             "(MemoryClient(address, token=...) or the MONIM_TOKEN environment variable)")
_BAD_HEADER = "the authorization metadata must be 'Bearer <token>'"
_UNKNOWN_TOKEN = "unknown token"


def bearer_secret(metadata) -> tuple[str | None, str | None]:
    """invocation metadata -> (secret, None), or (None, why not) for UNAUTHENTICATED."""
    values = [value for key, value in (metadata or ()) if key == "authorization"]
    if not values:
        return None, _NO_TOKEN
    if len(values) > 1 or not isinstance(values[0], str):
        return None, _BAD_HEADER
    scheme, _, secret = values[0].strip().partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        return None, _BAD_HEADER
    return secret, None


def refusal(token: Token, method: str, namespace: str | None) -> str | None:
    """None when ``token`` may call ``method`` on ``namespace``; else the PERMISSION_DENIED message
    (the token's name, the method, the namespace, what it lacks)."""
    access = METHOD_ACCESS.get(method, _UNLISTED)
    if token.may(access.scope, namespace):
        return None
    on = f" on namespace {namespace!r}" if namespace is not None else ""
    if access.scope == ADMIN:
        return f"token {token.name!r} may not call {method}{on}: it needs admin"
    if access.scope == DESCRIBE:
        return f"token {token.name!r} may not call {method}{on}: it has neither read nor write access to it"
    patterns = token.read if access.scope == READ else token.write
    has = ", ".join(repr(p) for p in patterns) or "none"
    return f"token {token.name!r} may not call {method}{on}: it has no {access.scope} access to it " \
           f"(its {access.scope} patterns: {has})"


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks every MemoryService call against ``policy``; other services pass untouched.

    For each call: (1) the ``authorization`` metadata names a known token, else UNAUTHENTICATED;
    (2) the token has the scope the method needs on the request's namespace, else
    PERMISSION_DENIED; (3) the servicer runs, with ``caller_name()`` set; ListNamespaces'
    reply is cut down to what the token may see. A refused call never reaches the router."""

    def __init__(self, policy: AuthPolicy):
        self.policy = policy
        self._prefix = f"/{SERVICE_NAME}/"

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        full_method = handler_call_details.method
        if handler is None or not full_method.startswith(self._prefix):
            return handler
        method = full_method[len(self._prefix):]
        if method in STREAMING_METHODS and handler.stream_stream is not None:
            return handler._replace(stream_stream=self._guarded_stream(method, handler.stream_stream))
        if handler.unary_stream is not None:  # Reshard, SearchParts, RetrieveParts: checked as a unary call
            return handler._replace(unary_stream=self._guarded(method, handler.unary_stream))
        if handler.unary_unary is None:  # a streaming method not in STREAMING_METHODS is refused
            log.error("%s is not unary-unary; the auth interceptor refuses it", full_method)
            return None
        return handler._replace(unary_unary=self._guarded(method, handler.unary_unary))

    def _authenticated(self, method: str, context) -> Token:
        """The call's token; aborts with UNAUTHENTICATED without a known one."""
        secret, problem = bearer_secret(context.invocation_metadata())
        token = self.policy.find(secret) if secret is not None else None
        if token is None:
            problem = problem or _UNKNOWN_TOKEN
            log.warning("%s from %s refused: %s", method, context.peer(), problem)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
        return token

    def _guarded_stream(self, method: str, behavior):
        def guarded(request_iterator, context):
            token = self._authenticated(method, context)
            _caller.set(token.name)  # the stream has its thread of the server's pool to itself
            _stream_token.set(token)
            try:
                yield from behavior(request_iterator, context)
            finally:
                _caller.set(None)
                _stream_token.set(None)

        return guarded

    def _guarded(self, method: str, behavior):
        access = METHOD_ACCESS.get(method, _UNLISTED)

        def guarded(request, context):
            token = self._authenticated(method, context)
            namespace = access.namespace_of(request)
            message = refusal(token, method, namespace)
            if message is not None:
                log.warning("%s from %s refused: %s", method, context.peer(), message)
                context.abort(grpc.StatusCode.PERMISSION_DENIED, message)
            reset = _caller.set(token.name)
            try:
                response = behavior(request, context)
            finally:
                _caller.reset(reset)
            if method == "ListNamespaces" and not token.admin:
                response = pb.ListNamespacesResponse(namespaces=[c for c in response.namespaces if token.sees(c.name)])
            return response

        return guarded
