"""The exception hierarchy domain code raises; grpc_server's interceptor maps it to gRPC statuses.

Each error carries a canonical status ``code`` (its name as in google.rpc.Code, e.g. "NOT_FOUND"; this
module imports no RPC library), an ErrorInfo ``reason`` (UPPER_SNAKE) and ``metadata`` (``field`` and
``value`` when a request field is to blame), so a client learns which field was wrong.
"""

from __future__ import annotations

from typing import Any

# Error text is bounded in encoded UTF-8 bytes, not characters: a status travels in HTTP/2 trailers (gRPC
# clients refuse trailers over 8 KiB, and grpc-message percent-encodes every non-ASCII byte), so 1,000
# emoji would be ~12 KB there. A message keeps at most MAX_MESSAGE_BYTES, an ErrorInfo metadata value
# MAX_VALUE_BYTES; error_status.status_for also bounds the whole status.
MAX_MESSAGE_BYTES = 1024
MAX_VALUE_BYTES = 200


def clip_utf8(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes at a character boundary, the cut saying how long it was.

    Lone surrogates (from JSON ``"\\ud800"``) cannot be encoded; they are shown as ``\\udXXX`` escapes."""
    raw = text.encode("utf-8", "backslashreplace")
    if len(raw) <= limit:
        return raw.decode("utf-8")
    suffix = f"...({len(raw)} bytes)"
    keep = max(0, limit - len(suffix))
    return raw[:keep].decode("utf-8", "ignore") + suffix  # "ignore" drops a character cut in half


def _short(value: Any) -> str:
    return clip_utf8(value if isinstance(value, str) else repr(value), MAX_VALUE_BYTES)


class LoraflowError(Exception):
    """Base of every error loraflow raises on purpose; maps to INTERNAL unless a subclass says otherwise."""

    code: str = "INTERNAL"  # a google.rpc.Code name
    default_reason: str = "INTERNAL"

    def __init__(self, message: str, *, field: str | None = None, value: Any = None,
                 reason: str | None = None, metadata: dict[str, str] | None = None):
        message = clip_utf8(message, MAX_MESSAGE_BYTES)
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
