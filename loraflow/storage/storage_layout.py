"""Where pushed data lives in the store, and the checks every pushed file list passes (client and server).

Layout (beside the trainer's adapters/ and the compiler's artifacts/, which it never touches):

* ``uploads/blobs/sha256/<hex>``: the bytes of one uploaded file, named by their sha256, so the same
  bytes are stored once; a blob is staging, removed once a directory made from it is published and no
  other caller's push still holds it;
* ``uploads/claims/sha256/<hex>/<owner>``: one empty object per caller that uploaded those bytes (owner
  is a digest of the caller's name, or of its connection when the server has no tokens). A caller commits
  only blobs it holds a claim on — it proved it has the bytes — and a commit drops only its own claim, so
  nobody can publish, or delete, another caller's pending upload by knowing its sha256;
* ``uploads/<kind>s/<name>/<digest16>``: a published directory (``.manifest.json`` written last), the
  digest being that of its file list, so the same files always publish to the same key.

Paths inside a pushed directory are confined: relative, '/'-separated, at most 1024 bytes (UTF-8), each
segment at most 255 bytes (a file name any filesystem can hold), no '.', '..' or empty segment, only
printable characters (no NUL, DEL, C0/C1 control, line or paragraph separator, bidirectional or other
format character), no backslash, never the store's own manifest name.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from loraflow.errors import InvalidArgument
from loraflow.options.names import MAX_NAME_LEN, validate_name
from loraflow.storage.store import MANIFEST_NAME, join_key, validate_key

UPLOADS_PREFIX = "uploads"
BLOBS_PREFIX = f"{UPLOADS_PREFIX}/blobs/sha256"
CLAIMS_PREFIX = f"{UPLOADS_PREFIX}/claims/sha256"
MAX_CHUNK_BYTES = 1 << 20  # one Upload/Download message: well under the servers' 64 MiB message cap
MAX_PATH_BYTES = 1024  # UTF-8: a staging path stays far under PATH_MAX whatever the scratch directory
MAX_SEGMENT_BYTES = 255  # NAME_MAX of ext4, XFS, APFS, NTFS: a longer name cannot be written anywhere
_SHA256 = re.compile(r"[0-9a-f]{64}")


class DataKind(enum.StrEnum):
    """What a pushed directory holds; the value is the CLI noun (`loraflow models push`)."""

    MODEL = "model"
    ADAPTER = "adapter"
    DATASET = "dataset"

    @property
    def prefix(self) -> str:
        return f"{UPLOADS_PREFIX}/{self.value}s"

    @property
    def push_command(self) -> str:
        return f"loraflow {self.value}s push"


def parse_kind(value: str, field: str = "kind") -> DataKind:
    try:
        return DataKind(value)
    except ValueError:
        raise InvalidArgument(f"{field} must be one of {[k.value for k in DataKind]}, got {value!r}",
                              field=field, value=value) from None


@dataclass(frozen=True)
class Entry:
    """One file of a pushed directory."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class StorageLimits:
    """Bounds of one push: a single file, the number of files, the whole directory (bytes)."""

    max_file_bytes: int = 64 << 30
    max_files: int = 10_000  # also what the store's publish walk accepts (safe_files.MAX_TREE_ENTRIES)
    max_total_bytes: int = 256 << 30

    def __post_init__(self) -> None:
        for field in ("max_file_bytes", "max_files", "max_total_bytes"):
            if getattr(self, field) <= 0:
                raise InvalidArgument(f"{field} must be > 0, got {getattr(self, field)}", field=field,
                                      value=getattr(self, field))


def check_sha256(value: str, field: str) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise InvalidArgument(f"{field} must be 64 lowercase hex characters, got {str(value)[:80]!r}",
                              field=field, value=value)
    return value


def check_path(value: str, field: str) -> str:
    """A confined relative file path (see the module docstring); InvalidArgument naming field and value."""
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{field} must not be empty", field=field, value=value)
    try:
        encoded = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate
        raise InvalidArgument(f"{field} is not valid Unicode text", field=field, value=ascii(value)[:80]) from None
    if encoded > MAX_PATH_BYTES:
        raise InvalidArgument(f"{field} must be at most {MAX_PATH_BYTES} bytes (UTF-8), got {encoded}",
                              field=field, value=value)
    bad = next((i for i, c in enumerate(value) if not c.isprintable()), None)
    if bad is not None:
        raise InvalidArgument(f"{field} may hold only printable characters; U+{ord(value[bad]):04X} at position "
                              f"{bad} is not", field=field, value=ascii(value)[:200])
    if value.startswith("/") or value.endswith("/"):
        raise InvalidArgument(f"{field} must be a relative file path, got {value!r}", field=field, value=value)
    for segment in value.split("/"):
        size = len(segment.encode("utf-8"))
        if size > MAX_SEGMENT_BYTES:
            raise InvalidArgument(f"{field} has a segment of {size} bytes; a file or directory name may be at most "
                                  f"{MAX_SEGMENT_BYTES} bytes (UTF-8)", field=field, value=segment[:64] + "...")
    validate_key(value, field=field)  # '..', '.', empty segments, NUL, backslash
    if value.split("/")[-1] == MANIFEST_NAME:
        raise InvalidArgument(f"{field} must not be the store's own {MANIFEST_NAME}", field=field, value=value)
    return value


def check_size(value: int, field: str, limits: StorageLimits) -> int:
    if not 0 <= value <= limits.max_file_bytes:
        raise InvalidArgument(f"{field} must be in 0..{limits.max_file_bytes} (the largest file this server "
                              f"accepts), got {value}", field=field, value=value)
    return value


def check_entries(entries: Iterable[Entry], limits: StorageLimits, field: str = "files") -> list[Entry]:
    """The directory's files, sorted by path: each confined and bounded, no duplicate, no file that is also
    a directory of another, at most max_files and max_total_bytes in all."""
    out: list[Entry] = []
    total = 0
    for i, entry in enumerate(entries):
        if i >= limits.max_files:
            raise InvalidArgument(f"{field} has more than {limits.max_files} files, the most one push may hold",
                                  field=field, value=f"> {limits.max_files} files")
        where = f"{field}[{i}]"
        out.append(Entry(check_path(entry.path, f"{where}.path"), check_size(entry.size, f"{where}.size", limits),
                         check_sha256(entry.sha256, f"{where}.sha256")))
        total += entry.size
        if total > limits.max_total_bytes:
            raise InvalidArgument(f"{field} hold more than {limits.max_total_bytes} bytes, the most one push may "
                                  "hold", field=field, value=f"> {limits.max_total_bytes} bytes")
    if not out:
        raise InvalidArgument(f"{field} must list at least one file", field=field, value="[]")
    out.sort(key=lambda e: e.path)
    paths = {e.path for e in out}
    if len(paths) != len(out):
        dup = next(p for p in paths if sum(e.path == p for e in out) > 1)
        raise InvalidArgument(f"{field} lists {dup!r} twice", field=field, value=dup)
    for e in out:
        parts = e.path.split("/")
        for n in range(1, len(parts)):
            parent = "/".join(parts[:n])
            if parent in paths:
                raise InvalidArgument(f"{field}: {parent!r} is both a file and the directory of {e.path!r}",
                                      field=field, value=parent)
    return out


def check_name(value: str, field: str = "name") -> str:
    return validate_name(field, value)


def name_from_path(basename: str, kind: DataKind) -> str:
    """A publishable name from a file or directory name: invalid characters become '-'."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", basename).strip("-.")
    name = re.sub(r"\.{2,}", ".", name)[:MAX_NAME_LEN].strip("-.")
    return name or kind.value


def blob_key(sha256: str) -> str:
    return join_key(BLOBS_PREFIX, check_sha256(sha256, "sha256"))


def owner_id(identity: str) -> str:
    """The claim name of a caller: a digest, so no caller name or address is written into the store."""
    return hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def claims_prefix(sha256: str) -> str:
    return join_key(CLAIMS_PREFIX, check_sha256(sha256, "sha256"))


def claim_key(sha256: str, owner: str) -> str:
    return join_key(claims_prefix(sha256), owner)


def files_digest(entries: Iterable[Entry]) -> str:
    """sha256 of the sorted file list (path, size, sha256): the identity of a pushed directory."""
    h = hashlib.sha256()
    for e in sorted(entries, key=lambda e: e.path):
        h.update(f"{e.path}\0{e.size}\0{e.sha256}\n".encode())
    return h.hexdigest()


def directory_key(kind: DataKind, name: str, entries: Iterable[Entry]) -> str:
    return join_key(kind.prefix, check_name(name), files_digest(entries)[:16])


def manifest_entries(manifest: dict) -> list[Entry]:
    """The files of a store manifest (loraflow.storage.store format) as Entries, sorted by path."""
    return sorted((Entry(rel, int(info["size"]), str(info["sha256"])) for rel, info in manifest["files"].items()),
                  key=lambda e: e.path)
