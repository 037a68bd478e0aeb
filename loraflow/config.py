"""Process settings from the environment (LORAFLOW_*) with overrides from flags."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis

from loraflow.errors import InvalidArgument


def _default_home() -> Path:
    return Path(os.path.expanduser("~")) / ".loraflow"


def default_store_url() -> str:
    return (_default_home() / "store").as_uri()


def default_cache_dir() -> str:
    return str(_default_home() / "cache")


def validate_redis_url(url: str, field: str = "redis_url") -> str:
    """A redis://, rediss:// or unix:// URL; the error shows it with its password masked."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        shown = mask_redis_url(url)
        raise InvalidArgument(f"{field} must start with redis://, rediss:// or unix://, got {shown!r}",
                              field=field, value=shown)
    return url


@dataclass(frozen=True)
class Settings:
    """redis_url None means "start an embedded redis-server" (laptop mode)."""

    redis_url: str | None = None
    store_url: str = dataclasses.field(default_factory=default_store_url)
    cache_dir: str = dataclasses.field(default_factory=default_cache_dir)

    def __post_init__(self) -> None:
        if self.redis_url is not None:
            validate_redis_url(self.redis_url)
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
    # Bounded waits, so an unreachable or hung Redis surfaces as an error (UNAVAILABLE), not a hang.
    # socket_timeout stays above the longest blocking read we issue (worker XREADGROUP, 2 s).
    kwargs.setdefault("socket_connect_timeout", 5)
    kwargs.setdefault("socket_timeout", 30)
    kwargs.setdefault("socket_keepalive", True)
    # from_url takes the password (redis://:pw@host) and TLS (rediss://, ssl_* query args) from the URL.
    return redis.Redis.from_url(url, **kwargs)


def mask_redis_url(url: str | None) -> str:
    """The URL with its password replaced by '***' (for logs and tables); other parts kept."""
    if not url:
        return str(url)
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def seconds_arg(text: str, limit: float) -> float:
    """An argparse value of seconds in 0..limit (NaN and inf refused): one rule for every duration flag."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not 0 <= value <= limit:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be in 0..{limit:g}, got {text}")
    return value
