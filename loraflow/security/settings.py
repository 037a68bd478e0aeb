"""The security flags every service shares, parsed once into a frozen, validated SecuritySettings.

Flags win over environment variables; both are read here and nowhere else, so each `__main__`
calls `add_security_arguments(parser)` and `SecuritySettings.from_args(args)`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from loraflow.errors import InvalidArgument
from loraflow.options.settings import (
    ALLOW_LOCAL_PATHS,
    ALLOW_S3_BUCKETS,
    ALLOW_UNAUTHENTICATED,
    AUTH_TOKENS_FILE,
    MAX_CONCURRENT_STREAMS,
    METRICS_HOST,
    TLS_CERT,
    TLS_CLIENT_CA,
    TLS_KEY,
    Setting,
)
from loraflow.security.limits import ServerLimits, add_limit_arguments

# Streaming RPCs (Generate, GenerateBatch, WatchJob, health Watch, reflection) one server runs at once;
# beyond it a new stream is RESOURCE_EXHAUSTED. Unary RPCs and health checks have threads of their own.
DEFAULT_MAX_CONCURRENT_STREAMS = 128
MAX_CONCURRENT_STREAMS_LIMIT = 4096
DEFAULT_METRICS_HOST = "127.0.0.1"


def _split_list(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    return tuple(part.strip() for part in text.split(",") if part.strip())


@dataclass(frozen=True)
class SecuritySettings:
    """How one service authenticates callers, encrypts its port and confines what requests may name.

    auth_tokens_file: `name:token` lines; None = no authentication (allowed only on loopback unless
        allow_unauthenticated).
    tls_cert / tls_key: serve TLS (both or neither); tls_client_ca: also require client certificates.
    allow_local_paths: directories under which a request may name a local file or directory; empty =
        none (everything travels through the store).
    allow_s3_buckets: buckets besides the store's own that s3:// inputs may come from.
    metrics_host: the address the Prometheus endpoint binds.
    max_concurrent_streams: streaming RPCs served at once before RESOURCE_EXHAUSTED.
    limits: request sizes, timeouts and connection caps of every listener (loraflow.security.limits).
    """

    auth_tokens_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    allow_local_paths: tuple[str, ...] = ()
    allow_s3_buckets: tuple[str, ...] = ()
    allow_unauthenticated: bool = False
    metrics_host: str = DEFAULT_METRICS_HOST
    max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS
    limits: ServerLimits = field(default_factory=ServerLimits)

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            field = "tls_key" if self.tls_cert else "tls_cert"
            raise InvalidArgument("--tls-cert and --tls-key must be given together", field=field,
                                  value=self.tls_cert or self.tls_key)
        if self.tls_client_ca and not self.tls_cert:
            raise InvalidArgument("--tls-client-ca needs --tls-cert and --tls-key (mTLS is TLS plus client "
                                  "certificates)", field="tls_client_ca", value=self.tls_client_ca)
        for field in ("auth_tokens_file", "tls_cert", "tls_key", "tls_client_ca"):
            value = getattr(self, field)
            if value is not None and not Path(value).is_file():
                raise InvalidArgument(f"{field} {value!r} is not a readable file", field=field, value=value)
        for root in self.allow_local_paths:
            if not os.path.isabs(root):
                raise InvalidArgument(f"allow_local_paths entries must be absolute directories, got {root!r}",
                                      field="allow_local_paths", value=root)
        if not 1 <= self.max_concurrent_streams <= MAX_CONCURRENT_STREAMS_LIMIT:
            raise InvalidArgument(f"max_concurrent_streams must be in 1..{MAX_CONCURRENT_STREAMS_LIMIT}, "
                                  f"got {self.max_concurrent_streams}", field="max_concurrent_streams",
                                  value=self.max_concurrent_streams)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: Mapping[str, str] | None = None) -> SecuritySettings:
        """Flags from add_security_arguments, falling back to LORAFLOW_* environment variables."""
        env = os.environ if env is None else env

        def pick(flag_value: str | None, setting: Setting) -> str | None:
            return flag_value or setting.raw(env)

        local = args.allow_local_paths if args.allow_local_paths is not None else ALLOW_LOCAL_PATHS.raw(env)
        return cls(
            auth_tokens_file=pick(args.auth_tokens_file, AUTH_TOKENS_FILE),
            tls_cert=pick(args.tls_cert, TLS_CERT),
            tls_key=pick(args.tls_key, TLS_KEY),
            tls_client_ca=pick(args.tls_client_ca, TLS_CLIENT_CA),
            allow_local_paths=tuple(os.path.abspath(os.path.expanduser(p)) for p in _split_list(local)),
            allow_s3_buckets=_split_list(pick(args.allow_s3_buckets, ALLOW_S3_BUCKETS)),
            allow_unauthenticated=args.allow_unauthenticated or bool(ALLOW_UNAUTHENTICATED.from_env(env)),
            metrics_host=pick(args.metrics_host, METRICS_HOST) or DEFAULT_METRICS_HOST,
            max_concurrent_streams=_streams(args.max_concurrent_streams, MAX_CONCURRENT_STREAMS.raw(env)),
            limits=ServerLimits.from_args(args, env),
        )


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags behind SecuritySettings (each with its LORAFLOW_* environment variable)."""
    g = parser.add_argument_group("security")
    # Help texts and variables: loraflow.options.settings.
    g.add_argument(AUTH_TOKENS_FILE.flag, default=None, metavar="PATH", help=AUTH_TOKENS_FILE.described())
    g.add_argument(ALLOW_UNAUTHENTICATED.flag, action="store_true", help=ALLOW_UNAUTHENTICATED.described())
    g.add_argument(TLS_CERT.flag, default=None, metavar="PEM", help=TLS_CERT.described())
    g.add_argument(TLS_KEY.flag, default=None, metavar="PEM", help=TLS_KEY.described())
    g.add_argument(TLS_CLIENT_CA.flag, default=None, metavar="PEM", help=TLS_CLIENT_CA.described())
    g.add_argument(ALLOW_LOCAL_PATHS.flag, default=None, metavar="DIR[,DIR]", help=ALLOW_LOCAL_PATHS.described())
    g.add_argument(ALLOW_S3_BUCKETS.flag, default=None, metavar="BUCKET[,BUCKET]", help=ALLOW_S3_BUCKETS.described())
    g.add_argument(METRICS_HOST.flag, default=None, help=METRICS_HOST.described())
    g.add_argument(MAX_CONCURRENT_STREAMS.flag, type=int, default=None, help=MAX_CONCURRENT_STREAMS.described())
    add_limit_arguments(parser)


def _streams(flag_value: int | None, env_value: str | None) -> int:
    if flag_value is not None:
        return flag_value
    if env_value:
        try:
            return int(env_value)
        except ValueError:
            raise InvalidArgument(f"LORAFLOW_MAX_CONCURRENT_STREAMS must be an integer, got {env_value!r}",
                                  field="max_concurrent_streams", value=env_value) from None
    return DEFAULT_MAX_CONCURRENT_STREAMS
