"""A LoraflowError as a gRPC status: ``google.rpc.Status`` + ``ErrorInfo{reason, domain, metadata}`` in the
trailers, bounded in bytes; and the client side's reading of it (``error_info``).

Its own module below the server bootstrap, the auth and the concurrency interceptors, which all refuse calls
with these statuses (grpc_server imports them, so they cannot import grpc_server).
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from loraflow.errors import MAX_MESSAGE_BYTES, MAX_VALUE_BYTES, LoraflowError, clip_utf8

ERROR_DOMAIN = "loraflow"

# A gRPC client refuses trailers over 8 KiB (grpc.max_metadata_size) and reports RESOURCE_EXHAUSTED instead
# of the status. The message travels twice: percent-encoded in grpc-message (3 bytes for each non-ASCII
# byte) and inside the base64 google.rpc.Status of grpc-status-details-bin. Both are bounded in bytes, and
# what is encoded is measured: over this budget the metadata beyond field/value goes, then the message shrinks.
MAX_TRAILER_BYTES = 6 << 10
_MAX_METADATA_KEY_BYTES = 64
_SHORT_MESSAGE_BYTES = 256


def _percent_encoded_len(message: str) -> int:
    return sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in message.encode("utf-8"))


def _status_proto(code: grpc.StatusCode, message: str, reason: str, metadata: dict[str, str]) -> status_pb2.Status:
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    return status_pb2.Status(code=code.value[0], message=message, details=[detail])


def trailer_bytes(status: status_pb2.Status) -> int:
    """What a status costs in trailers: grpc-message percent-encoded plus the base64 details, with names."""
    details = status.SerializeToString()
    return (len("grpc-status") + 3 + len("grpc-message") + _percent_encoded_len(status.message)
            + len("grpc-status-details-bin") + 4 * ((len(details) + 2) // 3))


def error_status(code: grpc.StatusCode, message: str, reason: str, metadata: dict[str, str] | None = None) -> grpc.Status:
    """A grpc.Status carrying google.rpc.Status + ErrorInfo in the trailers, within MAX_TRAILER_BYTES."""
    message = clip_utf8(message, MAX_MESSAGE_BYTES)
    reason = clip_utf8(reason, _MAX_METADATA_KEY_BYTES)
    meta = {clip_utf8(str(k), _MAX_METADATA_KEY_BYTES): clip_utf8(str(v), MAX_VALUE_BYTES)
            for k, v in (metadata or {}).items()}
    status = _status_proto(code, message, reason, meta)
    extra = [k for k in meta if k not in ("field", "value")]
    while trailer_bytes(status) > MAX_TRAILER_BYTES and extra:
        del meta[extra.pop()]
        status = _status_proto(code, message, reason, meta)
    if trailer_bytes(status) > MAX_TRAILER_BYTES:
        message = clip_utf8(message, _SHORT_MESSAGE_BYTES)
        status = _status_proto(code, message, reason, meta)
    return rpc_status.to_status(status)


def status_for(exc: LoraflowError) -> grpc.Status:
    return error_status(grpc.StatusCode[exc.code], exc.message, exc.reason, exc.metadata)


def error_info(rpc_error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """Client side: the ErrorInfo of a failed call, or None."""
    status = rpc_status.from_call(rpc_error)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None
