"""The one error hierarchy of monim-store.

Every error a caller can cause is a ``MemoryStoreError`` subclass. Each class
names the gRPC status it becomes (``code``, a ``grpc.StatusCode`` member name)
so that the server maps exceptions to statuses in exactly one place
(``workers/status.py``) and the client maps statuses back in exactly one place
(``model_client/errors.py``), without this module importing gRPC.
"""

from __future__ import annotations


class MemoryStoreError(Exception):
    """Base class; ``code`` is the gRPC status code name it travels as."""

    code = "INTERNAL"
    # A finer cause than the code, for the few errors a caller acts on differently: sent as the call's
    # trailing metadata (ERROR_REASON_KEY) and raised as its class by a client (ERRORS_BY_REASON).
    reason = ""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    @classmethod
    def from_status(cls, message: str) -> "MemoryStoreError":
        """The error as a client rebuilds it from a call's status: its class and message only."""
        return _rebuild_error(cls, message, {"message": message})

    def __reduce__(self):
        # Keeps subclasses with extra constructor arguments picklable (Ray
        # ships exceptions raised in actors back to the caller).
        return (_rebuild_error, (type(self), self.message, dict(self.__dict__)))


def _rebuild_error(cls, message, state):
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class InvalidArgument(MemoryStoreError):
    """Bad shape, dtype, width, NaN/Inf, k out of range, empty batch, bad option."""

    code = "INVALID_ARGUMENT"


class NotFound(MemoryStoreError):
    """Unknown namespace or ids."""

    code = "NOT_FOUND"


class NamespaceNotFound(NotFound):
    def __init__(self, namespace: str):
        super().__init__(f"namespace {namespace!r} does not exist")
        self.namespace = namespace


class IdsNotFound(NotFound):
    def __init__(self, namespace: str, missing_ids):
        missing = sorted({int(i) for i in missing_ids})
        shown = ", ".join(str(i) for i in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        super().__init__(f"namespace {namespace!r} has no entries with ids [{shown}]{more}")
        self.namespace = namespace
        self.missing_ids = missing


class AlreadyExists(MemoryStoreError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(MemoryStoreError):
    """The request was made for a state that no longer holds (nothing was changed)."""

    code = "FAILED_PRECONDITION"


class NamespaceChanged(FailedPrecondition):
    """The namespace was dropped and re-created since the request's generation was read
    (an old RetrieveResult, or a front end's stale cache: the router re-reads and retries)."""

    def __init__(self, namespace: str, expected: int, actual: int | None):
        now = "it no longer exists" if actual is None else f"it is now generation {actual}"
        super().__init__(f"namespace {namespace!r} was re-created: the request is for generation {expected}, "
                         f"{now}")
        self.namespace, self.expected, self.actual = namespace, expected, actual


class StepAnswerLost(FailedPrecondition):
    """A backward was sent again for a step already committed (its value rows stepped, once), and the
    partial sums its first try answered are no longer kept (the shard restarted, its rows moved, or
    the sums aged out): its dL/dq and dL/dT cannot be answered again. Nothing is stepped twice."""

    reason = "STEP_ANSWER_LOST"
    step_id, shard = "", -1  # (named in the message of one a client rebuilt)

    def __init__(self, step_id: str, shard: int):
        super().__init__(f"step {step_id!r} was committed on shard {shard} (its value rows stepped once) and the "
                         "gradients its first try answered are no longer kept (a restart, a reshard, or aged "
                         "out): dL/dq and dL/dT of this step cannot be answered again; go on with the next step")
        self.step_id, self.shard = step_id, shard


class Aborted(MemoryStoreError):
    """A concurrent change kept the call from finishing consistently; nothing was changed, retry."""

    code = "ABORTED"


class ResourceExhausted(MemoryStoreError):
    """Capacity or message size."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(MemoryStoreError):
    """A shard or the service cannot be reached; idempotent calls may retry."""

    code = "UNAVAILABLE"


class ShardUnavailable(Unavailable):
    def __init__(self, shard: int, reason: str = ""):
        detail = f": {reason}" if reason else ""
        super().__init__(f"shard {shard} is unavailable{detail}")
        self.shard = shard


class DeadlineExceeded(MemoryStoreError):
    code = "DEADLINE_EXCEEDED"


class Unauthenticated(MemoryStoreError):
    code = "UNAUTHENTICATED"


class PermissionDenied(MemoryStoreError):
    code = "PERMISSION_DENIED"


class InternalError(MemoryStoreError):
    code = "INTERNAL"


ERRORS_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Aborted,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Unauthenticated,
        PermissionDenied,
        InternalError,
    )
}
ERROR_REASON_KEY = "monim-error-reason"
ERRORS_BY_REASON = {cls.reason: cls for cls in (StepAnswerLost,)}
