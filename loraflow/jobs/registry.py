"""The adapter and artifact registry: JSON records in Redis hashes, a sorted set per kind for listing.

Keys: ``loraflow:registry:adapters`` (hash name -> JSON) + ``loraflow:registry:adapters:index`` (zset
name -> create time), the same for ``artifacts``. Writes take ``pipe=`` so a job's result and its
registry entry can land in one transaction (JobContext.succeed(result, commit=...)).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from loraflow.errors import InvalidArgument, NotFound
from loraflow.options.names import validate_name

ADAPTERS_KEY = "loraflow:registry:adapters"
ARTIFACTS_KEY = "loraflow:registry:artifacts"
MAX_PAGE_SIZE = 1000
# Artifact ids are content hashes (sha256 hex = 64 chars, maybe with a short prefix).
MAX_ARTIFACT_ID_LEN = 128


@dataclass(frozen=True)
class AdapterRecord:
    """A trained adapter: plain PEFT directory at `uri`. `lora` holds the LoraConfig fields as a dict."""

    name: str
    uri: str
    base_model: str
    lora: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    create_time: float = field(default_factory=time.time)  # unix seconds
    job_id: str = ""
    digest: str = ""

    def __post_init__(self):
        validate_name("name", self.name)
        if not self.uri:
            raise InvalidArgument("adapter uri must not be empty", field="uri", value=self.uri)


@dataclass(frozen=True)
class ArtifactAdapterRecord:
    slot: int
    name: str
    digest: str = ""
    r: int = 0


@dataclass(frozen=True)
class ArtifactRecord:
    """A compiled artifact; `options` holds the CompileOptions fields as a dict."""

    artifact_id: str
    uri: str
    base_model: str
    adapters: tuple[ArtifactAdapterRecord, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    create_time: float = field(default_factory=time.time)  # unix seconds
    size_bytes: int = 0
    architecture: str = ""

    def __post_init__(self):
        validate_name("artifact_id", self.artifact_id, max_len=MAX_ARTIFACT_ID_LEN)
        if not self.uri:
            raise InvalidArgument("artifact uri must not be empty", field="uri", value=self.uri)
        # Accept dicts (e.g. from JSON) and keep the record hashable-ish and frozen.
        object.__setattr__(self, "adapters", tuple(
            a if isinstance(a, ArtifactAdapterRecord) else ArtifactAdapterRecord(**a) for a in self.adapters))


def _encode_token(score: float, key: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([repr(score), key]).encode()).decode().rstrip("=")


def _decode_token(token: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode((token + "=" * (-len(token) % 4)).encode("ascii"))
        score_text, key = json.loads(raw)
        score = float(score_text)
        if not math.isfinite(score) or not isinstance(key, str):
            raise ValueError(token)
    except (ValueError, TypeError, binascii.Error, UnicodeError):
        raise InvalidArgument(f"page_token is not a token returned by this service: {token[:80]!r}",
                              field="page_token", value=token) from None
    return score, key


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Registry:
    def __init__(self, redis_client: redis.Redis):
        self.redis = redis_client

    # -- adapters --

    def put_adapter(self, record: AdapterRecord, pipe: redis.client.Pipeline | None = None) -> None:
        """Insert or replace; with `pipe` the writes join the caller's transaction."""
        self._put(ADAPTERS_KEY, record.name, asdict(record), record.create_time, pipe)

    def get_adapter(self, name: str) -> AdapterRecord:
        validate_name("name", name)
        return AdapterRecord(**self._get(ADAPTERS_KEY, name, "adapter", "name"))

    def find_adapter(self, name: str) -> AdapterRecord | None:
        try:
            return self.get_adapter(name)
        except NotFound:
            return None

    def list_adapters(self, page_size: int = 50, page_token: str = "") -> tuple[list[AdapterRecord], str]:
        rows, token = self._list(ADAPTERS_KEY, page_size, page_token)
        return [AdapterRecord(**r) for r in rows], token

    def delete_adapter(self, name: str, pipe: redis.client.Pipeline | None = None) -> AdapterRecord:
        """Remove and return the record; NotFound if absent."""
        record = self.get_adapter(name)
        self._delete(ADAPTERS_KEY, name, pipe)
        return record

    # -- artifacts --

    def put_artifact(self, record: ArtifactRecord, pipe: redis.client.Pipeline | None = None) -> None:
        self._put(ARTIFACTS_KEY, record.artifact_id, asdict(record), record.create_time, pipe)

    def get_artifact(self, artifact_id: str) -> ArtifactRecord:
        validate_name("artifact_id", artifact_id, max_len=MAX_ARTIFACT_ID_LEN)
        return ArtifactRecord(**self._get(ARTIFACTS_KEY, artifact_id, "artifact", "artifact_id"))

    def find_artifact(self, artifact_id: str) -> ArtifactRecord | None:
        try:
            return self.get_artifact(artifact_id)
        except NotFound:
            return None

    def list_artifacts(self, page_size: int = 50, page_token: str = "") -> tuple[list[ArtifactRecord], str]:
        rows, token = self._list(ARTIFACTS_KEY, page_size, page_token)
        return [ArtifactRecord(**r) for r in rows], token

    def delete_artifact(self, artifact_id: str, pipe: redis.client.Pipeline | None = None) -> ArtifactRecord:
        record = self.get_artifact(artifact_id)
        self._delete(ARTIFACTS_KEY, artifact_id, pipe)
        return record

    # -- plumbing --

    def _put(self, key: str, member: str, data: dict, score: float, pipe) -> None:
        target = pipe if pipe is not None else self.redis.pipeline()
        target.hset(key, member, json.dumps(data))
        target.zadd(f"{key}:index", {member: score})
        if pipe is None:
            target.execute()

    def _delete(self, key: str, member: str, pipe) -> None:
        target = pipe if pipe is not None else self.redis.pipeline()
        target.hdel(key, member)
        target.zrem(f"{key}:index", member)
        if pipe is None:
            target.execute()

    def _get(self, key: str, member: str, what: str, field_name: str) -> dict:
        raw = self.redis.hget(key, member)
        if raw is None:
            raise NotFound(f"no {what} named {member!r}", field=field_name, value=member)
        return json.loads(raw)

    def _list(self, key: str, page_size: int, page_token: str) -> tuple[list[dict], str]:
        """Newest first; the token is the (score, member) of the last row of the previous page."""
        if not isinstance(page_size, int) or isinstance(page_size, bool) or not 1 <= page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size must be in 1..{MAX_PAGE_SIZE}, got {page_size!r}",
                                  field="page_size", value=page_size)
        cursor = _decode_token(page_token) if page_token else None
        max_score = "+inf" if cursor is None else repr(cursor[0])
        picked: list[tuple[str, float]] = []
        offset = 0
        while len(picked) <= page_size:
            rows = self.redis.zrevrangebyscore(f"{key}:index", max_score, "-inf", start=offset,
                                               num=page_size + 1, withscores=True)
            if not rows:
                break
            offset += len(rows)
            for member, score in rows:
                member = _s(member)
                if cursor is None or (score, member) < cursor:
                    picked.append((member, score))
        more = len(picked) > page_size
        picked = picked[:page_size]
        raws = self.redis.hmget(key, [m for m, _ in picked]) if picked else []
        records = [json.loads(raw) for raw in raws if raw is not None]
        token = _encode_token(picked[-1][1], picked[-1][0]) if more and picked else ""
        return records, token
