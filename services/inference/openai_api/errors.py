"""OpenAI's error JSON and the one LoraflowError → HTTP status mapping of the HTTP API.

Every error leaves as ``{"error": {"message", "type", "param", "code"}}``: ``param`` is the request
field to blame (in the OpenAI request's own names), ``code`` the loraflow reason in lower case.
"""

from __future__ import annotations

import logging
import uuid

import redis
from starlette.responses import JSONResponse

from loraflow.errors import MAX_MESSAGE_BYTES, LoraflowError, clip_utf8
from loraflow.options.sampling_params import SAMPLING_FIELDS

log = logging.getLogger(__name__)

# google.rpc.Code name → HTTP status, as the canonical gRPC ↔ HTTP mapping (google.rpc.Code docs) has it.
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "DATA_LOSS": 500,
    "UNKNOWN": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
# The OpenAI error ``type`` a client library keys on, by HTTP status.
ERROR_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}
# Engine and sampling errors name gRPC fields; an HTTP caller sent these names instead.
_PARAM_NAMES = {
    **{f"sampling.{f.name}": f.http_name for f in SAMPLING_FIELDS},
    "adapter": "model",
    "model_id": "model",
}
# A param is a field path the client sent (``messages[3].content``): bounded like any echoed value.
MAX_PARAM_BYTES = 256


def param_name(field: str | None) -> str | None:
    if field is None:
        return None
    return _PARAM_NAMES.get(field, field)


def http_status(err: LoraflowError) -> int:
    return HTTP_STATUS.get(err.code, 500)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    message = clip_utf8(message, MAX_MESSAGE_BYTES)  # bytes, not characters: 1,000 emoji are 4 KB
    param = None if param is None else clip_utf8(param, MAX_PARAM_BYTES)
    error_type = ERROR_TYPE.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def from_loraflow(err: LoraflowError) -> tuple[int, dict]:
    """(status, body) for a domain error; gRPC field names in the message become the HTTP ones."""
    message, param = err.message, param_name(err.field)
    if err.field and param != err.field:
        message = message.replace(err.field, param)
    status = http_status(err)
    return status, error_body(status, message, param, err.reason.lower())


def from_exception(exc: BaseException, where: str) -> tuple[int, dict]:
    """Any exception → (status, body): domain errors as mapped, Redis outages 503, the rest 500 with a
    correlation id that is logged with the traceback (which never reaches the client)."""
    if isinstance(exc, LoraflowError):
        log.info("%s -> %s: %s", where, exc.code, exc.message)
        return from_loraflow(exc)
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        log.warning("%s -> 503: redis unreachable: %s", where, exc)
        return 503, error_body(503, "the registry (redis) is unreachable; retry later", None, "redis_unavailable")
    correlation_id = uuid.uuid4().hex[:12]
    log.error("internal error in %s [correlation id %s]", where, correlation_id, exc_info=exc)
    return 500, error_body(500, f"internal error (correlation id {correlation_id})", None, "internal")


def error_response(status: int, body: dict, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)
