"""Where a base model or an adapter directory comes from: a local path, file:// or s3:// URI.

The API processes only read `config.json` (no weights); workers materialise whole directories,
fetching remote ones into the cache (sha256-verified, reused while unchanged).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from loraflow.errors import InvalidArgument, NotFound
from loraflow.store import ObjectStore, resolve

MAX_URI_LEN = 4096


def is_location(spec: str) -> bool:
    """An adapter or model given by path or URI rather than by registered name."""
    return "/" in spec or "://" in spec or spec.startswith("~")


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def local_path(uri: str) -> Path:
    """The filesystem path of a plain path or a file:// URI."""
    return Path(unquote(urlparse(uri).path)) if uri.startswith("file://") else Path(uri).expanduser()


def check_uri(uri: str, field: str) -> str:
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidArgument(f"{field} must not be empty", field=field, value=uri)
    if len(uri) > MAX_URI_LEN:
        raise InvalidArgument(f"{field} is longer than {MAX_URI_LEN} characters", field=field, value=uri[:64] + "…")
    if "://" in uri and not uri.startswith(("file://", "s3://")):
        raise InvalidArgument(f"{field} must be a local path, file:// or s3:// URI, got {uri!r}", field=field,
                              value=uri)
    return uri


def read_json_file(uri: str, name: str, store: ObjectStore, *, field: str) -> dict[str, Any]:
    """`name` (e.g. config.json) inside the directory `uri`; InvalidArgument naming `field` if absent or bad."""
    check_uri(uri, field)
    if is_remote(uri):
        src, key = resolve(uri, store, field=field)
        try:
            raw = src.get_bytes(f"{key}/{name}")
        except NotFound:
            raise InvalidArgument(f"{field} {uri!r} has no {name}", field=field, value=uri) from None
    else:
        path = local_path(uri)
        if not path.is_dir():
            raise InvalidArgument(f"{field} {uri!r} is not a directory", field=field, value=uri)
        if not (path / name).is_file():
            raise InvalidArgument(f"{field} {uri!r} has no {name}", field=field, value=uri)
        raw = (path / name).read_bytes()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"{field} {name} is not valid JSON: {e}", field=field, value=uri) from None
    if not isinstance(data, dict):
        raise InvalidArgument(f"{field} {name} is not a JSON object", field=field, value=uri)
    return data


def materialize(uri: str, store: ObjectStore, cache_dir: str | Path, *, field: str, kind: str) -> Path:
    """A local directory holding `uri`: the path itself, or a verified copy of a remote one in the cache."""
    check_uri(uri, field)
    if not is_remote(uri):
        path = local_path(uri)
        if not path.is_dir():
            raise InvalidArgument(f"{field} {uri!r} is not a directory", field=field, value=uri)
        return path
    src, key = resolve(uri, store, field=field)
    dest = Path(cache_dir) / kind / hashlib.sha256(uri.encode()).hexdigest()[:24]
    return src.fetch_dir(key, dest)
