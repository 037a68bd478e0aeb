"""The exception hierarchy domain code raises; grpc_server's interceptor maps it to gRPC statuses.

Each error carries a canonical status ``code`` (its name as in google.rpc.Code, e.g. "NOT_FOUND"; this
module imports no RPC library), an ErrorInfo ``reason`` (UPPER_SNAKE) and ``metadata`` (``field`` and
``value`` when a request field is to blame), so a client learns which field was wrong.
"""

from __future__ import annotations

from typing import Any

# Values longer than this are cut in ErrorInfo metadata so an oversized field never echoes back whole.
_MAX_VALUE_CHARS = 200


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    if len(text) > _MAX_VALUE_CHARS:
        return text[:_MAX_VALUE_CHARS] + f"...({len(text)} chars)"
    return text


class LoraflowError(Exception):
    """Base of every error loraflow raises on purpose; maps to INTERNAL unless a subclass says otherwise."""

    code: str = "INTERNAL"  # a google.rpc.Code name
    default_reason: str = "INTERNAL"

    def __init__(self, message: str, *, field: str | None = None, value: Any = None,
                 reason: str | None = None, metadata: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.value = value
        self.reason = reason or self.default_reason
        meta: dict[str, str] = {}
        if field is not None:
            meta["field"] = field
            meta["value"] = _short(value)
        if metadata:
            meta.update({str(k): _short(v) for k, v in metadata.items()})
        self.metadata = meta

    def __str__(self) -> str:
        return self.message


class InvalidArgument(LoraflowError):
    """A request field is malformed: INVALID_ARGUMENT naming the field and value."""

    code = "INVALID_ARGUMENT"
    default_reason = "INVALID_ARGUMENT"


class NotFound(LoraflowError):
    """An unknown job, adapter, artifact or model."""

    code = "NOT_FOUND"
    default_reason = "NOT_FOUND"


class AlreadyExists(LoraflowError):
    code = "ALREADY_EXISTS"
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(LoraflowError):
    """The system is in the wrong state for the request (cancel a finished job, ai100 without SDK)."""

    code = "FAILED_PRECONDITION"
    default_reason = "FAILED_PRECONDITION"


class PermissionDenied(LoraflowError):
    """The caller may not do this: a local path outside the allowed roots, a bucket not allowed."""

    code = "PERMISSION_DENIED"
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(LoraflowError):
    """No valid credentials: a missing, malformed or unknown bearer token."""

    code = "UNAUTHENTICATED"
    default_reason = "UNAUTHENTICATED"


class ResourceExhausted(LoraflowError):
    """A queue or batch is full."""

    code = "RESOURCE_EXHAUSTED"
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(LoraflowError):
    """A dependency (Redis, the store) cannot be reached right now; the client may retry."""

    code = "UNAVAILABLE"
    default_reason = "UNAVAILABLE"


class IntegrityError(LoraflowError):
    """Stored bytes do not match their recorded sha256 or size (corruption or a torn write)."""

    code = "DATA_LOSS"
    default_reason = "CHECKSUM_MISMATCH"


# Control flow inside workers; never sent to clients.

class JobCancelled(Exception):
    """Raised by JobContext.check()/report() when a client cancelled the running job."""


class LeaseLost(Exception):
    """Raised when another worker took the job over (attempt fencing); the old attempt must stop writing."""


class WorkerStopping(Exception):
    """Raised by JobContext.check() when the worker is shutting down: checkpoint and return; the job is redelivered."""
