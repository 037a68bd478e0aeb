"""Bounded, validating readers for the two files of a PEFT adapter dir (no torch, no safetensors lib).

Adapter files come from clients, so every size, offset and type is checked before it is used:
a malformed file is an ``InvalidArgument`` naming the file and what is wrong, never an INTERNAL
from a parser deep inside. Errors never carry bytes read from the file, only sizes, offsets and
names the format defines.

safetensors layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON (an object of
tensor name -> {dtype, shape, data_offsets} plus an optional ``__metadata__`` of str -> str),
then the data region; ``data_offsets`` are [begin, end) relative to the data region.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np

from loraflow.artifact.half_cast import half_to_float32
from loraflow.errors import InvalidArgument

# A real adapter header is a few KiB per hundred tensors; the safetensors library itself caps it at 100 MB.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# adapter_config.json is a few hundred bytes; 1 MiB leaves room for long rank/alpha patterns.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_TENSORS = 100_000
MAX_TENSOR_NAME_CHARS = 512
MAX_NDIM = 8

# Every dtype safetensors defines -> bytes per element; only the float ones can be LoRA weights.
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_NP_FLOAT = {"F16": np.float16, "F32": np.float32, "F64": np.float64}


def _bad(path: Path, field: str, why: str, value: Any = None) -> InvalidArgument:
    return InvalidArgument(f"{path.name}: {why}", field=field, value=str(path) if value is None else value,
                           metadata={"file": str(path)})


def _regular_file_size(path: Path, field: str) -> int:
    """Size of a regular file; FIFOs, devices and directories are refused before any read."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise _bad(path, field, f"cannot be read ({err.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise _bad(path, field, "is not a regular file")
    return st.st_size


def read_config(path: Path) -> dict[str, Any]:
    """adapter_config.json as a dict: a regular file of at most MAX_CONFIG_BYTES of UTF-8 JSON holding an object."""
    size = _regular_file_size(path, "adapter_config")
    if size > MAX_CONFIG_BYTES:
        raise _bad(path, "adapter_config", f"is {size} bytes, more than the {MAX_CONFIG_BYTES} allowed")
    with open(path, "rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _bad(path, "adapter_config", f"is not UTF-8 (bad byte at offset {err.start})") from None
    try:
        config = json.loads(text, parse_constant=_no_constant)
    except ValueError as err:  # JSONDecodeError, or NaN/Infinity literals refused below
        where = f" at line {err.lineno} column {err.colno}" if isinstance(err, json.JSONDecodeError) else ""
        raise _bad(path, "adapter_config", f"is not valid JSON{where}") from None
    except RecursionError:
        raise _bad(path, "adapter_config", "nests JSON too deeply") from None
    if not isinstance(config, dict):
        raise _bad(path, "adapter_config", f"must hold a JSON object, not a {type(config).__name__}")
    return config


def _no_constant(name: str):
    # json accepts NaN, Infinity and -Infinity by default; no adapter field may be non-finite.
    raise ValueError(f"non-finite number {name}")


def read_header(path: Path) -> tuple[dict[str, dict[str, Any]], int, int]:
    """Validated safetensors header → ({tensor: {dtype, shape, data_offsets}}, data_start, data_len)."""
    field = "weights"
    size = _regular_file_size(path, field)
    if size < 8:
        raise _bad(path, field, f"is {size} bytes, too short for a safetensors header length")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        # The declared length is the file's first 8 bytes: it is never shown (any file may be named here).
        if header_len > size - 8:
            raise _bad(path, field, f"declares a header longer than the file ({size} bytes): truncated or "
                       "not safetensors")
        if header_len > MAX_HEADER_BYTES:
            raise _bad(path, field, f"declares a header longer than the {MAX_HEADER_BYTES} bytes allowed")
        if header_len < 2:
            raise _bad(path, field, "declares a header too short for a JSON object")
        raw = f.read(header_len)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _bad(path, field, f"header is not UTF-8 (bad byte at offset {8 + err.start})") from None
    try:
        header = json.loads(text, parse_constant=_no_constant)
    except ValueError:
        raise _bad(path, field, "header is not valid JSON") from None
    except RecursionError:
        raise _bad(path, field, "header nests JSON too deeply") from None
    if not isinstance(header, dict):
        raise _bad(path, field, f"header must be a JSON object, not a {type(header).__name__}")
    data_start, data_len = 8 + header_len, size - 8 - header_len
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _bad(path, field, "__metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise _bad(path, field, f"holds {len(header)} tensors, more than the {MAX_TENSORS} allowed")
    spans = []
    for name, info in header.items():
        shown = _label(name, f"#{len(spans)}")
        if len(name) > MAX_TENSOR_NAME_CHARS:
            raise _bad(path, field, f"tensor {shown} has a name longer than {MAX_TENSOR_NAME_CHARS} characters")
        if not isinstance(info, dict):
            raise _bad(path, field, f"tensor {shown!r}: entry must be an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            # The unknown value itself is not shown: it is text from the file.
            raise _bad(path, "weights.dtype", f"tensor {shown!r}: unknown dtype (known: {sorted(DTYPE_SIZES)})")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or \
                not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise _bad(path, "weights.shape", f"tensor {shown!r}: shape must be at most {MAX_NDIM} integers >= 0, "
                       f"got {_short(shape)}", value=_short(shape))
        if not isinstance(offsets, list) or len(offsets) != 2 or \
                not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets):
            raise _bad(path, "weights.data_offsets", f"tensor {shown!r}: data_offsets must be two integers, "
                       f"got {_short(offsets)}", value=_short(offsets))
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise _bad(path, "weights.data_offsets", f"tensor {shown!r}: data_offsets [{begin}, {end}] are outside "
                       f"the {data_len}-byte data region", value=[begin, end])
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != nbytes:
            raise _bad(path, "weights.data_offsets", f"tensor {shown!r}: data_offsets span {end - begin} bytes but "
                       f"shape {shape} of {dtype} needs {nbytes}", value=[begin, end])
        spans.append((begin, end, shown))
    spans.sort()
    for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise _bad(path, "weights.data_offsets", f"tensors {n0!r} and {n1!r} overlap at bytes [{b1}, {e0})",
                       value=[b1, e0])
    return header, data_start, data_len


def read_float_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a validated safetensors file as float32 (BF16 handled without torch); all must be
    float dtypes with finite values.

    The usual file (PEFT's: one float dtype, tensors packed end to end) is read in one call, converted in one
    call and checked finite in one pass over its raw bits, the tensors being views of that one array; any other
    file, or one that fails the bulk check, goes through the per-tensor loop, which names the offending
    tensor exactly as it always has."""
    header, data_start, data_len = read_header(path)
    packed = _read_packed(path, header, data_start, data_len)
    return packed if packed is not None else _read_each(path, header, data_start)


_PACKED_DTYPES = ("F16", "BF16", "F32")


def _read_packed(path: Path, header: dict[str, dict[str, Any]], data_start: int,
                 data_len: int) -> dict[str, np.ndarray] | None:
    """The bulk read, or None when the file is not one dtype packed end to end, is short, or holds a
    non-finite value (the per-tensor loop then reports it)."""
    dtypes = {info["dtype"] for info in header.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _PACKED_DTYPES:
        return None
    dtype = next(iter(dtypes))
    size = DTYPE_SIZES[dtype]
    # read_header refused overlaps, so spans that add up to the data region and sit on element boundaries
    # tile it: every byte read belongs to exactly one tensor.
    if data_len % size or sum(e - b for b, e in (i["data_offsets"] for i in header.values())) != data_len or \
            any(i["data_offsets"][0] % size for i in header.values()):
        return None
    buf = bytearray(data_len)  # writable, so the float32 views of an F32 file need no copy
    with open(path, "rb") as f:
        f.seek(data_start)
        if f.readinto(buf) != data_len:
            return None
    values = _as_float32(buf, dtype)
    # max and min propagate NaN and reach any infinity: two reductions, no array of flags.
    if values.size and not (np.isfinite(values.max()) and np.isfinite(values.min())):
        return None
    return {name: values[info["data_offsets"][0] // size:info["data_offsets"][1] // size].reshape(info["shape"])
            for name, info in header.items()}


def _as_float32(buf: bytearray, dtype: str) -> np.ndarray:
    """float32 values of ``buf``'s little-endian ``dtype`` elements (a view of ``buf`` for F32)."""
    if dtype == "BF16":
        return (np.frombuffer(buf, "<u2").astype(np.uint32) << 16).view(np.float32)  # bf16: a float32's top half
    if dtype == "F16":
        return half_to_float32(np.frombuffer(buf, "<f2"))
    return np.frombuffer(buf, np.dtype(_NP_FLOAT[dtype]).newbyteorder("<")).astype(np.float32, copy=False)


def _read_each(path: Path, header: dict[str, dict[str, Any]], data_start: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        for name, info in header.items():
            dtype = info["dtype"]
            if dtype not in FLOAT_DTYPES:
                raise _bad(path, "weights.dtype", f"tensor {name!r} has dtype {dtype}; LoRA weights must be one "
                           f"of {list(FLOAT_DTYPES)}", value=dtype)
            begin, end = info["data_offsets"]
            f.seek(data_start + begin)
            buf = bytearray(end - begin)  # writable, as the packed read's
            if f.readinto(buf) != end - begin:
                raise _bad(path, "weights", f"tensor {name!r}: file ended inside its data (truncated while read)")
            arr = _as_float32(buf, dtype).reshape(info["shape"])
            if not np.isfinite(arr).all():
                raise _bad(path, "weights", f"tensor {name!r} holds {int(np.count_nonzero(~np.isfinite(arr)))} "
                           "NaN or infinite values", value=name)
            out[name] = arr
    return out


def _short(value: Any, limit: int = 60) -> str:
    """A shape or offsets value for an error: shown when it is a list of numbers, else only its type."""
    if isinstance(value, list) and all(isinstance(v, int | float) for v in value):
        text = repr(value)
        return text if len(text) <= limit else text[:limit] + "..."
    return f"a JSON {type(value).__name__}"


_SAFE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def _label(value: Any, fallback: str) -> str:
    """A header string shown in an error only when it is a short identifier (never arbitrary file text)."""
    if isinstance(value, str) and 0 < len(value) <= 128 and set(value) <= _SAFE_CHARS:
        return value
    return fallback
