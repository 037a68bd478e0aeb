"""What a request names — a registered name, a local path, a file:// or an s3:// URI — and whether it may.

One rule for every service (trainer, compiler, inference):

* a *name* has no '/', no '://' and no leading '~' (``is_location`` is False) and is validated by
  loraflow.options.names;
* a *local path* (plain path, ``~``, or ``file://``) is resolved (realpath) and must lie under the store's
  own directory (a file store) or under a root the operator allowed (``--allow-local-paths``);
* an ``s3://`` URI must name the store's own bucket or one in ``--allow-s3-buckets``.

``InputPolicy.check`` applies it (PERMISSION_DENIED otherwise); the API calls it at submit time and the
worker again before it reads, because a job payload in Redis could have been planted. The API processes
only read ``config.json`` (no weights, bounded size); workers materialise whole directories, fetching
remote ones into the cache (sha256-verified) and checking local ones for symlinks that leave them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from loraflow.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from loraflow.options.hf_config import parse_config_bytes
from loraflow.security.local_paths import LocalPathPolicy
from loraflow.security.safe_files import MAX_CONFIG_BYTES, check_tree, confined_file, read_regular_file
from loraflow.storage.store import MANIFEST_NAME, FileStore, ObjectStore, S3Store, resolve

MAX_URI_LEN = 4096


def is_location(spec: str) -> bool:
    """An adapter or model given by path or URI rather than by registered name."""
    return "/" in spec or "://" in spec or spec.startswith("~")


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def local_path(uri: str) -> Path:
    """The filesystem path of a plain path or a file:// URI (not yet resolved or checked)."""
    return Path(unquote(urlparse(uri).path)) if uri.startswith("file://") else Path(uri).expanduser()


def check_uri(uri: str, field: str) -> str:
    """Syntax only: non-empty, bounded, printable, and a path, file:// or s3:// URI."""
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidArgument(f"{field} must not be empty", field=field, value=uri)
    if len(uri) > MAX_URI_LEN:
        raise InvalidArgument(f"{field} is longer than {MAX_URI_LEN} characters", field=field, value=uri[:64] + "…")
    if "\x00" in uri or not uri.isprintable():
        raise InvalidArgument(f"{field} contains control characters", field=field, value=uri)
    if "://" in uri and not uri.startswith(("file://", "s3://")):
        raise InvalidArgument(f"{field} must be a local path, file:// or s3:// URI, got {uri!r}", field=field,
                              value=uri)
    if uri.startswith("file://") and urlparse(uri).netloc not in ("", "localhost"):
        raise InvalidArgument(f"{field} must be file:///absolute/path, got {uri!r}", field=field, value=uri)
    return uri


@dataclass(frozen=True)
class Location:
    """A checked location: ``path`` (resolved) for a local one, ``bucket`` for an s3:// one."""

    spec: str  # as the request gave it
    path: Path | None = None
    bucket: str | None = None

    @property
    def remote(self) -> bool:
        return self.bucket is not None


@dataclass(frozen=True)
class InputPolicy:
    """Where requests may read from besides the store: allowed local roots and extra S3 buckets."""

    local: LocalPathPolicy = dataclass_field(default_factory=LocalPathPolicy)
    s3_buckets: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, security) -> InputPolicy:
        """From SecuritySettings (allow_local_paths, allow_s3_buckets)."""
        return cls(LocalPathPolicy.from_settings(security), tuple(security.allow_s3_buckets))

    def check(self, spec: str, store: ObjectStore, *, field: str) -> Location:
        """The Location of a path or URI this service may read; PermissionDenied (or InvalidArgument) if not."""
        check_uri(spec, field)
        if is_remote(spec):
            bucket = urlparse(spec).netloc
            own = store.bucket if isinstance(store, S3Store) else None
            if bucket != own and bucket not in self.s3_buckets:
                raise PermissionDenied(f"{field} {spec!r}: bucket {bucket!r} is neither the store's own nor in "
                                       "--allow-s3-buckets (env LORAFLOW_ALLOW_S3_BUCKETS)", field=field, value=spec)
            return Location(spec=spec, bucket=bucket)
        policy = self.local.with_roots(store.root) if isinstance(store, FileStore) else self.local
        return Location(spec=spec, path=policy.check(local_path(spec), field=field, given=spec))


def push_command(field: str) -> str:
    """The CLI command that publishes what a request field names (base_model -> `loraflow models push DIR`)."""
    if field.startswith("base_model"):
        return "loraflow models push DIR"
    if field.startswith("adapter"):
        return "loraflow adapters push DIR"
    if field.startswith("dataset"):
        return "loraflow datasets push FILE"
    return "loraflow models push DIR (or adapters push / datasets push)"


def require_published(src: ObjectStore, key: str, uri: str, *, field: str) -> None:
    """A store directory must be published whole (its manifest written last). Files put there some other
    way (boto3, ``aws s3 cp``) are refused here, at submit time, instead of failing later in a worker."""
    if src.dir_exists(key):
        return
    if src.list(key):
        raise FailedPrecondition(
            f"{field} {uri!r} holds files but no {MANIFEST_NAME}, so it is not a published directory (files "
            f"uploaded with boto3 or `aws s3 cp` are not published); upload the local copy with "
            f"`{push_command(field)}` and use the URI it prints (from Python: Client.push, or "
            "loraflow.storage.store.open_store(STORE_URL).publish_dir(KEY, LOCAL_DIR)), which verify and write the "
            "marker last", field=field, value=uri, reason="NOT_PUBLISHED")
    raise NotFound(f"{field} {uri!r}: no published directory there", field=field, value=uri)


def read_json_file(uri: str, name: str, store: ObjectStore, *, field: str,
                   policy: InputPolicy | None = None) -> dict[str, Any]:
    """`name` (e.g. config.json) inside the directory `uri`; InvalidArgument naming `field` if absent or bad."""
    location = (policy or InputPolicy()).check(uri, store, field=field)
    if location.remote:
        src, key = resolve(uri, store, field=field)
        require_published(src, key, uri, field=field)
        try:
            raw = src.get_bytes(f"{key}/{name}", max_bytes=MAX_CONFIG_BYTES)
        except NotFound:
            raise InvalidArgument(f"{field} {uri!r} has no {name}", field=field, value=uri) from None
    else:
        if not location.path.is_dir():
            raise InvalidArgument(f"{field} {uri!r} is not a directory", field=field, value=uri)
        if not (location.path / name).exists():
            raise InvalidArgument(f"{field} {uri!r} has no {name}", field=field, value=uri)
        # The file itself may be a link: it must resolve inside the directory and be a regular file.
        path = confined_file(location.path, name, field=field)
        raw = read_regular_file(path, field=field, limit=MAX_CONFIG_BYTES, shown=f"{uri}/{name}")
    # One JSON object, bounded, no NaN, not nested past reason; errors give a position, never the bytes.
    return parse_config_bytes(raw, field=field, name=name, shown=uri)


def materialize(uri: str, store: ObjectStore, cache_dir: str | Path, *, field: str, kind: str,
                policy: InputPolicy | None = None) -> Path:
    """A local directory holding `uri`: the checked path itself, or a verified copy of a remote one in the cache.

    A local directory is walked first: a symlink leading out of it (or any non-regular file) is refused,
    so nothing read or copied from it can come from elsewhere on the host.
    """
    location = (policy or InputPolicy()).check(uri, store, field=field)
    if not location.remote:
        if not location.path.is_dir():
            raise InvalidArgument(f"{field} {uri!r} is not a directory", field=field, value=uri)
        check_tree(location.path, field=field)
        return location.path
    src, key = resolve(uri, store, field=field)
    require_published(src, key, uri, field=field)
    dest = Path(cache_dir) / kind / hashlib.sha256(uri.encode()).hexdigest()[:24]
    return src.fetch_dir(key, dest)
