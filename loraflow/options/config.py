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
from loraflow.options.settings import CACHE_DIR, REDIS_URL, STORE_URL


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
        if REDIS_URL.raw(env):
            values["redis_url"] = REDIS_URL.raw(env)
        if STORE_URL.raw(env):
            values["store_url"] = STORE_URL.raw(env)
        if CACHE_DIR.raw(env):
            values["cache_dir"] = os.path.expanduser(CACHE_DIR.raw(env))
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown Settings fields: {sorted(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


# Redis connections of a server process, sized from its own caps (a pool smaller than the threads that may
# use it at once turns load into UNAVAILABLE for everyone, lease renewals included):
# * the API: one per stream thread (--max-concurrent-streams) and per unary thread, plus REDIS_HEADROOM;
# * the worker: its job loop, the running handler and the distributed-training threads, WORKER_CONNECTIONS;
# * lease renewals: LIVENESS_CONNECTIONS of their own, so no client load and no handler can take them.
REDIS_HEADROOM = 8
WORKER_REDIS_CONNECTIONS = 16
LIVENESS_REDIS_CONNECTIONS = 2
# How long a call waits for a pooled connection before UNAVAILABLE (a sized pool never makes it wait).
REDIS_POOL_WAIT_S = 5.0


def api_redis_connections(max_concurrent_streams: int, unary_threads: int) -> int:
    """Connections an API server needs so every thread it may run at once has one."""
    return max_concurrent_streams + unary_threads + REDIS_HEADROOM


def connect_redis(settings_or_url: Settings | str, *, max_connections: int | None = None,
                  pool_wait_s: float = REDIS_POOL_WAIT_S, **kwargs) -> redis.Redis:
    """A redis client (decode_responses=False: job payloads are bytes-safe JSON) for a Settings or a URL.

    max_connections: a pool of that many connections that makes a caller wait up to `pool_wait_s` for a free
    one (then ConnectionError, i.e. UNAVAILABLE) instead of failing at once; None: redis-py's default pool.
    Raises InvalidArgument when the settings say "embedded": the caller must start EmbeddedRedis first
    and pass its URL.
    """
    url = settings_or_url.redis_url if isinstance(settings_or_url, Settings) else settings_or_url
    if not url:
        raise InvalidArgument("no redis_url set: start loraflow.jobs.embedded_redis.EmbeddedRedis and use its url",
                              field="redis_url", value=url)
    if max_connections is not None and max_connections < 1:
        raise InvalidArgument(f"max_connections must be >= 1, got {max_connections}", field="max_connections",
                              value=max_connections)
    kwargs.setdefault("health_check_interval", 30)
    # Bounded waits, so an unreachable or hung Redis surfaces as an error (UNAVAILABLE), not a hang.
    # socket_timeout stays above the longest blocking read we issue (worker XREADGROUP, 2 s).
    kwargs.setdefault("socket_connect_timeout", 5)
    kwargs.setdefault("socket_timeout", 30)
    kwargs.setdefault("socket_keepalive", True)
    # from_url takes the password (redis://:pw@host) and TLS (rediss://, ssl_* query args) from the URL.
    if max_connections is None:
        return redis.Redis.from_url(url, **kwargs)
    pool = redis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=pool_wait_s,
                                                 **kwargs)
    client = redis.Redis(connection_pool=pool)
    client.auto_close_connection_pool = True
    return client


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
