"""The request and connection limits of every listener, each declared once: name, default, bounds, help.

A limit's flag and environment variable come from its name (``max_request_bytes`` is
``--max-request-bytes`` / ``LORAFLOW_MAX_REQUEST_BYTES``); flags win over the environment. Every
``__main__`` gets them through ``add_security_arguments`` and ``SecuritySettings.from_args``, so the
gRPC servers of all three services, the inference HTTP API and the metrics/health listeners read one
frozen, validated ``ServerLimits``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loraflow.errors import InvalidArgument
from loraflow.options.settings import ENV_PREFIX, Setting, declare
from loraflow.storage.storage_layout import MAX_CHUNK_BYTES

KiB, MiB = 1 << 10, 1 << 20
# An Upload message is a chunk plus its field tag and length (a few bytes), or a header (path, size, sha256).
_UPLOAD_FRAMING_BYTES = 4 * KiB


@dataclass(frozen=True)
class LimitSpec:
    """How one limit is bounded and explained; ``kind`` is int (counts, bytes) or float (seconds)."""

    low: float
    high: float
    help: str
    kind: type = int


def _limit(default: float, low: float, high: float, help: str) -> Any:
    kind = float if isinstance(default, float) else int
    return dataclasses.field(default=default, metadata={"spec": LimitSpec(low, high, help, kind)})


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


@dataclass(frozen=True)
class ServerLimits:
    """Request sizes, timeouts and connection caps of one process's listeners (see each field's help)."""

    # -- request sizes (gRPC messages and HTTP bodies) --
    max_request_bytes: int = _limit(
        MiB, 4 * KiB, 64 * MiB,
        "largest request of any RPC without a limit of its own below, and largest body of the inference HTTP "
        "API: one message is read and parsed before anything else can bound it")
    max_upload_message_bytes: int = _limit(
        MiB + _UPLOAD_FRAMING_BYTES, MAX_CHUNK_BYTES + _UPLOAD_FRAMING_BYTES, 64 * MiB,
        f"largest message of a StorageService.Upload stream (a chunk of at most {MAX_CHUNK_BYTES} bytes and "
        "its framing)")
    max_file_list_request_bytes: int = _limit(
        4 * MiB, 64 * KiB, 64 * MiB,
        "largest StorageService.StatDirectory / CommitDirectory request (a pushed directory's file list: "
        "10,000 files of typical paths are about 1.5 MB)")
    # -- gRPC connections --
    grpc_handshake_timeout_s: float = _limit(
        10.0, 1.0, 300.0,
        "seconds a new gRPC connection has to finish its TLS and HTTP/2 handshake before it is closed")
    grpc_max_connection_idle_s: float = _limit(
        300.0, 1.0, 86_400.0, "seconds a gRPC connection may carry no RPC before the server closes it (GOAWAY)")
    grpc_keepalive_s: float = _limit(
        60.0, 1.0, 7_200.0,
        "seconds between the server's HTTP/2 pings on a connection, so a vanished client is noticed and its "
        "streams end")
    grpc_keepalive_timeout_s: float = _limit(
        20.0, 1.0, 600.0, "seconds a ping may go unanswered before the connection is closed")
    grpc_max_streams_per_connection: int = _limit(
        1024, 16, 65_536,
        "RPCs one HTTP/2 connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS; a client queues "
        "beyond it): bounds what one connection can pile onto the server's queues. Keep it at least "
        "--max-concurrent-streams, so one channel can use every stream slot")
    max_streams_per_client: int = _limit(
        0, 0, 4096,
        "streaming RPCs and HTTP generations one client holds at once (its caller name with tokens, else its "
        "address), RESOURCE_EXHAUSTED / 429 beyond, so no tenant takes every --max-concurrent-streams slot; "
        "0 = no cap but that one (set it where several tenants share a server: behind a proxy every caller "
        "without a token has the proxy's address)")
    # -- HTTP listeners (the inference /v1 API; the metrics and health port) --
    http_header_timeout_s: float = _limit(
        10.0, 0.5, 300.0,
        "seconds an HTTP connection has to send a complete request head after it opens or after its previous "
        "response; then it is closed (slow or idle connections cannot hold capacity)")
    http_keepalive_timeout_s: float = _limit(
        5.0, 0.5, 300.0, "seconds an idle keep-alive HTTP connection stays open between requests")
    http_body_timeout_s: float = _limit(
        30.0, 1.0, 600.0, "seconds an HTTP request body may take to arrive (408 beyond)")
    http_max_header_bytes: int = _limit(
        16 * KiB, 1 * KiB, MiB, "largest HTTP request head (request line and headers); beyond it 400")
    http_max_connections: int = _limit(
        1024, 8, 65_536,
        "open connections of the inference HTTP API; at the cap the connection that has waited longest "
        "without a request in progress is closed for a new one (none waiting: the new one is refused)")
    http_max_waiting_connections_per_client: int = _limit(
        32, 2, 65_536,
        "HTTP connections one client address may hold without a request in progress (opening, sending its "
        "request head, or idle between requests); beyond it that client's own longest-waiting one is closed")
    metrics_max_connections: int = _limit(
        32, 4, 1024,
        "open connections of the metrics and health port (/metrics, /healthz, /readyz); each holds a "
        "thread, and at the cap the oldest connection still sending its request is closed")

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            spec: LimitSpec = field.metadata["spec"]
            value = getattr(self, field.name)
            ok_type = isinstance(value, int | float) and not isinstance(value, bool) and \
                (spec.kind is float or isinstance(value, int))
            if not ok_type or not math.isfinite(value) or not spec.low <= value <= spec.high:
                raise InvalidArgument(f"{field.name} ({flag_name(field.name)}) must be in {_show(spec.low, spec)}.."
                                      f"{_show(spec.high, spec)}, got {value!r}", field=field.name, value=value)

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: Mapping[str, str] | None = None) -> ServerLimits:
        """Flags from add_limit_arguments, falling back to LORAFLOW_* environment variables, then defaults."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            spec: LimitSpec = field.metadata["spec"]
            given = getattr(args, field.name, None)
            text = LIMIT_SETTINGS[field.name].raw(env)
            if given is None and text:
                given = _parse(text, spec, f"{env_name(field.name)}")
            if given is not None:
                values[field.name] = given
        return cls(**values)

    def describe(self) -> list[tuple[str, str, str, str]]:
        """(flag, env, value, help) of every limit, for docs and `--help`."""
        return [(flag_name(f.name), env_name(f.name), _show(getattr(self, f.name), f.metadata["spec"]),
                 f.metadata["spec"].help) for f in dataclasses.fields(self)]


def _show(value: float, spec: LimitSpec) -> str:
    return f"{value:g}" if spec.kind is float else str(int(value))


def _parse(text: str, spec: LimitSpec, where: str) -> float:
    try:
        value = spec.kind(text.strip())
    except ValueError:
        raise InvalidArgument(f"{where} must be {'a number' if spec.kind is float else 'an integer'}, got {text!r}",
                              field=where, value=text) from None
    return value


def _declared(field: dataclasses.Field) -> Setting:
    spec: LimitSpec = field.metadata["spec"]
    return declare(Setting(name=field.name, flag=flag_name(field.name), env=env_name(field.name),
                           default=_show(field.default, spec), help=spec.help,
                           parse=lambda text: _parse(text, spec, env_name(field.name))))


# Each limit in the settings registry (loraflow.options.settings): `loraflow settings` lists them with the rest.
LIMIT_SETTINGS = {field.name: _declared(field) for field in dataclasses.fields(ServerLimits)}


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ServerLimits field (default None: the environment, then the declared default)."""
    g = parser.add_argument_group("request and connection limits")
    for field in dataclasses.fields(ServerLimits):
        spec: LimitSpec = field.metadata["spec"]

        def typed(text: str, spec: LimitSpec = spec, name: str = field.name):
            try:
                value = _parse(text, spec, flag_name(name))
            except InvalidArgument as err:
                raise argparse.ArgumentTypeError(err.message) from None
            if not spec.low <= value <= spec.high:
                raise argparse.ArgumentTypeError(f"must be in {_show(spec.low, spec)}..{_show(spec.high, spec)}, "
                                                 f"got {text}")
            return value

        g.add_argument(flag_name(field.name), type=typed, default=None,
                       metavar="SECONDS" if spec.kind is float else "N",
                       help=f"{spec.help} (env {env_name(field.name)}; default {_show(field.default, spec)}, "
                            f"{_show(spec.low, spec)}..{_show(spec.high, spec)})".replace("%", "%%"))
