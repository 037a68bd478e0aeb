"""Output of the CLI: stable JSON for scripts (`-o json`), rich tables for people."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table

from loraflow import errors
from loraflow.v1 import jobs_pb2

OUTPUT_FORMATS = ("table", "json")


def to_dict(message: Message) -> dict[str, Any]:
    """Proto field names as keys, every field present, enums as names, timestamps RFC 3339 (None when unset).

    Scripts get the same keys whatever the message holds: unset sub-messages appear with their defaults,
    and int64 fields stay numbers (protobuf's JSON mapping would quote them).
    """
    data = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)
    return _normalize(message, data)


def _normalize(message: Message, data: dict[str, Any]) -> dict[str, Any]:
    for field in message.DESCRIPTOR.fields:
        is_message = field.message_type is not None and not field.message_type.GetOptions().map_entry
        if field.name not in data and field.containing_oneof is not None and is_message:
            continue  # the unset side of a oneof (e.g. the other job result) stays absent
        if field.name not in data and not is_message and not field.is_repeated:
            data[field.name] = None  # an unset `optional` scalar: null, distinct from an explicit 0
            continue
        if is_message and field.message_type.full_name.startswith("google.protobuf."):
            data.setdefault(field.name, None)
        elif is_message and field.is_repeated:
            data[field.name] = [_normalize(m, d) for m, d in zip(getattr(message, field.name),
                                                                  data.get(field.name, []), strict=True)]
        elif is_message and field.name not in data:
            data[field.name] = to_dict(getattr(message, field.name))  # unset: its defaults, same keys
        elif is_message:
            data[field.name] = _normalize(getattr(message, field.name), data[field.name])
        elif field.type in (field.TYPE_INT64, field.TYPE_UINT64, field.TYPE_SINT64, field.TYPE_FIXED64,
                            field.TYPE_SFIXED64) and field.name in data:
            value = data[field.name]
            data[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
    return data


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True) + "\n")
    sys.stdout.flush()


def print_json_line(value: Any) -> None:
    """One compact JSON object per line (NDJSON) for streams: watch, generate."""
    sys.stdout.write(json.dumps(value, sort_keys=True, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def state_name(state: int) -> str:
    return jobs_pb2.JobState.Name(state).removeprefix("JOB_STATE_")


def kind_name(kind: int) -> str:
    return jobs_pb2.JobKind.Name(kind).removeprefix("JOB_KIND_").lower()


_STATE_STYLE = {"SUCCEEDED": "green", "FAILED": "red", "CANCELLED": "yellow", "RUNNING": "cyan", "QUEUED": "blue"}


def styled_state(state: int) -> str:
    name = state_name(state)
    style = _STATE_STYLE.get(name)
    return f"[{style}]{name}[/{style}]" if style else name


def timestamp(ts) -> str:
    """A protobuf Timestamp as local 'YYYY-MM-DD HH:MM:SS' ('' when unset)."""
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return ""
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def fmt_metrics(metrics, keys: Sequence[str] | None = None) -> str:
    items = [(k, metrics[k]) for k in (keys or sorted(metrics)) if k in metrics]
    return " ".join(f"{k}={_num(v)}" for k, v in items)


def _num(value: float) -> str:
    if float(value).is_integer() and abs(value) < 1e12:
        return str(int(value))
    return f"{value:.4g}"


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    out = Table(title=title, show_lines=False, header_style="bold")
    for column in columns:
        out.add_column(column, overflow="fold")
    for row in rows:
        out.add_row(*("" if v is None else str(v) for v in row))
    return out


def key_values(title: str, pairs: Sequence[tuple[str, Any]]) -> Table:
    out = Table(title=title, show_header=False, box=None, pad_edge=False)
    out.add_column("key", style="bold")
    out.add_column("value", overflow="fold")
    for key, value in pairs:
        out.add_row(key, "" if value is None else str(value))
    return out


def error_dict(exc: errors.LoraflowError) -> dict[str, Any]:
    """The stable JSON shape of an error: code, message, reason, field, value, metadata."""
    code = getattr(exc, "code", None)
    return {"error": {
        "code": code or "UNKNOWN",
        "message": str(exc),
        "reason": getattr(exc, "reason", None),
        "field": getattr(exc, "field", None),
        "value": getattr(exc, "metadata", {}).get("value"),
        "metadata": dict(getattr(exc, "metadata", {}) or {}),
    }}


def print_error(exc: errors.LoraflowError, output: str, console: Console) -> None:
    """JSON on stderr for scripts; otherwise a red line: code, message, then the field and its value."""
    detail = error_dict(exc)["error"]
    if output == "json":
        sys.stderr.write(json.dumps(detail and {"error": detail}, sort_keys=True) + "\n")
        return
    line = f"[bold red]error[/bold red] {detail['code']}: {detail['message']}"
    if detail["field"]:
        line += f"\n  field: {detail['field']}"
        if detail["value"] is not None:
            line += f"  value: {detail['value']}"
    address = getattr(exc, "address", "")
    if address:
        line += f"\n  service: {getattr(exc, 'service', '')} at {address}"
    console.print(line, highlight=False)
