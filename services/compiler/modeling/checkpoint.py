"""A safetensors checkpoint opened for streaming: every shard checked up front, tensors read one at a time.

``Checkpoint.open`` reads only ``model.safetensors.index.json`` and each shard's header (bounded, through
loraflow.artifact.adapter_files' validating parser), so a checkpoint whose shards are missing, truncated or hold a
tensor of an unsupported dtype is an InvalidArgument naming the file before any weight is read.
``Checkpoint.read`` then reads one tensor with a positioned read and converts it to float32: the caller
holds one tensor at a time, never the state dict.

Shard layout (Hugging Face): one ``model.safetensors``, or shards listed by the index's ``weight_map``
(tensor name -> shard file name).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loraflow.artifact.adapter_files import read_header
from loraflow.errors import InvalidArgument
from loraflow.security.safe_files import MAX_CONFIG_BYTES, confined_file, read_regular_file

if TYPE_CHECKING:
    from services.compiler.modeling.buffer_pool import BufferPool

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Source dtypes a base model's weights may have (safetensors name -> torch dtype name); read() returns
# float32 whatever the source.
SUPPORTED_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
MAX_SHARDS = 4096


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: its shard, dtype, shape and absolute byte range in the file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _bad_file(path: Path, why: str) -> InvalidArgument:
    return InvalidArgument(f"base_model {path.name}: {why}", field="base_model", value=str(path),
                           metadata={"file": str(path)})


def weight_files(model_dir: str | Path) -> list[Path]:
    """The shard files a checkpoint names, in a stable order (the index's, or model.safetensors)."""
    model_dir = Path(model_dir)
    if (model_dir / INDEX_FILE).is_file():
        return [model_dir / name for name in sorted(set(_weight_map(model_dir).values()))]
    return [model_dir / SINGLE_FILE]


def _weight_map(model_dir: Path) -> dict[str, str]:
    """tensor -> shard file name from the index: a bounded JSON object of plain file names."""
    path = confined_file(model_dir, INDEX_FILE, field="base_model")
    try:
        index = json.loads(read_regular_file(path, field="base_model", limit=MAX_CONFIG_BYTES * 16))
    except (ValueError, UnicodeDecodeError):
        raise _bad_file(path, "is not valid JSON") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise _bad_file(path, "has no weight_map object")
    shards = set()
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or "/" in shard or "\\" in shard or shard.startswith("."):
            raise _bad_file(path, f"weight_map names shard {shard!r} for {tensor!r}: shards are plain file names "
                            "beside the index")
        shards.add(shard)
    if len(shards) > MAX_SHARDS:
        raise _bad_file(path, f"names {len(shards)} shards, more than the {MAX_SHARDS} allowed")
    return weight_map


class Checkpoint:
    """Validated shards of one checkpoint directory; ``read`` returns one tensor as float32."""

    def __init__(self, model_dir: Path, entries: dict[str, TensorEntry]):
        self.model_dir = model_dir
        self._entries = entries

    @classmethod
    def open(cls, model_dir: str | Path) -> Checkpoint:
        """Check every shard (present, a regular file inside the directory, a well-formed header whose data
        fits the file) and the index against the headers; reads no tensor data."""
        model_dir = Path(model_dir)
        if (model_dir / INDEX_FILE).is_file():
            weight_map = _weight_map(model_dir)
            shards = sorted(set(weight_map.values()))
        elif (model_dir / SINGLE_FILE).exists():
            weight_map, shards = None, [SINGLE_FILE]
        else:
            raise InvalidArgument(f"base_model {model_dir} has no safetensors weights ({SINGLE_FILE} or "
                                  f"{INDEX_FILE})", field="base_model", value=str(model_dir))
        entries: dict[str, TensorEntry] = {}
        for shard in shards:
            path = model_dir / shard
            if not path.exists() and not path.is_symlink():
                named_by = f" (named by {INDEX_FILE})" if weight_map is not None else ""
                raise _bad_file(path, f"is missing{named_by}")
            path = confined_file(model_dir, shard, field="base_model")
            for name, entry in _shard_entries(path).items():
                if weight_map is None or weight_map.get(name) == shard:
                    entries[name] = entry
        if weight_map is not None:
            for name, shard in weight_map.items():
                if name not in entries:
                    raise _bad_file(model_dir / shard, f"lacks tensor {name!r}, which {INDEX_FILE} places there")
        return cls(model_dir, entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def names(self) -> Iterator[str]:
        return iter(self._entries)

    def entry(self, name: str) -> TensorEntry:
        entry = self._entries.get(name)
        if entry is None:
            raise InvalidArgument(f"base_model checkpoint {self.model_dir} lacks weight {name!r}",
                                  field="base_model", value=name)
        return entry

    def check(self, name: str, shape: tuple[int, ...]) -> TensorEntry:
        """The entry of a tensor the model needs: present, of a supported float dtype and of ``shape``."""
        entry = self.entry(name)
        if entry.dtype not in SUPPORTED_DTYPES:
            raise _bad_file(entry.file, f"tensor {name!r} has dtype {entry.dtype}; base model weights must be one of "
                            f"{sorted(SUPPORTED_DTYPES)}")
        if tuple(entry.shape) != tuple(shape):
            raise _bad_file(entry.file, f"tensor {name!r} has shape {list(entry.shape)} but config.json implies "
                            f"{list(shape)}")
        return entry

    def read(self, name: str, buffers: BufferPool | None = None):
        """One tensor as a contiguous float32 torch tensor (its own memory, taken from ``buffers`` where given;
        nothing else is kept)."""
        import torch

        entry = self.entry(name)
        out = buffers.take(entry.shape, torch.float32) if buffers is not None else torch.empty(entry.shape,
                                                                                              dtype=torch.float32)
        return self.read_into(name, out, buffers)

    def source_dtype(self, name: str):
        """The torch dtype tensor ``name`` is stored in (one of SUPPORTED_DTYPES)."""
        import torch

        entry = self.entry(name)
        if entry.dtype not in SUPPORTED_DTYPES:
            raise _bad_file(entry.file, f"tensor {name!r} has dtype {entry.dtype}; base model weights must be one of "
                            f"{sorted(SUPPORTED_DTYPES)}")
        return getattr(torch, SUPPORTED_DTYPES[entry.dtype])

    def read_into(self, name: str, out, buffers: BufferPool | None = None):
        """Read one tensor into ``out`` (its shape; float32, converting from the source dtype on the way, or the
        source's own dtype, read as stored): a packed projection is filled piece by piece without a float32
        copy of each piece. A conversion stages the stored bytes in a buffer of ``buffers`` where given."""
        return self._read_entry_into(name, self.entry(name), out, buffers)

    def read_rows_into(self, name: str, start: int, stop: int, out, buffers: BufferPool | None = None):
        """Rows ``start`` .. ``stop`` of tensor ``name`` (along its first axis) into ``out``, as ``read_into`` reads
        the whole: e.g. an embedding table a block of rows at a time."""
        entry = self.entry(name)
        rows = entry.shape[0] if entry.shape else 0
        if not 0 <= start <= stop <= rows:
            raise InvalidArgument(f"rows {start}..{stop} of tensor {name!r} are outside its {rows} rows",
                                  field="base_model", value=name)
        row_bytes = entry.nbytes // rows if rows else 0
        part = dataclasses.replace(entry, shape=(stop - start, *entry.shape[1:]),
                                   offset=entry.offset + start * row_bytes, nbytes=(stop - start) * row_bytes)
        return self._read_entry_into(name, part, out, buffers)

    def _read_entry_into(self, name: str, entry: TensorEntry, out, buffers: BufferPool | None):
        import numpy as np
        import torch

        dtype = self.source_dtype(name)
        if out.dtype not in (torch.float32, dtype):
            raise InvalidArgument(f"tensor {name!r} is {entry.dtype}: it reads into float32 or {dtype}, not "
                                  f"{out.dtype}", field="base_model", value=name)
        if tuple(out.shape) != tuple(entry.shape):
            raise InvalidArgument(f"tensor {name!r} is {list(entry.shape)}, not {list(out.shape)}",
                                  field="base_model", value=name)
        if entry.nbytes == 0:
            return out
        if out.dtype == dtype and out.is_contiguous():
            target = memoryview(out.view(torch.uint8).numpy()).cast("B")  # straight into the caller's memory
            self._read_bytes(entry, name, target)
            return out
        # np.empty, not bytearray: no zero-fill pass over what the read overwrites (and numpy's huge pages).
        staged = buffers.take((entry.nbytes,), torch.uint8) if buffers is not None else None
        buf = staged.numpy() if staged is not None else np.empty(entry.nbytes, dtype=np.uint8)
        self._read_bytes(entry, name, memoryview(buf))
        out.copy_(torch.from_numpy(buf).view(dtype).view(entry.shape))  # [nbytes] uint8 -> the tensor's shape
        if staged is not None:
            buffers.give_back(staged)
        return out

    @staticmethod
    def _read_bytes(entry: TensorEntry, name: str, target: memoryview) -> None:
        with open(entry.file, "rb", buffering=0) as f:
            f.seek(entry.offset)
            got = 0
            while got < entry.nbytes:  # a raw read may return less than asked
                n = f.readinto(target[got:])
                if not n:
                    break
                got += n
        if got != entry.nbytes:
            raise _bad_file(entry.file, f"ended inside tensor {name!r} (truncated while it was read)")


def _shard_entries(path: Path) -> dict[str, TensorEntry]:
    """TensorEntry per tensor of one shard, from its validated header; errors name the shard."""
    try:
        header, data_start, data_len = read_header(path)
    except InvalidArgument as err:
        why = err.message.split(": ", 1)[-1]
        if err.field == "weights.data_offsets" and "outside" in why:
            why = f"is truncated: {why}"
        raise _bad_file(path, why) from None
    entries = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        entries[name] = TensorEntry(file=path, dtype=info["dtype"], shape=tuple(info["shape"]),
                                    offset=data_start + begin, nbytes=end - begin)
    if data_len and not entries:
        raise _bad_file(path, "holds no tensors")
    return entries


# Bytes per element of the dtypes write_safetensors writes.
_WRITE_SIZES = {"BF16": 2, "F16": 2, "F32": 4}


def write_safetensors(path: Path, tensors: Sequence[tuple[str, tuple[int, ...]]], make: Callable[[str, tuple[int, ...]], bytes],
                      *, dtype: str = "BF16") -> None:
    """A safetensors file whose header is written first and each tensor's bytes as ``make(name, shape)``
    returns them, so writing a model-sized checkpoint holds one tensor at a time (benchmarks, tests)."""
    size = _WRITE_SIZES[dtype]
    header, offset = {}, 0
    for name, shape in tensors:
        n = math.prod(shape) * size
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data region starts 8-aligned
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in tensors:
            data = make(name, shape)
            if len(data) != math.prod(shape) * size:
                raise InvalidArgument(f"tensor {name!r}: {len(data)} bytes for shape {list(shape)} of {dtype}",
                                      field="tensor", value=name)
            f.write(data)
    tmp.replace(path)
