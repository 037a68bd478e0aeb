"""StorageService: clients push models, adapters and datasets into the store, and pull published directories.

Served beside the API of every queue-backed service (trainer and compiler, see queue_service): those are
the processes clients already talk to, and they hold the store the workers read. The inference service
takes artifacts by id, so it needs no upload path.

Everything is written through ObjectStore, so a local directory and S3 behave alike and any replica
sees what another received:

* Upload streams one file into a temporary file under the work directory, hashing as it goes; only when
  size and sha256 match the header does it become the blob ``uploads/blobs/sha256/<hex>``, and the caller
  gets a claim on it (storage_layout: ``uploads/claims/...``), also when the bytes were already there.
* CommitDirectory takes only blobs the caller holds a claim on (anything else is BLOBS_MISSING: upload
  it), fetches them into a staging directory (verifying each size and sha256 again), publishes it with
  ``ObjectStore.publish_dir`` (manifest last, so ``require_published`` accepts it), then drops its own
  claims and each blob no other caller's push still claims. A commit entry whose size disagrees with the
  blob is INVALID_ARGUMENT naming ``files[i].size``; the blob stays. Nobody removes, or reads through a
  commit, another caller's pending upload by knowing its sha256.

Bounds: chunks of at most 1 MiB, path segments of at most 255 bytes and printable names, files (folders
are not counted), file counts and totals per StorageLimits, free disk checked before a file or a
directory is staged. Errors name the request's field and file path, never the server's scratch paths.
Authentication is the server's interceptor, as for every RPC.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from loraflow.errors import FailedPrecondition, IntegrityError, InvalidArgument, NotFound, ResourceExhausted
from loraflow.options.settings import (
    MAX_UPLOAD_FILE_BYTES,
    MAX_UPLOAD_FILES,
    MAX_UPLOAD_TOTAL_BYTES,
    UPLOAD_BLOB_TTL,
)
from loraflow.security.auth import current_caller
from loraflow.storage.model_source import check_uri, require_published
from loraflow.storage.storage_layout import (
    MAX_CHUNK_BYTES,
    DataKind,
    Entry,
    StorageLimits,
    blob_key,
    check_entries,
    check_name,
    check_path,
    check_sha256,
    check_size,
    claim_key,
    claims_prefix,
    directory_key,
    manifest_entries,
    owner_id,
)
from loraflow.storage.store import FileStore, ObjectStore, join_key, sha256_file
from loraflow.storage.upload_sweeper import (
    DEFAULT_BLOB_TTL_SECONDS,
    check_blob_ttl,
)
from loraflow.v1 import storage_pb2, storage_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = storage_pb2.DESCRIPTOR.services_by_name["StorageService"].full_name
_KINDS = {storage_pb2.DATA_KIND_MODEL: DataKind.MODEL, storage_pb2.DATA_KIND_ADAPTER: DataKind.ADAPTER,
          storage_pb2.DATA_KIND_DATASET: DataKind.DATASET}
# Room left on the work directory's disk beyond what a staged file or directory needs.
DISK_HEADROOM_BYTES = 256 << 20


def kind_from_proto(value: int, field: str = "kind") -> DataKind:
    if value not in _KINDS:
        allowed = [storage_pb2.DataKind.Name(k) for k in _KINDS]
        raise InvalidArgument(f"{field} must be one of {allowed}, got {value}", field=field, value=value)
    return _KINDS[value]


def kind_to_proto(kind: DataKind) -> int:
    return next(k for k, v in _KINDS.items() if v is kind)


def entry_to_proto(entry: Entry) -> storage_pb2.FileEntry:
    return storage_pb2.FileEntry(path=entry.path, size=entry.size, sha256=entry.sha256)


def caller_owner(context) -> str:
    """Whose uploads these are: the authenticated caller's name, else (a server without tokens) the client's
    connection, so one connection's push is its own."""
    caller = current_caller()
    if caller:
        return owner_id(f"caller:{caller}")
    peer = context.peer() if context is not None and hasattr(context, "peer") else ""
    return owner_id(f"peer:{peer}")


class StorageServicer(storage_pb2_grpc.StorageServiceServicer):
    """work_dir: local scratch for uploads in flight and directories being published (the cache dir)."""

    def __init__(self, store: ObjectStore, work_dir: str | os.PathLike, limits: StorageLimits | None = None):
        self.store = store
        self.limits = limits or StorageLimits()
        self.work_dir = Path(work_dir) / "uploads"
        self.work_dir.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- push

    def StatDirectory(self, request, context):
        kind = kind_from_proto(request.kind)
        name = check_name(request.name)
        entries = check_entries(request.files, self.limits)
        key = directory_key(kind, name, entries)
        if self._published_with(key, entries):
            return storage_pb2.StatDirectoryResponse(uri=self.store.uri(key), published=True)
        return storage_pb2.StatDirectoryResponse(uri=self.store.uri(key), published=False,
                                                 missing_sha256=self._missing(entries, caller_owner(context)))

    def Upload(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "header":
            raise InvalidArgument("the first Upload message must carry the header (kind, path, size, sha256)",
                                  field="header", value="missing")
        header = first.header
        kind_from_proto(header.kind, "header.kind")
        path = check_path(header.path, "header.path")
        size = check_size(header.size, "header.size", self.limits)
        sha = check_sha256(header.sha256, "header.sha256")
        self._need_disk(size, f"file {path!r}")
        tmp = self.work_dir / f".part-{uuid.uuid4().hex}"
        h = hashlib.sha256()
        received = 0
        try:
            with open(tmp, "wb") as f:
                for message in request_iterator:
                    if message.WhichOneof("payload") != "chunk":
                        raise InvalidArgument(f"file {path!r}: only the first Upload message may be a header",
                                              field="header", value=path)
                    chunk = message.chunk
                    if len(chunk) > MAX_CHUNK_BYTES:
                        raise InvalidArgument(f"file {path!r}: a chunk of {len(chunk)} bytes is larger than "
                                              f"{MAX_CHUNK_BYTES}", field="chunk", value=len(chunk),
                                              metadata={"path": path})
                    received += len(chunk)
                    if received > size:
                        raise InvalidArgument(f"file {path!r}: more bytes arrived than the header's size {size}",
                                              field="header.size", value=size, metadata={"path": path})
                    h.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            if received != size:
                raise InvalidArgument(f"file {path!r}: {received} bytes arrived, the header said {size}",
                                      field="header.size", value=size, metadata={"path": path})
            if h.hexdigest() != sha:
                raise IntegrityError(f"file {path!r}: the bytes received have sha256 {h.hexdigest()}, the header "
                                     f"says {sha}; nothing was stored", field="header.sha256", value=sha,
                                     metadata={"path": path})
            key = blob_key(sha)
            # The claim first: a concurrent commit of the same bytes by someone else then keeps the blob.
            self.store.put_bytes(claim_key(sha, caller_owner(context)), b"")
            present = self.store.exists(key)
            if not present:
                self.store.put_file(key, tmp)
        finally:
            tmp.unlink(missing_ok=True)
        return storage_pb2.UploadResponse(sha256=sha, size=received, already_present=present)

    def CommitDirectory(self, request, context):
        kind = kind_from_proto(request.kind)
        name = check_name(request.name)
        entries = check_entries(request.files, self.limits)
        key = directory_key(kind, name, entries)
        total = sum(e.size for e in entries)
        if self._published_with(key, entries):
            return self._committed(kind, key, entries, total, already=True)
        owner = caller_owner(context)
        missing = set(self._missing(entries, owner))
        if missing:
            self._blobs_missing([e.path for e in entries if e.sha256 in missing])
        index = {f.path: i for i, f in enumerate(request.files)}
        self._need_disk(total, f"directory {name!r}")
        staging = self.work_dir / f".commit-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            fetched: dict[str, Path] = {}  # sha256 -> its verified copy: each blob is read and hashed once
            for e in entries:
                dest = staging / e.path
                if e.sha256 in fetched:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(fetched[e.sha256], dest)
                else:
                    self._fetch_verified(e, dest)
                    fetched[e.sha256] = dest
                size = dest.stat().st_size
                if size != e.size:
                    # The request is wrong, not the blob: it stays for whoever uploaded it.
                    where = f"files[{index[e.path]}].size"
                    raise InvalidArgument(f"{where} says {e.size} bytes for {e.path!r}, but the uploaded bytes with "
                                          f"sha256 {e.sha256} are {size}", field=where, value=e.size,
                                          metadata={"path": e.path})
            # The staging tree is exactly the checked file list: its own counts bound the walk.
            folders = {e.path.rsplit("/", 1)[0] for e in entries if "/" in e.path}
            folders |= {f.rsplit("/", i)[0] for f in list(folders) for i in range(1, f.count("/") + 1)}
            self.store.publish_dir(key, staging, progress=False, max_files=len(entries), max_folders=len(folders))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        for sha in sorted({e.sha256 for e in entries}):
            self._release(sha, owner)
        log.info("published %s %s: %d files, %d bytes at %s", kind.value, name, len(entries), total,
                 self.store.uri(key))
        return self._committed(kind, key, entries, total, already=False)

    def _fetch_verified(self, e: Entry, dest: Path) -> None:
        try:
            self.store.get_file(blob_key(e.sha256), dest)
        except NotFound:  # swept or consumed since the check above
            self._blobs_missing([e.path])
        if sha256_file(dest) != e.sha256:
            # A blob that rotted in the store (its name is the hash of bytes checked on upload): drop it so the
            # next push sends it again.
            self.store.delete(blob_key(e.sha256))
            raise IntegrityError(f"file {e.path!r}: the stored blob does not match sha256 {e.sha256}; it was "
                                 "removed, push again", field="files", value=e.path)

    def _release(self, sha: str, owner: str) -> None:
        """Drop this caller's claim; the blob goes once no other caller's push holds one."""
        self.store.delete(claim_key(sha, owner))
        if not self.store.list(claims_prefix(sha)):
            self.store.delete(blob_key(sha))

    @staticmethod
    def _blobs_missing(paths: list[str]) -> None:
        shown = ", ".join(repr(p) for p in paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
        raise FailedPrecondition(f"files {shown} were not uploaded by this caller (or were consumed or swept since); "
                                 "upload them, then commit again", field="files", value=paths[0],
                                 reason="BLOBS_MISSING", metadata={"missing_files": str(len(paths))})

    def _committed(self, kind: DataKind, key: str, entries: list[Entry], total: int, *, already: bool):
        file_uri = self.store.uri(join_key(key, entries[0].path)) \
            if kind is DataKind.DATASET and len(entries) == 1 else ""
        return storage_pb2.CommitDirectoryResponse(uri=self.store.uri(key), file_uri=file_uri,
                                                   already_published=already, file_count=len(entries),
                                                   total_bytes=total)

    def _published_with(self, key: str, entries: list[Entry]) -> bool:
        if not self.store.dir_exists(key):
            return False
        return manifest_entries(self.store.read_manifest(key)) == entries

    def _missing(self, entries: list[Entry], owner: str) -> list[str]:
        """sha256s this caller must upload: the blob is absent, or another caller's (no claim of this one)."""
        return sorted(sha for sha in {e.sha256 for e in entries}
                      if not self.store.exists(claim_key(sha, owner)) or not self.store.exists(blob_key(sha)))

    def _need_disk(self, nbytes: int, what: str) -> None:
        free = shutil.disk_usage(self.work_dir).free
        if nbytes + DISK_HEADROOM_BYTES > free:
            raise ResourceExhausted(f"{what} needs {nbytes} bytes of scratch space, this server has {free} free; "
                                    "retry later or push to another replica", reason="SCRATCH_SPACE_FULL",
                                    metadata={"bytes_needed": str(nbytes)})

    # ---------------------------------------------------------------- pull

    def _store_key(self, uri: str) -> str:
        check_uri(uri, "uri")
        key = self.store.key_of(uri)
        if key is None:
            raise InvalidArgument(f"uri {uri!r} is not inside this service's store {self.store.uri()}",
                                  field="uri", value=uri)
        require_published(self.store, key, uri, field="uri")
        return key

    def GetDirectory(self, request, context):
        key = self._store_key(request.uri)
        entries = manifest_entries(self.store.read_manifest(key))
        return storage_pb2.GetDirectoryResponse(uri=self.store.uri(key), files=[entry_to_proto(e) for e in entries],
                                                total_bytes=sum(e.size for e in entries))

    def Download(self, request, context) -> Iterator[storage_pb2.DownloadResponse]:
        key = self._store_key(request.uri)
        path = check_path(request.path, "path")
        entry = next((e for e in manifest_entries(self.store.read_manifest(key)) if e.path == path), None)
        if entry is None:
            raise NotFound(f"{request.uri!r} has no file {path!r}", field="path", value=path)
        yield storage_pb2.DownloadResponse(header=entry_to_proto(entry))
        try:
            local, tmp = self._readable(join_key(key, path), entry.size)
        except (FileNotFoundError, NotFound):
            raise IntegrityError(f"file {path!r} is listed in the manifest of {request.uri!r} but missing",
                                 field="path", value=path) from None
        try:
            h = hashlib.sha256()
            with open(local, "rb") as f:
                for chunk in iter(lambda: f.read(MAX_CHUNK_BYTES), b""):
                    h.update(chunk)
                    yield storage_pb2.DownloadResponse(chunk=chunk)
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        if h.hexdigest() != entry.sha256:
            raise IntegrityError(f"file {path!r} of {request.uri!r} no longer matches its manifest sha256",
                                 field="path", value=path)

    def _readable(self, key: str, size: int) -> tuple[Path, Path | None]:
        """A local file with the object's bytes: the store's own file, or a temporary copy of an S3 object."""
        if isinstance(self.store, FileStore):
            local = self.store.path(key)
            if not local.is_file():
                raise FileNotFoundError(local)
            return local, None
        self._need_disk(size, f"object {key!r}")
        tmp = self.work_dir / f".pull-{uuid.uuid4().hex}"
        return self.store.get_file(key, tmp), tmp


# ------------------------------------------------------------------------------ process wiring

_SIZE = re.compile(r"(\d+)\s*([KMGT]?)(i?B)?", re.IGNORECASE)


def byte_size(text: str) -> int:
    """argparse type: "1073741824", "512M", "64GiB" (binary units) -> bytes > 0."""
    match = _SIZE.fullmatch(str(text).strip())
    if not match or int(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of bytes (e.g. 512M, 64GiB), got {text!r}")
    return int(match.group(1)) << (10 * " KMGT".index((match.group(2) or " ").upper()))


def add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    """Bounds of StorageService pushes (each with its LORAFLOW_* variable)."""
    d = StorageLimits()
    g = parser.add_argument_group("storage (loraflow models/adapters/datasets push)")
    g.add_argument("--max-upload-file-bytes", type=byte_size, metavar="BYTES",
                   default=MAX_UPLOAD_FILE_BYTES.raw() or d.max_file_bytes,
                   help=MAX_UPLOAD_FILE_BYTES.described())
    g.add_argument("--max-upload-files", type=int, metavar="N",
                   default=MAX_UPLOAD_FILES.raw() or d.max_files,
                   help=MAX_UPLOAD_FILES.described())
    g.add_argument("--max-upload-total-bytes", type=byte_size, metavar="BYTES",
                   default=MAX_UPLOAD_TOTAL_BYTES.raw() or d.max_total_bytes,
                   help=MAX_UPLOAD_TOTAL_BYTES.described())
    g.add_argument("--upload-blob-ttl", type=_blob_ttl, metavar="SECONDS",
                   default=UPLOAD_BLOB_TTL.raw() or DEFAULT_BLOB_TTL_SECONDS,
                   help=UPLOAD_BLOB_TTL.described())


def _blob_ttl(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    try:
        return check_blob_ttl(seconds, "--upload-blob-ttl")
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def limits_from_args(args: argparse.Namespace) -> StorageLimits:
    return StorageLimits(max_file_bytes=args.max_upload_file_bytes, max_files=args.max_upload_files,
                         max_total_bytes=args.max_upload_total_bytes)


def add_storage_service(server, store: ObjectStore, work_dir: str | os.PathLike,
                        limits: StorageLimits | None = None) -> StorageServicer:
    """Register StorageService on a GrpcServer (list SERVICE_NAME in its service_names for health)."""
    servicer = StorageServicer(store, work_dir, limits)
    server.add(storage_pb2_grpc.add_StorageServiceServicer_to_server, servicer)
    return servicer
