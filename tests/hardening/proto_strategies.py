"""Hypothesis strategies for any protobuf message, built from its descriptor: every field, nested messages,
repeated and map fields, one member per oneof, unknown enum values, extreme numbers, and strings a hostile
caller sends (traversals, URIs of other buckets, control and line-separator characters, surrogate-free
emoji floods) mixed with strings the server knows (``known``), so examples also get past the first check."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

HOSTILE_TEXT = (
    "", " ", ".", "..", "../../etc/passwd", "/etc/shadow", "/proc/self/environ", "file:///etc/passwd",
    "s3://someone-elses-bucket/x", "s3://", "http://169.254.169.254/latest", "C:\\Windows\\win.ini",
    "a/../../b", "name\x00.bin", "line\u2028break", "\x7f\x1b[2J", "%2e%2e%2f", "con", ".hidden", "x" * 300,
    "\U0001f600" * 900, "\u202e" + "gnp.exe", "ﬁ" * 50, "0" * 70, "-1", "NaN", "{}", "[]", "null",
)
INT32_EDGES = (0, 1, -1, 2, 7, 64, 65, 1024, 2**31 - 1, -(2**31))
INT64_EDGES = (0, 1, -1, 2**53 + 1, 2**63 - 1, -(2**63))
UINT_EDGES = (0, 1, 2**32 - 1)
_SIGNED32 = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32}
_SIGNED64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64}
_UNSIGNED32 = {FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32}
_UNSIGNED64 = {FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64}
MAX_DEPTH = 3


def text(known: Sequence[str] = ()) -> st.SearchStrategy[str]:
    choices = [st.sampled_from(HOSTILE_TEXT), st.text(max_size=40)]
    if known:
        choices.append(st.sampled_from(tuple(known)))
    return st.one_of(*choices)


def _scalar(field: FieldDescriptor, known: Sequence[str]) -> st.SearchStrategy:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return text(known)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in _SIGNED32:
        return st.one_of(st.sampled_from(INT32_EDGES), st.integers(-(2**31), 2**31 - 1))
    if kind in _SIGNED64:
        return st.one_of(st.sampled_from(INT64_EDGES), st.integers(-(2**63), 2**63 - 1))
    if kind in _UNSIGNED32:
        return st.one_of(st.sampled_from(UINT_EDGES), st.integers(0, 2**32 - 1))
    if kind in _UNSIGNED64:
        return st.integers(0, 2**64 - 1)
    if kind == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    if kind == FieldDescriptor.TYPE_ENUM:
        numbers = [v.number for v in field.enum_type.values]
        return st.sampled_from([*numbers, max(numbers) + 1, 99])  # proto3 enums are open: unknowns arrive
    raise TypeError(f"no strategy for field type {kind} ({field.full_name})")


def _value(field: FieldDescriptor, known: Sequence[str], depth: int) -> st.SearchStrategy:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return messages(field.message_type, known, depth + 1)
    return _scalar(field, known)


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def messages(descriptor: Descriptor, known: Sequence[str] = (), depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor``'s type; below MAX_DEPTH nested messages are left unset."""
    cls = GetMessageClass(descriptor)
    if depth > MAX_DEPTH:
        return st.just(cls())
    plain: dict[str, st.SearchStrategy] = {}
    for field in descriptor.fields:
        # Real oneofs are drawn below, one member at most; a proto3 optional's synthetic oneof ("_name") is plain.
        if field.containing_oneof is not None and not field.containing_oneof.name.startswith("_"):
            continue
        if _is_map(field):
            key = _value(field.message_type.fields_by_name["key"], known, depth)
            value = _value(field.message_type.fields_by_name["value"], known, depth)
            plain[field.name] = st.dictionaries(key, value, max_size=3)
        elif field.is_repeated:
            plain[field.name] = st.lists(_value(field, known, depth), max_size=4)
        else:
            plain[field.name] = _value(field, known, depth)
    oneofs = [o for o in descriptor.oneofs if not o.name.startswith("_")]

    @st.composite
    def build(draw) -> Message:
        kwargs = {}
        for name, strategy in plain.items():
            if draw(st.booleans()):  # an unset field is as interesting as a set one
                kwargs[name] = draw(strategy)
        for oneof in oneofs:
            member = draw(st.sampled_from([None, *oneof.fields]))
            if member is not None:
                kwargs[member.name] = draw(_value(member, known, depth))
        return cls(**kwargs)

    return build()
