"""Validation of user-chosen names (adapter names, job ids, artifact ids): safe as store keys and Redis keys."""

from __future__ import annotations

import re

from loraflow.errors import InvalidArgument

MAX_NAME_LEN = 64
_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")


def validate_name(field: str, value: object, *, max_len: int = MAX_NAME_LEN) -> str:
    """Return ``value`` if it is a safe name, else raise InvalidArgument naming ``field`` and the value.

    Allowed: 1..max_len characters of [A-Za-z0-9._-], not starting with '.', no '..' anywhere
    (so a name can never escape a directory or hide as a dotfile).
    """
    if not isinstance(value, str):
        raise InvalidArgument(f"{field} must be a string, got {type(value).__name__}", field=field, value=value)
    if not value:
        raise InvalidArgument(f"{field} must not be empty", field=field, value=value)
    if len(value) > max_len:
        raise InvalidArgument(f"{field} must be at most {max_len} characters, got {len(value)}",
                              field=field, value=value)
    if not _NAME_RE.fullmatch(value):
        raise InvalidArgument(f"{field} may only contain letters, digits, '.', '_' and '-', got {value!r}",
                              field=field, value=value)
    if value.startswith("."):
        raise InvalidArgument(f"{field} must not start with '.', got {value!r}", field=field, value=value)
    if ".." in value:
        raise InvalidArgument(f"{field} must not contain '..', got {value!r}", field=field, value=value)
    return value


def is_valid_name(value: object, *, max_len: int = MAX_NAME_LEN) -> bool:
    try:
        validate_name("name", value, max_len=max_len)
    except InvalidArgument:
        return False
    return True


MAX_REQUEST_ID_LEN = 128
# A caller's id for idempotency, logs and metrics: echoed in every streamed chunk and stored as a Redis
# hash field, so it is short and of a charset safe in logs, headers and keys (UUIDs, ULIDs, "job:42/a").
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:/@+-]+")


def validate_request_id(value: object, *, field: str = "request_id") -> str:
    """Return ``value`` when it is "" (none given) or 1..128 characters of [A-Za-z0-9._:/@+-], else InvalidArgument."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{field} must be a string, got {type(value).__name__}", field=field, value=value)
    if len(value) > MAX_REQUEST_ID_LEN:
        raise InvalidArgument(f"{field} must be at most {MAX_REQUEST_ID_LEN} characters, got {len(value)}",
                              field=field, value=f"<{len(value)} chars>")
    if value and not _REQUEST_ID_RE.fullmatch(value):
        raise InvalidArgument(f"{field} may only contain letters, digits and . _ : / @ + -, got {value!r}",
                              field=field, value=value)
    return value
