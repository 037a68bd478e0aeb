"""gRPC server bootstrap shared by every service: factory, error interceptor, health, reflection, shutdown.

The one interceptor turns a LoraflowError raised by a servicer into a ``google.rpc.Status`` carrying an
``ErrorInfo{reason, domain="loraflow", metadata{field, value}}`` (read it with
``grpc_status.rpc_status.from_call``). Any other exception becomes INTERNAL with a correlation id that
is also logged with the traceback; the traceback never reaches the client.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime

import grpc
import redis
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loraflow.errors import FailedPrecondition, InvalidArgument, LoraflowError
from loraflow.security.auth import Authenticator, AuthInterceptor, current_caller
from loraflow.security.limits import ServerLimits
from loraflow.security.settings import SecuritySettings
from loraflow.security.tls import server_credentials
from loraflow.server.error_status import (  # noqa: F401  (error_info, MAX_TRAILER_BYTES, trailer_bytes: re-exported)
    ERROR_DOMAIN,
    MAX_TRAILER_BYTES,
    error_info,
    error_status,
    status_for,
    trailer_bytes,
)
from loraflow.server.message_limits import MessageLimitInterceptor, transport_limit
from loraflow.server.server_concurrency import (
    ClientStreamInterceptor,
    ConcurrencyInterceptor,
    ServerPools,
    StreamLimiter,
)

log = logging.getLogger(__name__)

# Responses (a Download chunk, a page of jobs) are bounded by the code that builds them; clients accept this much.
MAX_RESPONSE_BYTES = 64 << 20


# -- time conversion --

def to_timestamp(value: datetime | float | None) -> timestamp_pb2.Timestamp | None:
    """A protobuf Timestamp from an aware/naive-UTC datetime or unix seconds; None stays None."""
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        ts.FromDatetime(value)
    else:
        ts.FromNanoseconds(int(round(float(value) * 1e9)))
    return ts


def set_timestamp(field: timestamp_pb2.Timestamp, value: datetime | float | None) -> None:
    """Fill a message's Timestamp field in place (left unset for None)."""
    ts = to_timestamp(value)
    if ts is not None:
        field.CopyFrom(ts)


def from_timestamp(ts: timestamp_pb2.Timestamp) -> datetime | None:
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return None
    return ts.ToDatetime(tzinfo=UTC)


DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_size_from_proto(value: int) -> int:
    """A List RPC's page_size: 0 = the default, else 1..MAX_PAGE_SIZE (INVALID_ARGUMENT otherwise)."""
    if not 0 <= value <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size must be in 0..{MAX_PAGE_SIZE}, got {value}", field="page_size", value=value)
    return value or DEFAULT_PAGE_SIZE


def parse_listen(listen: str, field: str = "listen") -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port); port 0 means "pick a free one"."""
    if not isinstance(listen, str) or ":" not in listen:
        raise InvalidArgument(f"{field} must be HOST:PORT, got {listen!r}", field=field, value=listen)
    host, _, port_text = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise InvalidArgument(f"{field} needs a host (e.g. 0.0.0.0:{port_text}), got {listen!r}", field=field,
                              value=listen)
    try:
        port = int(port_text)
    except ValueError:
        raise InvalidArgument(f"{field} port must be a number, got {port_text!r}", field=field, value=listen) from None
    if not 0 <= port <= 65535:
        raise InvalidArgument(f"{field} port must be in 0..65535, got {port}", field=field, value=listen)
    return host, port


def _already_aborted(context: grpc.ServicerContext) -> bool:
    """True when the servicer called context.abort() itself (grpc raises a bare Exception then)."""
    state = getattr(context, "_state", None)
    if state is not None and getattr(state, "aborted", False):
        return True
    code = context.code() if hasattr(context, "code") else None
    return code is not None and code != grpc.StatusCode.OK


# Redis down or failing over: the client may retry, so UNAVAILABLE rather than INTERNAL.
_REDIS_UNREACHABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def _by_caller() -> str:
    caller = current_caller()
    return f" (caller {caller})" if caller else ""


def _handle(exc: BaseException, context: grpc.ServicerContext, method: str) -> None:
    if isinstance(exc, _REDIS_UNREACHABLE):
        log.warning("%s -> UNAVAILABLE: redis unreachable: %s", method, exc)
        context.abort_with_status(error_status(grpc.StatusCode.UNAVAILABLE, "job store (redis) is unreachable; "
                                               "retry later", "REDIS_UNAVAILABLE"))
    if isinstance(exc, LoraflowError):
        log.info("%s -> %s: %s%s", method, exc.code, exc.message, _by_caller())
        context.abort_with_status(status_for(exc))
    if _already_aborted(context):
        raise exc
    correlation_id = uuid.uuid4().hex[:12]
    log.error("internal error in %s%s [correlation id %s]", method, _by_caller(), correlation_id, exc_info=exc)
    context.abort_with_status(error_status(
        grpc.StatusCode.INTERNAL, f"internal error (correlation id {correlation_id})", "INTERNAL",
        {"correlation_id": correlation_id}))


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps exceptions of unary and streaming handlers to canonical statuses (see module docstring)."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def unary(behavior):
            def wrapped(request_or_iterator, context):
                try:
                    return behavior(request_or_iterator, context)
                except Exception as exc:  # noqa: BLE001 - mapped, never leaked
                    _handle(exc, context, method)
            return wrapped

        def streaming(behavior):
            def wrapped(request_or_iterator, context):
                try:
                    yield from behavior(request_or_iterator, context)
                except Exception as exc:  # noqa: BLE001
                    _handle(exc, context, method)
            return wrapped

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), handler.request_deserializer,
                                                       handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream),
                                                        handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), handler.request_deserializer,
                                                        handler.response_serializer)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream),
                                                         handler.request_deserializer, handler.response_serializer)
        return handler


# -- server --

def channel_options(limits: ServerLimits) -> list[tuple[str, int]]:
    """grpc core's connection settings from the limits (the names are grpc's channel arguments)."""
    ms = lambda seconds: int(seconds * 1000)  # noqa: E731
    return [
        ("grpc.max_receive_message_length", transport_limit(limits)),
        ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
        ("grpc.so_reuseport", 0),
        # A connection that never finishes its TLS/HTTP2 handshake, idles, or stops answering pings is closed.
        ("grpc.server_handshake_timeout_ms", ms(limits.grpc_handshake_timeout_s)),
        ("grpc.max_connection_idle_ms", ms(limits.grpc_max_connection_idle_s)),
        ("grpc.keepalive_time_ms", ms(limits.grpc_keepalive_s)),
        ("grpc.keepalive_timeout_ms", ms(limits.grpc_keepalive_timeout_s)),
        ("grpc.max_concurrent_streams", limits.grpc_max_streams_per_connection),
    ]


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and "localhost"; False for wildcards (0.0.0.0, ::) and every other address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name may resolve anywhere


def check_exposure(host: str, port: int, *, authenticated: bool, security: SecuritySettings,
                   field: str = "listen") -> None:
    """Refuse (FailedPrecondition) a non-loopback address without tokens unless allow_unauthenticated;
    every front door of a service (gRPC, the inference HTTP API) applies this one rule."""
    if is_loopback(host) or authenticated or security.allow_unauthenticated:
        return
    raise FailedPrecondition(
        f"refusing to serve {host}:{port} without authentication: anyone who reaches a non-loopback address "
        f"could call every RPC. Give --auth-tokens-file (env LORAFLOW_AUTH_TOKENS_FILE), listen on 127.0.0.1, "
        f"or pass --allow-unauthenticated (env LORAFLOW_ALLOW_UNAUTHENTICATED=1) if something in front of it "
        f"authenticates callers", field=field, value=f"{host}:{port}", reason="UNAUTHENTICATED_EXPOSURE")


class GrpcServer:
    """A grpc.server with auth, the stream cap, the error interceptor, health (per service name and
    overall "") and reflection.

    service_names: full names (e.g. "loraflow.v1.TrainerService") reported by health and reflection.
    security: tokens (`auth_tokens_file`), TLS/mTLS, `max_concurrent_streams` and `limits` (request sizes
    per method, connection timeouts, streams per connection and per client).
    max_workers: threads for unary RPCs. Streams run on threads of their own (`max_concurrent_streams`
    of them, RESOURCE_EXHAUSTED beyond), health Check on two more and the refusals of unauthenticated
    calls on two more, so no flood of one kind can starve another.
    """

    def __init__(self, listen: str = "127.0.0.1:0", service_names: Sequence[str] = (), *, max_workers: int = 16,
                 interceptors: Iterable[grpc.ServerInterceptor] = (),
                 security: SecuritySettings | None = None):
        self.host, self.requested_port = parse_listen(listen)
        self.security = security or SecuritySettings()
        self.service_names = list(service_names)
        self.limits = self.security.limits
        self.authenticator = Authenticator(self.security.auth_tokens_file) if self.security.auth_tokens_file \
            else None
        self._check_exposure()  # here too, so a process refuses before it starts workers around the server
        self.streams = StreamLimiter(self.security.max_concurrent_streams)
        self._pools = ServerPools(self.security.max_concurrent_streams, max_workers)
        chain: list[grpc.ServerInterceptor] = [ConcurrencyInterceptor(self._pools, self.streams)]
        if self.authenticator is not None:
            chain.append(AuthInterceptor(self.authenticator))
        if self.limits.max_streams_per_client:
            chain.append(ClientStreamInterceptor(self.limits.max_streams_per_client))
        chain.append(MessageLimitInterceptor(self.limits))
        self._server = grpc.server(self._pools.unary, interceptors=[*chain, ErrorInterceptor(), *interceptors],
                                   options=channel_options(self.limits), maximum_concurrent_rpcs=None)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self.port: int | None = None
        self._started = False

    @property
    def server(self) -> grpc.Server:
        return self._server

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def add(self, add_fn: Callable[[object, grpc.Server], None], servicer: object) -> None:
        """add_fn is a generated add_XServicer_to_server."""
        if self._started:
            raise RuntimeError("add services before start()")
        add_fn(servicer, self._server)

    def start(self, *, serving: bool = True) -> int:
        """Bind and start; health is set before the port accepts RPCs (`serving=False` for a server
        that becomes ready later, e.g. inference before a model is loaded).

        Refuses (FailedPrecondition) a non-loopback address without tokens unless allow_unauthenticated."""
        self._check_exposure()
        self._warn_exposure()
        names = [*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self._server)
        bind_host = f"[{self.host}]" if ":" in self.host else self.host
        credentials = server_credentials(self.security)
        if credentials is None:
            self.port = self._server.add_insecure_port(f"{bind_host}:{self.requested_port}")
        else:
            self.port = self._server.add_secure_port(f"{bind_host}:{self.requested_port}", credentials)
        if self.port == 0:
            raise OSError(f"cannot bind {self.host}:{self.requested_port}")
        self.set_serving(serving)
        self._server.start()
        self._started = True
        log.info("gRPC server on %s (%s, %s) serving %s", self.address,
                 "mTLS" if self.security.tls_client_ca else "TLS" if self.security.tls else "plaintext",
                 "token auth" if self.authenticator else "no auth", ", ".join(self.service_names) or "-")
        return self.port

    def _check_exposure(self) -> None:
        check_exposure(self.host, self.requested_port, authenticated=self.authenticator is not None,
                       security=self.security)

    def _warn_exposure(self) -> None:
        if is_loopback(self.host):
            return
        if self.authenticator is None:
            log.warning("serving %s without authentication (--allow-unauthenticated)", self.host)
        elif not self.security.tls:
            log.warning("serving %s with tokens over plaintext: configure --tls-cert/--tls-key so bearer tokens "
                        "cannot be read off the network", self.host)

    @property
    def active_streams(self) -> int:
        """Streaming RPCs being served now (each holds a stream thread)."""
        return self.streams.active

    def reload_auth(self) -> bool:
        """Re-read the tokens file (SIGHUP); False when there is none or it failed to parse (old tokens kept)."""
        return self.authenticator.reload() if self.authenticator is not None else False

    def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ["", *self.service_names]:
            self.health.set(name, status)

    def stop(self, grace: float | None = 10) -> threading.Event:
        """Stop accepting RPCs; in-flight ones get `grace` seconds. Returns the event set when done."""
        self.set_serving(False)
        done = self._server.stop(grace)
        # Free the pools' idle threads once every RPC has ended.
        threading.Thread(target=lambda: (done.wait(), self._pools.shutdown()), name="grpc-pools-shutdown",
                         daemon=True).start()
        return done

    def wait(self, timeout: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout)


def run_until_signal(server: GrpcServer, on_shutdown: Sequence[Callable[[], None]] = (), *, grace: float = 10.0,
                     stop_event: threading.Event | None = None,
                     signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT),
                     not_serving_delay: float = 0.0) -> None:
    """Serve until SIGTERM/SIGINT (or `stop_event`): health NOT_SERVING, stop accepting, let in-flight
    RPCs finish within `grace`, and run the `on_shutdown` callbacks (stop workers) meanwhile.
    With `signals` given and tokens configured, SIGHUP re-reads the tokens file.

    `not_serving_delay` keeps accepting RPCs for that long after health turns NOT_SERVING, so load
    balancers that poll health stop routing here first. Must be called from the main thread when
    `signals` is non-empty.
    """
    stop_event = stop_event or threading.Event()
    previous = {}

    def on_signal(signum, _frame):
        log.info("signal %s: shutting down (grace %.0fs)", signal.Signals(signum).name, grace)
        stop_event.set()

    reload_requested = threading.Event()

    def on_hangup(_signum, _frame):
        reload_requested.set()  # the file is read in the loop below, not inside the signal handler

    for sig in signals:
        previous[sig] = signal.signal(sig, on_signal)
    if signals and server.authenticator is not None:
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hangup)
    try:
        while not stop_event.wait(0.25):
            if reload_requested.is_set():
                reload_requested.clear()
                server.reload_auth()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # a second signal acts as usual (hard stop)
    server.set_serving(False)
    if not_serving_delay > 0:
        time.sleep(not_serving_delay)
    drained = server.stop(grace)
    for callback in on_shutdown:
        try:
            callback()
        except Exception:  # noqa: BLE001 - one failing callback must not skip the others
            log.exception("shutdown callback %r failed", callback)
    drained.wait(grace + 1)
    log.info("server stopped")
