"""gRPC status codes become typed exceptions here, and nowhere else in the client.

The classes are the store's own (protos/errors.py, shared with the server), so the in-process
store and the remote service raise the same types for the same mistakes.
"""

from __future__ import annotations

import grpc
from monim.protos.errors import (  # noqa: F401 - re-exported for users
    ERROR_REASON_KEY,
    ERRORS_BY_CODE,
    ERRORS_BY_REASON,
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

# gRPC's details of a call cancelled because the client closed its channel meanwhile.
CHANNEL_CLOSED = "Channel closed!"


def transport_hint(details: str, tls: bool) -> str:
    """What a failed connection's details most likely mean for TLS, as advice ("" if nothing)."""
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return "the server's certificate is not signed by the CA in tls_ca (monim: --tls-ca)"
    if "Hostname Verification" in details:
        return "the server's certificate does not name the host dialled"
    if tls and "WRONG_VERSION_NUMBER" in details:
        return "the server may not use TLS (a plaintext port): connect without tls_ca / tls=True"
    if "Stream removed" in details:
        # The connection had carried calls: the server went away (killed, restarted), no TLS mismatch.
        return ""
    if "Socket closed" in details or "Connection reset" in details:
        # A TLS server closes a plaintext connection at once; a mutual-TLS one a client without a certificate.
        if tls:
            return "the server may require a client certificate: pass tls_cert and tls_key (monim: --tls-cert, --tls-key)"
        return "the server may require TLS: pass tls_ca=CA_FILE (monim: --tls-ca)"
    return ""


def error_from_rpc(error: grpc.RpcError, tls: bool = False) -> MemoryStoreError:
    """grpc.RpcError -> the MemoryStoreError subclass of its status, carrying the server's message.
    tls: whether the channel uses TLS; an UNAVAILABLE that looks like a TLS mismatch says so."""
    code = error.code() if hasattr(error, "code") else None
    name = code.name if code is not None else "UNKNOWN"
    details = error.details() if hasattr(error, "details") else str(error)
    if name == "CANCELLED" and details != CHANNEL_CLOSED:
        # The client cancels no call whose answer it still reads (but for a close of its own channel,
        # from another thread: left as it is, not retried): a CANCELLED is the server's, which stopped
        # during the call (a call it had not handed to a handler yet; grpc/grpc#41785). That is
        # UNAVAILABLE to the caller: retried, or sent to the front end (a write with its request id
        # lands once).
        name, details = "UNAVAILABLE", f"the server cancelled the call as it stopped ({details or 'CANCELLED'})"
    cls = ERRORS_BY_CODE.get(name, InternalError)
    reason = _reason(error)
    if reason in ERRORS_BY_REASON and ERRORS_BY_REASON[reason].code == name:
        cls = ERRORS_BY_REASON[reason]
    hint = transport_hint(details or "", tls) if name == "UNAVAILABLE" else ""
    result = cls.from_status(f"{details or name} ({hint})" if hint else details or name)
    result.status_code = name
    return result


def _reason(error: grpc.RpcError) -> str:
    """The server's ERROR_REASON_KEY of the call's trailing metadata, or ""."""
    try:
        metadata = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    except Exception:  # noqa: BLE001 - an error made without a call (a test's, a channel's) has none
        return ""
    return next((value for key, value in metadata or () if key == ERROR_REASON_KEY), "")
