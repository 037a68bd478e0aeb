"""Process settings from the environment (LORAFLOW_*) with overrides from flags."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import redis

from loraflow.errors import InvalidArgument


def _default_home() -> Path:
    return Path(os.path.expanduser("~")) / ".loraflow"


def default_store_url() -> str:
    return (_default_home() / "store").as_uri()


def default_cache_dir() -> str:
    return str(_default_home() / "cache")


@dataclass(frozen=True)
class Settings:
    """redis_url None means "start an embedded redis-server" (laptop mode)."""

    redis_url: str | None = None
    store_url: str = dataclasses.field(default_factory=default_store_url)
    cache_dir: str = dataclasses.field(default_factory=default_cache_dir)

    def __post_init__(self) -> None:
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise InvalidArgument(f"redis_url must start with redis://, rediss:// or unix://, got {self.redis_url!r}",
                                  field="redis_url", value=self.redis_url)
        if not self.store_url:
            raise InvalidArgument("store_url must not be empty", field="store_url", value=self.store_url)
        if "://" in self.store_url and not self.store_url.startswith(("file://", "s3://")):
            raise InvalidArgument(f"store_url must be file://, s3:// or a local path, got {self.store_url!r}",
                                  field="store_url", value=self.store_url)
        if not self.cache_dir:
            raise InvalidArgument("cache_dir must not be empty", field="cache_dir", value=self.cache_dir)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> Settings:
        """Settings from LORAFLOW_REDIS_URL / LORAFLOW_STORE_URL / LORAFLOW_CACHE_DIR; non-None overrides win."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        if env.get("LORAFLOW_REDIS_URL"):
            values["redis_url"] = env["LORAFLOW_REDIS_URL"]
        if env.get("LORAFLOW_STORE_URL"):
            values["store_url"] = env["LORAFLOW_STORE_URL"]
        if env.get("LORAFLOW_CACHE_DIR"):
            values["cache_dir"] = os.path.expanduser(env["LORAFLOW_CACHE_DIR"])
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown Settings fields: {sorted(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def connect_redis(settings_or_url: Settings | str, **kwargs) -> redis.Redis:
    """A redis client (decode_responses=False: job payloads are bytes-safe JSON) for a Settings or a URL.

    Raises InvalidArgument when the settings say "embedded": the caller must start EmbeddedRedis first
    and pass its URL.
    """
    url = settings_or_url.redis_url if isinstance(settings_or_url, Settings) else settings_or_url
    if not url:
        raise InvalidArgument("no redis_url set: start loraflow.embedded_redis.EmbeddedRedis and use its url",
                              field="redis_url", value=url)
    kwargs.setdefault("health_check_interval", 30)
    return redis.Redis.from_url(url, **kwargs)
