"""Per-RPC request size limits, checked before a message is parsed.

grpcio parses every request message on the server's one polling thread, so a big message stalls every
RPC of the process while it is parsed (and a malformed one becomes INTERNAL). The interceptor here wraps
each method's deserializer: a message over its method's limit is never parsed and the RPC ends
RESOURCE_EXHAUSTED naming the largest field, its size and the limit (flag included); a message protobuf
cannot parse (bad wire format, invalid UTF-8 in a string) ends INVALID_ARGUMENT. The transport's own cap
(``grpc.max_receive_message_length``) is set to the largest per-method limit, so nothing bigger is
buffered at all.

Limits (loraflow.security.limits.ServerLimits): StorageService.Upload messages carry file chunks,
StatDirectory / CommitDirectory a file list; every other RPC, ``max_request_bytes`` (the HTTP API's
body limit too).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from loraflow.errors import InvalidArgument, ResourceExhausted
from loraflow.security.limits import ServerLimits, flag_name
from loraflow.server.error_status import status_for

log = logging.getLogger(__name__)

_STORAGE = "/loraflow.v1.StorageService/"
# method -> the ServerLimits field bounding its request messages (others: max_request_bytes).
METHOD_LIMITS = {
    _STORAGE + "Upload": "max_upload_message_bytes",
    _STORAGE + "StatDirectory": "max_file_list_request_bytes",
    _STORAGE + "CommitDirectory": "max_file_list_request_bytes",
}
DEFAULT_LIMIT = "max_request_bytes"
# Fields looked at when naming the biggest one of a refused message (the walk is pure Python).
_MAX_FIELDS_SCANNED = 20_000


def limit_field(method: str) -> str:
    return METHOD_LIMITS.get(method, DEFAULT_LIMIT)


def transport_limit(limits: ServerLimits) -> int:
    """The largest message any method accepts: what the transport may buffer."""
    return max(getattr(limits, name) for name in {DEFAULT_LIMIT, *METHOD_LIMITS.values()})


@dataclass(frozen=True)
class _Refused:
    """Stands in for a request message that was not parsed; the handler ends the RPC with ``error()``."""

    method: str
    type_name: str
    data: bytes | None  # kept only for an oversized message, to name its largest field
    size: int
    limit: int
    limit_name: str
    decode_error: str = ""

    def error(self, descriptor) -> Exception:
        if self.decode_error:
            return InvalidArgument(f"the request is not a valid {self.type_name} message: {self.decode_error}",
                                   field="request", value=f"<{self.size} bytes>", reason="MALFORMED_REQUEST")
        field, field_bytes = largest_field(descriptor, self.data or b"")
        where = f"; its field {field} holds {field_bytes} bytes" if field else ""
        return ResourceExhausted(
            f"the {self.type_name} is {self.size} bytes, over the {self.limit}-byte limit of {self.method} "
            f"({flag_name(self.limit_name)}){where}", field=field or "request", value=f"<{self.size} bytes>",
            reason="REQUEST_TOO_LARGE",
            metadata={"request_bytes": self.size, "limit_bytes": self.limit, "limit": self.limit_name})


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def largest_field(descriptor, data: bytes) -> tuple[str, int]:
    """(name, bytes) of the top-level field of a serialized message that takes most bytes; ("", 0) when
    the wire format cannot be walked. Reads tags and lengths only, never the payloads."""
    sizes: dict[int, int] = {}
    pos = 0
    try:
        for _ in range(_MAX_FIELDS_SCANNED):
            if pos >= len(data):
                break
            start = pos
            tag, pos = _varint(data, pos)
            wire_type = tag & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 2:
                length, pos = _varint(data, pos)
                pos += length
            elif wire_type == 5:
                pos += 4
            else:
                break  # groups: not in proto3
            sizes[tag >> 3] = sizes.get(tag >> 3, 0) + min(pos, len(data)) - start
    except ValueError:
        pass
    if not sizes or descriptor is None:
        return "", 0
    number, size = max(sizes.items(), key=lambda item: item[1])
    field = descriptor.fields_by_number.get(number)
    return (field.name if field is not None else f"#{number}"), size


def _bounded(deserializer: Callable[[bytes], object] | None, method: str, limit: int, limit_name: str):
    message_type = getattr(deserializer, "__self__", None)
    type_name = message_type.DESCRIPTOR.name if message_type is not None else "request message"

    def deserialize(data: bytes):
        # Runs on grpc's polling thread: a length check only, never a parse of an oversized message.
        if len(data) > limit:
            return _Refused(method, type_name, data, len(data), limit, limit_name)
        if deserializer is None:
            return data
        try:
            return deserializer(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as err:
            return _Refused(method, type_name, None, len(data), limit, limit_name, decode_error=str(err)[:200])

    return deserialize, getattr(message_type, "DESCRIPTOR", None)


class MessageLimitInterceptor(grpc.ServerInterceptor):
    """Bounds every method's request messages (see module docstring); place it inside auth."""

    def __init__(self, limits: ServerLimits):
        self.limits = limits

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        name = limit_field(method)
        deserialize, descriptor = _bounded(handler.request_deserializer, method, getattr(self.limits, name), name)
        ser = handler.response_serializer

        def refuse(refused: _Refused, context) -> None:
            err = refused.error(descriptor)
            log.info("%s -> %s: %s", method, err.code, err.message)
            context.abort_with_status(status_for(err))

        def checked_iterator(requests: Iterator, context) -> Iterator:
            for request in requests:
                if isinstance(request, _Refused):
                    refuse(request, context)
                yield request

        if handler.unary_unary or handler.unary_stream:
            def unary_request(behavior):
                def run(request, context):
                    if isinstance(request, _Refused):
                        refuse(request, context)
                    return behavior(request, context)
                return run

            if handler.unary_unary:
                return grpc.unary_unary_rpc_method_handler(unary_request(handler.unary_unary), deserialize, ser)
            return grpc.unary_stream_rpc_method_handler(unary_request(handler.unary_stream), deserialize, ser)

        def stream_request(behavior):
            def run(requests, context):
                return behavior(checked_iterator(requests, context), context)
            return run

        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(stream_request(handler.stream_unary), deserialize, ser)
        return grpc.stream_stream_rpc_method_handler(stream_request(handler.stream_stream), deserialize, ser)
