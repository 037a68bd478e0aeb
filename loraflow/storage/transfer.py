"""Client side of StorageService: push a local directory or file into a service's store, pull one back.

push: the local tree is walked the way the store publishes (no symlink leading out, no FIFO or device,
see safe_files.check_tree) and hashed; StatDirectory says which bytes the server lacks (nothing, when the
same files were published before); each missing file is streamed in 1 MiB chunks (an UNAVAILABLE call is
retried); CommitDirectory publishes. Interrupted, it is restarted by running it again: files whose bytes
the server already holds are not sent twice.

pull: GetDirectory, then each file is downloaded into a staging directory beside the destination,
checked against the manifest's size and sha256, and the staging directory is renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from loraflow import errors
from loraflow.storage.storage_layout import (
    MAX_CHUNK_BYTES,
    DataKind,
    Entry,
    StorageLimits,
    check_entries,
    check_name,
    check_path,
    name_from_path,
    parse_kind,
)
from loraflow.storage.store import build_manifest, progress_bar, sha256_file
from loraflow.v1 import storage_pb2

_KIND_PROTO = {DataKind.MODEL: storage_pb2.DATA_KIND_MODEL, DataKind.ADAPTER: storage_pb2.DATA_KIND_ADAPTER,
               DataKind.DATASET: storage_pb2.DATA_KIND_DATASET}
# Commits that may find a blob consumed by a concurrent push of the same bytes before giving up.
MAX_COMMIT_ROUNDS = 3


@dataclass(frozen=True)
class PushResult:
    """What a push did; `target` is the URI requests should name (the file, for a one-file dataset)."""

    kind: str
    name: str
    local_path: str
    uri: str
    file_uri: str
    files: int
    total_bytes: int
    uploaded_files: int
    uploaded_bytes: int
    already_published: bool

    @property
    def target(self) -> str:
        return self.file_uri or self.uri


@dataclass(frozen=True)
class PullResult:
    uri: str
    dest: str
    files: int
    total_bytes: int


# A call into the storage stub with the client's credentials and error mapping: (method, request) -> response.
Caller = Callable[[str, object], object]


def _want_progress(progress: bool | None) -> bool:
    return progress if progress is not None else sys.stderr.isatty()


def local_entries(path: Path, kind: DataKind) -> list[Entry]:
    """The files to push: every regular file of a directory (confined), or one file (datasets only)."""
    if path.is_dir():
        manifest = build_manifest(path)
        return sorted((Entry(rel, info["size"], info["sha256"]) for rel, info in manifest["files"].items()),
                      key=lambda e: e.path)
    if path.is_file():
        if kind is not DataKind.DATASET:
            raise errors.InvalidArgument(f"path {str(path)!r} is a file; a {kind.value} is pushed as a directory",
                                         field="path", value=str(path))
        return [Entry(path.name, path.stat().st_size, sha256_file(path))]
    raise errors.InvalidArgument(f"path {str(path)!r} is neither a directory nor a regular file", field="path",
                                 value=str(path))


def _chunks(kind: DataKind, local: Path, entry: Entry, advance: Callable[[int], None]
            ) -> Iterator[storage_pb2.UploadRequest]:
    yield storage_pb2.UploadRequest(header=storage_pb2.UploadHeader(
        kind=_KIND_PROTO[kind], path=entry.path, size=entry.size, sha256=entry.sha256))
    with open(local, "rb") as f:
        for chunk in iter(lambda: f.read(MAX_CHUNK_BYTES), b""):
            yield storage_pb2.UploadRequest(chunk=chunk)
            advance(len(chunk))


def push(call: Caller, upload: Callable[[Iterator[storage_pb2.UploadRequest]], storage_pb2.UploadResponse],
         kind: str | DataKind, path: str | os.PathLike, *, name: str | None = None, progress: bool | None = None,
         retries: int = 3) -> PushResult:
    """Push `path` (see module docstring). `call` runs a unary StorageService method, `upload` the Upload
    stream; both raise loraflow errors."""
    kind = parse_kind(kind) if isinstance(kind, str) else kind
    local = Path(path).expanduser()
    name = check_name(name) if name else name_from_path(Path(os.path.abspath(local)).name, kind)
    entries = check_entries(local_entries(local, kind), StorageLimits(max_file_bytes=1 << 62,
                                                                      max_total_bytes=1 << 62))
    by_sha = {e.sha256: e for e in entries}
    files = [storage_pb2.FileEntry(path=e.path, size=e.size, sha256=e.sha256) for e in entries]
    uploaded_files = uploaded_bytes = 0
    for _round in range(MAX_COMMIT_ROUNDS):
        stat = call("StatDirectory", storage_pb2.StatDirectoryRequest(kind=_KIND_PROTO[kind], name=name, files=files))
        if not stat.published:
            todo = [by_sha[sha] for sha in stat.missing_sha256 if sha in by_sha]
            with progress_bar(_want_progress(progress), sum(e.size for e in todo), f"push {name}") as advance:
                for entry in todo:
                    source = local / entry.path if local.is_dir() else local
                    _upload_one(upload, kind, source, entry, advance, retries)
                    uploaded_files += 1
                    uploaded_bytes += entry.size
        try:
            # Already published with these files: the commit only answers the URIs and writes nothing.
            commit = call("CommitDirectory", storage_pb2.CommitDirectoryRequest(
                kind=_KIND_PROTO[kind], name=name, files=files))
        except errors.FailedPrecondition as exc:
            if exc.reason == "BLOBS_MISSING":
                continue  # a concurrent push of the same bytes consumed a blob: send what is missing again
            raise
        return PushResult(kind.value, name, str(local), commit.uri, commit.file_uri, commit.file_count,
                          commit.total_bytes, uploaded_files, uploaded_bytes, commit.already_published)
    raise errors.Unavailable(f"pushing {str(local)!r}: uploaded files kept disappearing before the commit "
                             f"({MAX_COMMIT_ROUNDS} rounds); retry", field="path", value=str(local))


def _upload_one(upload, kind: DataKind, source: Path, entry: Entry, advance: Callable[[int], None],
                retries: int) -> None:
    for attempt in range(retries + 1):
        try:
            upload(_chunks(kind, source, entry, advance))
            return
        except errors.Unavailable:
            if attempt == retries:
                raise
            time.sleep(min(0.5 * 2 ** attempt, 5.0))


def pull(call: Caller, download: Callable[[storage_pb2.DownloadRequest], Iterator[storage_pb2.DownloadResponse]],
         uri: str, dest: str | os.PathLike, *, progress: bool | None = None) -> PullResult:
    """Download the published directory `uri` into `dest` (which must not exist, or be an empty directory)."""
    dest = Path(dest).expanduser()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise errors.InvalidArgument(f"dest {str(dest)!r} already exists and is not an empty directory",
                                     field="dest", value=str(dest))
    listing = call("GetDirectory", storage_pb2.GetDirectoryRequest(uri=uri))
    # The server's file list is checked like a pushed one: no path may leave dest.
    entries = check_entries(listing.files, StorageLimits(max_file_bytes=1 << 62, max_total_bytes=1 << 62),
                            field="files")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".tmp-pull-{dest.name}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        with progress_bar(_want_progress(progress), sum(e.size for e in entries), f"pull {dest.name}") as advance:
            for entry in entries:
                _download_one(download, uri, entry, staging / check_path(entry.path, "path"), advance)
        if dest.exists():
            dest.rmdir()
        os.replace(staging, dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return PullResult(listing.uri, str(dest), len(entries), sum(e.size for e in entries))


def _download_one(download, uri: str, entry: Entry, target: Path, advance: Callable[[int], None]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    size = 0
    with open(target, "wb") as f:
        for message in download(storage_pb2.DownloadRequest(uri=uri, path=entry.path)):
            if message.WhichOneof("payload") != "chunk":
                continue  # the header repeats what GetDirectory listed
            size += len(message.chunk)
            if size > entry.size:
                break
            h.update(message.chunk)
            f.write(message.chunk)
            advance(len(message.chunk))
    if size != entry.size or h.hexdigest() != entry.sha256:
        raise errors.IntegrityError(f"{uri}/{entry.path}: expected {entry.size} bytes sha256 {entry.sha256}, got "
                                    f"{size} bytes sha256 {h.hexdigest()}", metadata={"path": entry.path})
