"""Exceptions become gRPC status codes here, and nowhere else on the server."""

from __future__ import annotations

import functools
import logging

import grpc
from monim.protos.errors import ERROR_REASON_KEY, MemoryStoreError
from monim.workers.auth import caller_name

log = logging.getLogger(__name__)


# A status message travels in a header: past ~8 KiB gRPC drops it (the caller then sees
# RESOURCE_EXHAUSTED "Stream removed"), so messages are cut to this many characters.
MAX_STATUS_MESSAGE_CHARS = 4000


def status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, MemoryStoreError):
        code, message = getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL), error.message
    else:
        code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"
    if len(message) > MAX_STATUS_MESSAGE_CHARS:
        message = f"{message[:MAX_STATUS_MESSAGE_CHARS]}... ({len(message)} characters in all)"
    return code, message


def grpc_errors(method):
    """Decorates a servicer method (of a servicer with a ``router``): the call runs under the
    client's deadline; a MemoryStoreError aborts the call with its status;
    anything else aborts with INTERNAL and is logged (with the caller's token name, under auth).
    The server keeps serving either way."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            with self.router.deadline(context.time_remaining()):
                return method(self, request, context)
        except Exception as error:  # noqa: BLE001 - every error becomes a status
            code, message = status_of(error)
            if code == grpc.StatusCode.INTERNAL:
                caller = caller_name()
                log.exception("%s failed%s", method.__name__, f" (token {caller!r})" if caller else "")
            if getattr(error, "reason", ""):
                context.set_trailing_metadata(((ERROR_REASON_KEY, error.reason),))
            context.abort(code, message)

    return wrapper
