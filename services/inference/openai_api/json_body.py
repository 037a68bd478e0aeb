"""A request body → JSON value, strictly: every edge Python's json module lets through or turns into a 500
is a 400 naming where in the body it is.

* the body must be UTF-8 (RFC 8259), without a BOM; the error gives the byte offset;
* an integer literal longer than ``MAX_INT_DIGITS`` digits (Python refuses to convert it: a ValueError,
  formerly a 500), a number that overflows to infinity, and the non-JSON ``NaN`` / ``Infinity`` are refused;
* a key given twice in one object is refused (which one wins is not something a client should guess);
* a string holding a lone surrogate (``"\\ud800"`` is valid JSON escape syntax but not Unicode text: it
  cannot be encoded, tokenized or echoed) is refused, keys included;
* nesting deeper than ``MAX_DEPTH`` is refused.

Errors name the place as the schema errors do: ``messages[0].content``. CPU-bound on big bodies: call it
off the event loop.
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any

from loraflow.errors import InvalidArgument

MAX_INT_DIGITS = sys.get_int_max_str_digits() or 4300
MAX_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Refused:
    """Stands in for a value json could read but the API refuses; the walk reports where it is."""

    def __init__(self, why: str):
        self.why = why


class _Object(dict):
    """A JSON object, with the first key that appeared twice (if any)."""

    duplicate: str | None = None


def _int(text: str) -> int | _Refused:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        return _Refused(f"is an integer literal of {digits} digits; at most {MAX_INT_DIGITS} are accepted")
    return int(text)


def _float(text: str) -> float | _Refused:
    value = float(text)
    if not math.isfinite(value):
        return _Refused(f"is a number out of range ({text[:20]}{'...' if len(text) > 20 else ''})")
    return value


def _constant(text: str) -> _Refused:
    return _Refused(f"is {text}, which is not JSON (numbers must be finite)")


def _object(pairs: list[tuple[str, Any]]) -> _Object:
    obj = _Object()
    for key, value in pairs:
        if key in obj and obj.duplicate is None:
            obj.duplicate = key
        obj[key] = value
    return obj


def _path(parts: tuple) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


def _surrogate(text: str) -> str | None:
    match = _SURROGATE.search(text)
    if match is None:
        return None
    return f"holds a lone surrogate (U+{ord(match.group()):04X}) at character {match.start()}: JSON text must be " \
           f"valid Unicode (a surrogate escape is only valid as half of a pair)"


def _printable(key: str) -> str:
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def _check(value: Any) -> None:
    """Raise InvalidArgument for the first refused value, walking depth-first (iteratively)."""
    stack: list[tuple[Any, tuple]] = [(value, ())]
    while stack:
        item, where = stack.pop()
        if len(where) > MAX_DEPTH:  # named by its top-level field: the full path would be the depth itself
            raise InvalidArgument(f"{_path(where[:1])} nests deeper than {MAX_DEPTH} levels", field=_path(where[:1]),
                                  value="<nested>", reason="INVALID_JSON")
        if isinstance(item, _Refused):
            raise InvalidArgument(f"{_path(where)} {item.why}", field=_path(where), value=item.why,
                                  reason="INVALID_JSON")
        if isinstance(item, str):
            why = _surrogate(item)
            if why is not None:
                raise InvalidArgument(f"{_path(where)} {why}", field=_path(where), value=_printable(item),
                                      reason="INVALID_UNICODE")
        elif isinstance(item, dict):
            if getattr(item, "duplicate", None) is not None:
                key = _printable(item.duplicate)
                raise InvalidArgument(f"{_path((*where, key))} is given twice in one object", field=_path((*where, key)),
                                      value=key, reason="INVALID_JSON")
            for key, child in item.items():
                why = _surrogate(key)
                if why is not None:
                    raise InvalidArgument(f"a key of {_path(where)} {why}", field=_path(where), value=_printable(key),
                                          reason="INVALID_UNICODE")
                stack.append((child, (*where, key)))
        elif isinstance(item, list):
            stack.extend((child, (*where, i)) for i, child in reversed(list(enumerate(item))))


def parse_json_body(raw: bytes) -> Any:
    """The body's JSON value; InvalidArgument (400) naming the field or the byte offset otherwise."""
    size = f"<{len(raw)} bytes>"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidArgument(f"the request body is not UTF-8: byte 0x{raw[err.start]:02x} at offset {err.start}",
                              field="body", value=size, reason="INVALID_JSON") from None
    if text.startswith("\ufeff"):
        raise InvalidArgument("the request body starts with a byte order mark; send plain UTF-8 JSON",
                              field="body", value=size, reason="INVALID_JSON")
    try:
        value = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant,
                           object_pairs_hook=_object)
    except json.JSONDecodeError as err:
        raise InvalidArgument(f"the request body is not valid JSON: {err.msg} at line {err.lineno} column "
                              f"{err.colno}", field="body", value=size, reason="INVALID_JSON") from None
    except RecursionError:
        raise InvalidArgument(f"the request body nests deeper than {MAX_DEPTH} levels", field="body", value=size,
                              reason="INVALID_JSON") from None
    _check(value)
    return value
