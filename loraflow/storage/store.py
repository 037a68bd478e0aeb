"""Object storage for datasets, adapters, checkpoints and artifacts: a local directory or S3.

Directories are published atomically and verified on read:

* ``publish_dir(key, local_dir)`` writes every file, then ``key/.manifest.json`` (sha256 + size of
  each file) last. A directory without a manifest is invisible (``exists`` is False, ``fetch_dir``
  raises NotFound), so readers never see a half-written directory.
* On a local store the whole directory is staged under a temporary name and renamed into place.
* ``fetch_dir(key, dest)`` checks every file's size and sha256 against the manifest and raises
  IntegrityError on a mismatch.

Keys are '/'-separated relative paths; a key can never escape the store's root (no '..', no
leading '/', no empty or '.' segments).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

from loraflow.errors import IntegrityError, InvalidArgument, NotFound, Unavailable
from loraflow.security.safe_files import MAX_TREE_ENTRIES, check_tree, read_regular_file

MANIFEST_NAME = ".manifest.json"
MANIFEST_VERSION = 1
_STAGING_PREFIX = ".tmp-"
_MAX_KEY_LEN = 1024
_MAX_SEGMENT_BYTES = 255  # NAME_MAX: a longer segment cannot be a file name on a local store
_CHUNK = 1 << 20
# Progress bars appear only for transfers at least this large (and only on a TTY unless asked).
PROGRESS_MIN_BYTES = 64 << 20


# The store's layout, shared by the services, the inference cache and `registry rebuild`: trained adapters
# under adapters/<name>/<job>-a<attempt>, compiled artifacts under artifacts/<artifact_id>.
ADAPTERS_PREFIX = "adapters"
ARTIFACTS_PREFIX = "artifacts"


def adapter_key(name: str, job_id: str, attempt: int) -> str:
    return f"{ADAPTERS_PREFIX}/{name}/{job_id}-a{attempt}"


def artifact_key(artifact_id: str) -> str:
    return f"{ARTIFACTS_PREFIX}/{artifact_id}"


def is_under(key: str | None, prefix: str) -> bool:
    """True when `key` (from ObjectStore.key_of; None = outside the store) lies strictly inside `prefix`."""
    return key is not None and key.startswith(prefix + "/")


def validate_key(key: str, *, field: str = "key", allow_empty: bool = False) -> str:
    """Return the normalised key (no trailing '/'); InvalidArgument if it could escape the root."""
    if not isinstance(key, str):
        raise InvalidArgument(f"{field} must be a string, got {type(key).__name__}", field=field, value=key)
    stripped = key.rstrip("/")
    if not stripped:
        if allow_empty:
            return ""
        raise InvalidArgument(f"{field} must not be empty", field=field, value=key)
    if len(stripped) > _MAX_KEY_LEN:
        raise InvalidArgument(f"{field} must be at most {_MAX_KEY_LEN} characters, got {len(stripped)}",
                              field=field, value=key)
    if stripped.startswith("/") or "\\" in stripped or "\x00" in stripped:
        raise InvalidArgument(f"{field} must be a relative '/'-separated key, got {key!r}", field=field, value=key)
    for part in stripped.split("/"):
        if part in ("", ".", ".."):
            raise InvalidArgument(f"{field} has an empty, '.' or '..' segment: {key!r}", field=field, value=key)
        if part.startswith(_STAGING_PREFIX):
            raise InvalidArgument(f"{field} segments must not start with {_STAGING_PREFIX!r}: {key!r}",
                                  field=field, value=key)
        if any(ord(c) < 32 for c in part):
            raise InvalidArgument(f"{field} contains a control character: {key!r}", field=field, value=key)
        if len(part.encode("utf-8", "surrogatepass")) > _MAX_SEGMENT_BYTES:
            raise InvalidArgument(f"{field} has a segment longer than {_MAX_SEGMENT_BYTES} bytes", field=field,
                                  value=part[:64] + "...")
    return stripped


def _temp_beside(path: Path, tag: str = "") -> Path:
    """A fresh temporary name in `path`'s directory that stays a legal file name (at most 255 bytes) however
    long `path`'s own name is."""
    stem = path.name.encode("utf-8", "surrogatepass")[:160].decode("utf-8", "ignore")
    return path.parent / f"{_STAGING_PREFIX}{tag}{stem}-{uuid.uuid4().hex[:8]}"


def join_key(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def build_manifest(local_dir: str | os.PathLike, *, max_files: int = MAX_TREE_ENTRIES,
                   max_folders: int | None = None) -> dict:
    """Manifest of every regular file under local_dir (relative POSIX paths), ignoring a stale manifest.

    A copy never follows a link out of the directory: a file symlink is published (as the bytes of its
    target) only when the target resolves inside local_dir; a link leading outside, a link to a
    directory, or a FIFO/device refuses the whole directory, naming the file (see safe_files.check_tree).
    At most `max_files` files and `max_folders` folders (default: as many as files), counted apart.
    """
    root = Path(local_dir)
    if not root.is_dir():
        raise InvalidArgument(f"local_dir {str(root)!r} is not a directory", field="local_dir", value=str(root))
    files: dict[str, dict] = {}
    for rel in check_tree(root, field="local_dir", max_entries=max_files, max_folders=max_folders):
        if rel == MANIFEST_NAME:
            continue
        validate_key(rel, field="local_dir file")
        path = root / rel
        files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return {"version": MANIFEST_VERSION, "created": time.time(), "files": files}


def _parse_manifest(raw: bytes, uri: str) -> dict:
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        for rel, info in files.items():
            validate_key(rel, field="manifest file")
            if not isinstance(info.get("sha256"), str) or not isinstance(info.get("size"), int):
                raise ValueError(rel)
    except (ValueError, KeyError, TypeError, AttributeError, InvalidArgument) as exc:
        # The kind of fault only: the manifest's own bytes never travel back in an error.
        raise IntegrityError(f"corrupt manifest at {uri} ({type(exc).__name__})", metadata={"uri": uri}) from exc
    return manifest


def _want_progress(progress: bool | None, total: int) -> bool:
    if progress is not None:
        return progress
    return total >= PROGRESS_MIN_BYTES and sys.stderr.isatty()


@contextmanager
def progress_bar(enabled: bool, total: int, description: str) -> Iterator[Callable[[int], None]]:
    """Yields advance(n_bytes); a rich progress bar on stderr when enabled and there are bytes to move, a no-op
    otherwise (the store's and storage/transfer.py's bars)."""
    if not enabled or total <= 0:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.update(task, advance=n)


class _HashingWriter:
    """Writes to a file while hashing, so a download is verified without reading it twice."""

    def __init__(self, f, advance: Callable[[int], None]):
        self.f, self.advance = f, advance
        self.h = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.h.update(data)
        self.size += len(data)
        self.advance(len(data))
        return self.f.write(data)


def _check(rel: str, info: dict, writer: _HashingWriter, uri: str) -> None:
    if writer.size != info["size"] or writer.h.hexdigest() != info["sha256"]:
        raise IntegrityError(
            f"{uri}/{rel}: expected {info['size']} bytes sha256 {info['sha256']}, "
            f"got {writer.size} bytes sha256 {writer.h.hexdigest()}",
            metadata={"uri": f"{uri}/{rel}"})


class ObjectStore(ABC):
    """One interface over a local directory and S3; see the module docstring for the guarantees."""

    scheme: str = ""

    @abstractmethod
    def uri(self, key: str = "") -> str: ...

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> str: ...

    @abstractmethod
    def get_bytes(self, key: str, *, max_bytes: int | None = None) -> bytes:
        """The object's bytes; InvalidArgument when it is larger than ``max_bytes``."""

    @abstractmethod
    def key_of(self, uri: str) -> str | None:
        """The key of ``uri`` when it lies inside this store (resolved, so no link or '..' leads out), else None."""

    @abstractmethod
    def put_file(self, key: str, local_path: str | os.PathLike) -> str: ...

    @abstractmethod
    def get_file(self, key: str, dest: str | os.PathLike) -> Path: ...

    @abstractmethod
    def _object_exists(self, key: str) -> bool: ...

    @abstractmethod
    def list_modified(self, prefix: str = "") -> list[tuple[str, float]]:
        """(key, last-modified unix time) of every object at or under ``prefix`` (a '/'-separated path
        prefix), sorted by key."""

    def list(self, prefix: str = "") -> list[str]:
        """Every object key at or under ``prefix`` (a '/'-separated path prefix), sorted."""
        return [key for key, _ in self.list_modified(prefix)]

    @abstractmethod
    def delete(self, key_or_prefix: str) -> int:
        """Delete an object or everything under a prefix (a directory's manifest first); returns the count."""

    @abstractmethod
    def publish_dir(self, key: str, local_dir: str | os.PathLike, *, progress: bool | None = None,
                    max_files: int = MAX_TREE_ENTRIES, max_folders: int | None = None) -> str:
        """Publish every file of `local_dir` (at most `max_files` files, `max_folders` folders) under `key`,
        its manifest last."""

    def prune_empty_dirs(self, prefix: str, older_than: float) -> int:
        """Remove directories left empty under `prefix` (a local store only; S3 has none); returns the count."""
        return 0

    @abstractmethod
    def _download_verified(self, key: str, rel: str, info: dict, dest: Path,
                           advance: Callable[[int], None]) -> None: ...

    def exists(self, key: str) -> bool:
        """True for a single object, or for a directory whose manifest exists (published completely)."""
        key = validate_key(key)
        return self._object_exists(join_key(key, MANIFEST_NAME)) or self._object_exists(key)

    def dir_exists(self, key: str) -> bool:
        return self._object_exists(join_key(validate_key(key), MANIFEST_NAME))

    def read_manifest(self, key: str) -> dict:
        """The published manifest of a directory; NotFound when the directory is absent or unpublished."""
        key = validate_key(key)
        try:
            raw = self.get_bytes(join_key(key, MANIFEST_NAME))
        except NotFound:
            raise NotFound(f"no published directory at {self.uri(key)}", field="key", value=key) from None
        return _parse_manifest(raw, self.uri(key))

    def list_dirs(self, prefix: str = "") -> list[str]:
        """Keys of the published directories at or under ``prefix``."""
        suffix = "/" + MANIFEST_NAME
        return sorted(k[: -len(suffix)] for k in self.list(prefix) if k.endswith(suffix))

    def fetch_dir(self, key: str, dest: str | os.PathLike, *, progress: bool | None = None) -> Path:
        """Download a published directory to ``dest`` (replaced atomically), verifying every sha256.

        When ``dest`` already holds the same manifest the download is skipped (a warm cache).
        """
        key = validate_key(key)
        manifest = self.read_manifest(key)
        dest = Path(dest)
        local_manifest = dest / MANIFEST_NAME
        if local_manifest.is_file():
            try:
                if json.loads(local_manifest.read_bytes())["files"] == manifest["files"]:
                    return dest
            except (ValueError, KeyError):
                pass
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = _temp_beside(dest)
        staging.mkdir()
        try:
            total = sum(info["size"] for info in manifest["files"].values())
            with progress_bar(_want_progress(progress, total), total, f"fetch {key}") as advance:
                for rel, info in manifest["files"].items():
                    target = staging / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    self._download_verified(key, rel, info, target, advance)
            (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
            _replace_dir(staging, dest)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return dest


def _replace_dir(src: Path, dest: Path) -> None:
    """Move src to dest; an existing dest is renamed aside first and removed after."""
    aside = None
    if dest.exists():
        aside = _temp_beside(dest, "old-")
        old_manifest = dest / MANIFEST_NAME
        if old_manifest.exists():
            old_manifest.unlink()  # the old copy becomes invisible before it moves
        os.replace(dest, aside)
    os.replace(src, dest)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


class FileStore(ObjectStore):
    """A local directory. Writes go to a temporary name in the same directory and are renamed into place."""

    scheme = "file"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"FileStore({str(self.root)!r})"

    def path(self, key: str) -> Path:
        """Local path of a key (for readers that want a file, e.g. a dataset)."""
        key = validate_key(key, allow_empty=True)
        return self.root / key if key else self.root

    def uri(self, key: str = "") -> str:
        return self.path(key).as_uri()

    def put_bytes(self, key: str, data: bytes) -> str:
        return self._put_stream(key, io.BytesIO(data))

    def put_file(self, key: str, local_path: str | os.PathLike) -> str:
        with open(local_path, "rb") as f:
            return self._put_stream(key, f)

    def _put_stream(self, key: str, src) -> str:
        target = self.path(validate_key(key))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_beside(target)
        try:
            try:
                f = open(tmp, "wb")  # noqa: SIM115 - closed by the with below
            except FileNotFoundError:  # prune_empty_dirs took the directory between mkdir and open
                target.parent.mkdir(parents=True, exist_ok=True)
                f = open(tmp, "wb")  # noqa: SIM115
            with f:
                shutil.copyfileobj(src, f, _CHUNK)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()
        return target.as_uri()

    def get_bytes(self, key: str, *, max_bytes: int | None = None) -> bytes:
        target = self.path(validate_key(key))
        if not target.is_file():
            raise NotFound(f"no object at {target.as_uri()}", field="key", value=key)
        if max_bytes is None:
            return target.read_bytes()
        return read_regular_file(target, field="key", limit=max_bytes, shown=target.as_uri())

    def key_of(self, uri: str) -> str | None:
        if uri.startswith("s3://") or ("://" in uri and not uri.startswith("file://")):
            return None
        local = Path(unquote(urlparse(uri).path)) if uri.startswith("file://") else Path(uri).expanduser()
        if "\x00" in str(local):
            return None
        resolved = Path(os.path.realpath(local))
        try:
            rel = resolved.relative_to(self.root).as_posix()
        except ValueError:
            return None
        if rel in ("", "."):
            return None
        try:
            return validate_key(rel)
        except InvalidArgument:
            return None

    def get_file(self, key: str, dest: str | os.PathLike) -> Path:
        src = self.path(validate_key(key))
        if not src.is_file():
            raise NotFound(f"no object at {src.as_uri()}", field="key", value=key)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_beside(dest)
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        return dest

    def _object_exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def list_modified(self, prefix: str = "") -> list[tuple[str, float]]:
        base = self.path(prefix)
        if base.is_file():
            return [(validate_key(prefix), base.stat().st_mtime)]
        if not base.is_dir():
            return []
        found = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(_STAGING_PREFIX)]
            for name in filenames:
                if name.startswith(_STAGING_PREFIX):
                    continue
                path = Path(dirpath) / name
                try:
                    modified = path.stat().st_mtime
                except FileNotFoundError:  # deleted while we walked
                    continue
                found.append((path.relative_to(self.root).as_posix(), modified))
        return sorted(found)

    def prune_empty_dirs(self, prefix: str, older_than: float) -> int:
        """Remove directories under `prefix` that are empty and were last changed before `older_than` (a unix
        time): the folders objects leave behind once deleted. The prefix itself stays."""
        base = self.path(validate_key(prefix))
        removed = 0
        for dirpath, _dirnames, _filenames in os.walk(base, topdown=False):
            path = Path(dirpath)
            if path == base:
                continue
            try:
                if path.stat().st_mtime < older_than:
                    path.rmdir()  # fails (and is skipped) unless empty
                    removed += 1
            except OSError:
                continue
        return removed

    def delete(self, key_or_prefix: str) -> int:
        target = self.path(validate_key(key_or_prefix))
        if self.key_of(str(target)) is None:
            # A link planted inside the store must not lead a delete outside it.
            raise InvalidArgument(f"{target.as_uri()} resolves outside the store; nothing deleted", field="key",
                                  value=key_or_prefix)
        if target.is_symlink():
            target.unlink()
            return 1
        if target.is_file():
            target.unlink()
            return 1
        if not target.is_dir():
            return 0
        count = sum(len(files) for _, _, files in os.walk(target))
        manifest = target / MANIFEST_NAME
        if manifest.exists():
            manifest.unlink()  # invisible first, then gone
        aside = _temp_beside(target, "del-")
        os.replace(target, aside)
        shutil.rmtree(aside, ignore_errors=True)
        return count

    def publish_dir(self, key: str, local_dir: str | os.PathLike, *, progress: bool | None = None,
                    max_files: int = MAX_TREE_ENTRIES, max_folders: int | None = None) -> str:
        key = validate_key(key)
        manifest = build_manifest(local_dir, max_files=max_files, max_folders=max_folders)
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = _temp_beside(target)
        staging.mkdir()
        try:
            total = sum(info["size"] for info in manifest["files"].values())
            with progress_bar(_want_progress(progress, total), total, f"publish {key}") as advance:
                for rel, info in manifest["files"].items():
                    dst = staging / rel
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(Path(local_dir) / rel, dst)
                    advance(info["size"])
            with open(staging / MANIFEST_NAME, "w") as f:
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            _replace_dir(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return target.as_uri()

    def _download_verified(self, key: str, rel: str, info: dict, dest: Path,
                           advance: Callable[[int], None]) -> None:
        src = self.path(join_key(key, rel))
        try:
            with open(src, "rb") as fin, open(dest, "wb") as fout:
                writer = _HashingWriter(fout, advance)
                shutil.copyfileobj(fin, writer, _CHUNK)
        except FileNotFoundError:
            raise IntegrityError(f"{self.uri(key)}/{rel} is listed in the manifest but missing",
                                 metadata={"uri": f"{self.uri(key)}/{rel}"}) from None
        _check(rel, info, writer, self.uri(key))


class S3Store(ObjectStore):
    """An S3 bucket (or S3-compatible server) under an optional prefix.

    Credentials and endpoint come from the usual AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_DEFAULT_REGION, AWS_ENDPOINT_URL for MinIO/SeaweedFS) unless a boto3 client is given.
    """

    scheme = "s3"

    def __init__(self, bucket: str, prefix: str = "", *, client=None, endpoint_url: str | None = None,
                 create_bucket: bool = True):
        if not bucket or "/" in bucket:
            raise InvalidArgument(f"invalid S3 bucket {bucket!r}", field="bucket", value=bucket)
        self.bucket = bucket
        self.prefix = validate_key(prefix, field="prefix", allow_empty=True)
        self.create_bucket = create_bucket
        self._bucket_checked = False
        if client is None:
            import boto3
            from botocore.config import Config

            endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
            config = Config(s3={"addressing_style": "path"} if endpoint_url else {},
                            retries={"max_attempts": 5, "mode": "standard"})
            client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        self.client = client

    def __repr__(self) -> str:
        return f"S3Store({self.bucket!r}, {self.prefix!r})"

    def _full(self, key: str) -> str:
        return join_key(self.prefix, key)

    def uri(self, key: str = "") -> str:
        key = validate_key(key, allow_empty=True)
        return f"s3://{self.bucket}/{self._full(key)}".rstrip("/")

    @staticmethod
    def _code(exc) -> str:
        return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))

    @contextmanager
    def _errors(self, key: str):
        """botocore errors → loraflow errors (NotFound for a missing key, Unavailable for a dead endpoint)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            code = self._code(exc)
            if code in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(f"no object at {self.uri(key)}", field="key", value=key) from None
            if code == "NoSuchBucket":
                raise NotFound(f"no bucket {self.bucket!r} for {self.uri(key)}", field="key", value=key) from None
            raise Unavailable(f"S3 error on {self.uri(key)}: {code or exc}", metadata={"uri": self.uri(key)}) from exc
        except BotoCoreError as exc:
            raise Unavailable(f"S3 unreachable for {self.uri(key)}: {exc}", metadata={"uri": self.uri(key)}) from exc

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (laptop/MinIO convenience)."""
        from botocore.exceptions import ClientError

        if self._bucket_checked:
            return
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if self._code(exc) not in ("404", "NoSuchBucket", "NotFound") or not self.create_bucket:
                raise Unavailable(f"S3 bucket {self.bucket!r}: {self._code(exc)}") from exc
            try:
                self.client.create_bucket(Bucket=self.bucket)
            except ClientError as exc2:
                if self._code(exc2) == "InvalidBucketName":
                    raise InvalidArgument(f"invalid S3 bucket name {self.bucket!r}", field="bucket",
                                          value=self.bucket) from exc2
                if self._code(exc2) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise Unavailable(f"cannot create S3 bucket {self.bucket!r}: {self._code(exc2)}") from exc2
        self._bucket_checked = True

    def put_bytes(self, key: str, data: bytes) -> str:
        key = validate_key(key)
        self.ensure_bucket()
        with self._errors(key):
            self.client.put_object(Bucket=self.bucket, Key=self._full(key), Body=data)
        return self.uri(key)

    def put_file(self, key: str, local_path: str | os.PathLike) -> str:
        key = validate_key(key)
        self.ensure_bucket()
        with self._errors(key):
            self.client.upload_file(str(local_path), self.bucket, self._full(key))
        return self.uri(key)

    def get_bytes(self, key: str, *, max_bytes: int | None = None) -> bytes:
        key = validate_key(key)
        with self._errors(key):
            obj = self.client.get_object(Bucket=self.bucket, Key=self._full(key))
            size = int(obj.get("ContentLength") or 0)
            if max_bytes is not None and size > max_bytes:
                obj["Body"].close()
                raise InvalidArgument(f"{self.uri(key)} is {size} bytes, more than the {max_bytes}-byte limit",
                                      field="key", value=key)
            data = obj["Body"].read() if max_bytes is None else obj["Body"].read(max_bytes + 1)
        if max_bytes is not None and len(data) > max_bytes:
            raise InvalidArgument(f"{self.uri(key)} is more than the {max_bytes}-byte limit", field="key", value=key)
        return data

    def key_of(self, uri: str) -> str | None:
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or parsed.netloc != self.bucket:
            return None
        try:
            path = validate_key(parsed.path.strip("/"))
        except InvalidArgument:
            return None
        if not self.prefix:
            return path
        return path[len(self.prefix) + 1:] if path.startswith(self.prefix + "/") else None

    def get_file(self, key: str, dest: str | os.PathLike) -> Path:
        key = validate_key(key)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_beside(dest)
        try:
            with self._errors(key):
                self.client.download_file(self.bucket, self._full(key), str(tmp))
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                tmp.unlink()
        return dest

    def _object_exists(self, key: str) -> bool:
        try:
            with self._errors(key):
                self.client.head_object(Bucket=self.bucket, Key=self._full(key))
        except NotFound:
            return False
        return True

    def list_modified(self, prefix: str = "") -> list[tuple[str, float]]:
        prefix = validate_key(prefix, field="prefix", allow_empty=True)
        full = self._full(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        found = []
        # An exact object plus everything under "prefix/" (a path prefix, not a string prefix).
        if prefix:
            try:
                with self._errors(prefix):
                    head = self.client.head_object(Bucket=self.bucket, Key=full)
                found.append((prefix, head["LastModified"].timestamp()))
            except NotFound:
                pass
        with self._errors(prefix):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{full}/" if full else ""):
                found.extend((obj["Key"][strip:], obj["LastModified"].timestamp()) for obj in page.get("Contents", []))
        return sorted(found)

    def delete(self, key_or_prefix: str) -> int:
        key = validate_key(key_or_prefix)
        keys = self.list(key)
        manifest = join_key(key, MANIFEST_NAME)
        # The manifest goes first so the directory is invisible while its blobs are removed.
        ordered = ([manifest] if manifest in keys else []) + [k for k in keys if k != manifest]
        with self._errors(key):
            for i in range(0, len(ordered), 1000):
                batch = [{"Key": self._full(k)} for k in ordered[i: i + 1000]]
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(ordered)

    def publish_dir(self, key: str, local_dir: str | os.PathLike, *, progress: bool | None = None,
                    max_files: int = MAX_TREE_ENTRIES, max_folders: int | None = None) -> str:
        key = validate_key(key)
        manifest = build_manifest(local_dir, max_files=max_files, max_folders=max_folders)
        self.ensure_bucket()
        old = set(self.list(key))
        manifest_key = join_key(key, MANIFEST_NAME)
        with self._errors(key):
            if manifest_key in old:
                # Replacing: hide the old version first so no reader mixes old and new blobs.
                self.client.delete_object(Bucket=self.bucket, Key=self._full(manifest_key))
            total = sum(info["size"] for info in manifest["files"].values())
            with progress_bar(_want_progress(progress, total), total, f"publish {key}") as advance:
                for rel, info in manifest["files"].items():
                    self.client.upload_file(str(Path(local_dir) / rel), self.bucket, self._full(join_key(key, rel)))
                    advance(info["size"])
            self.client.put_object(Bucket=self.bucket, Key=self._full(manifest_key),
                                   Body=json.dumps(manifest, indent=1).encode())
            stale = old - {join_key(key, rel) for rel in manifest["files"]} - {manifest_key}
            for k in sorted(stale):
                self.client.delete_object(Bucket=self.bucket, Key=self._full(k))
        return self.uri(key)

    def _download_verified(self, key: str, rel: str, info: dict, dest: Path,
                           advance: Callable[[int], None]) -> None:
        obj_key = join_key(key, rel)
        try:
            with self._errors(obj_key):
                body = self.client.get_object(Bucket=self.bucket, Key=self._full(obj_key))["Body"]
                with open(dest, "wb") as fout:
                    writer = _HashingWriter(fout, advance)
                    for chunk in iter(lambda: body.read(_CHUNK), b""):
                        writer.write(chunk)
        except NotFound:
            raise IntegrityError(f"{self.uri(obj_key)} is listed in the manifest but missing",
                                 metadata={"uri": self.uri(obj_key)}) from None
        _check(rel, info, writer, self.uri(key))


def open_store(url: str, *, field: str = "store_url") -> ObjectStore:
    """A store for "file:///abs/dir", "s3://bucket/prefix" or a plain local directory path."""
    if not isinstance(url, str) or not url:
        raise InvalidArgument(f"{field} must not be empty", field=field, value=url)
    if url.startswith("s3://"):
        parsed = urlparse(url)
        if not parsed.netloc:
            raise InvalidArgument(f"{field} needs a bucket: {url!r}", field=field, value=url)
        return S3Store(parsed.netloc, validate_key(parsed.path.strip("/"), field=field, allow_empty=True))
    if url.startswith("file://"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise InvalidArgument(f"{field} must be file:///absolute/path, got {url!r}", field=field, value=url)
        return FileStore(unquote(parsed.path))
    if "://" in url:
        raise InvalidArgument(f"{field} must be file://, s3:// or a local path, got {url!r}", field=field, value=url)
    return FileStore(url)


def resolve(uri: str, default_store: ObjectStore | None = None, *, field: str = "uri") -> tuple[ObjectStore, str]:
    """(store, key) for a user-given URI: s3://bucket/key, file:///abs/path or a plain local path.

    A URI inside ``default_store`` resolves to it (so its credentials/config are reused); anything else
    gets a store rooted at the parent (file) or the bucket (s3). Errors name ``field``.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidArgument(f"{field} must not be empty", field=field, value=uri)
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        path = parsed.path.strip("/")
        if not parsed.netloc or not path:
            raise InvalidArgument(f"{field} must be s3://bucket/key, got {uri!r}", field=field, value=uri)
        path = validate_key(path, field=field)
        if isinstance(default_store, S3Store) and default_store.bucket == parsed.netloc:
            p = default_store.prefix
            if not p:
                return default_store, path
            if path.startswith(p + "/"):
                return default_store, path[len(p) + 1:]
        client = default_store.client if isinstance(default_store, S3Store) else None
        return S3Store(parsed.netloc, client=client), path
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise InvalidArgument(f"{field} must be file:///absolute/path, got {uri!r}", field=field, value=uri)
        local = Path(unquote(parsed.path))
    elif "://" in uri:
        raise InvalidArgument(f"{field} must be s3://, file:// or a local path, got {uri!r}", field=field, value=uri)
    else:
        local = Path(uri).expanduser()
    if "\x00" in str(local):
        raise InvalidArgument(f"{field} contains a NUL byte", field=field, value=uri)
    local = local.resolve()
    if isinstance(default_store, FileStore):
        try:
            rel = local.relative_to(default_store.root).as_posix()
        except ValueError:
            rel = None
        if rel and rel != ".":
            return default_store, validate_key(rel, field=field)
    if local.parent == local:
        raise InvalidArgument(f"{field} must name a file or directory, got {uri!r}", field=field, value=uri)
    return FileStore(local.parent), validate_key(local.name, field=field)
