"""gRPC status codes become typed exceptions here, and nowhere else in the client.

The classes are the store's own (protos/errors.py, shared with the server), so the in-process
store and the remote service raise the same types for the same mistakes.
"""

from __future__ import annotations

import grpc
from monim.protos.errors import (  # noqa: F401 - re-exported for users
    ERRORS_BY_CODE,
    AlreadyExists,
    DeadlineExceeded,
    InternalError,
    InvalidArgument,
    MemoryStoreError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)


def error_from_rpc(error: grpc.RpcError) -> MemoryStoreError:
    """grpc.RpcError -> the MemoryStoreError subclass of its status, carrying the server's message."""
    code = error.code() if hasattr(error, "code") else None
    name = code.name if code is not None else "UNKNOWN"
    details = error.details() if hasattr(error, "details") else str(error)
    cls = ERRORS_BY_CODE.get(name, InternalError)
    result = cls(details or name)
    result.status_code = name
    return result
