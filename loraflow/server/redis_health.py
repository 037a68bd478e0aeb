"""Readiness from several conditions (Redis reachable, a model loaded, a worker's group ready) in one place.

`ReadinessGate` holds named boolean conditions and calls `on_change(ready)` whenever the conjunction
flips, so a gRPC server's health and a worker's readiness file follow Redis outages. `RedisMonitor`
pings Redis every `interval` seconds on a daemon thread and feeds the gate's "redis" condition.

`ProcessHealth` (one per process: `HEALTH`) is what the metrics port answers besides /metrics
(`start_metrics_server`): `/readyz` 200 while ready, else 503; `/healthz` 200 while live, else 503.
Live = the work loop has not died and the process has not been unable to work (Redis unreachable, the
consumer group not created) for longer than `liveness_grace` seconds, so a Kubernetes httpGet
liveness probe restarts a worker that cannot work instead of passing while a job stays queued.

The listener is bounded (`BoundedWSGIServer`): a connection has `http_header_timeout_s` to send its
request, at most `metrics_max_connections` are open (each holds a thread), and when they are all taken
the one that has waited longest without sending a complete request is closed for the new one, so slow,
idle or half-open connections cannot keep the probes from answering.
"""

from __future__ import annotations

import logging
import math
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from wsgiref.simple_server import make_server

import redis
from prometheus_client import REGISTRY, CollectorRegistry, Gauge, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

from loraflow.security.limits import ServerLimits
from loraflow.server.server_concurrency import ConnectionTable

log = logging.getLogger(__name__)

# 1 while this process's worker can take jobs (Redis answers, consumer group created), else 0.
WORKER_READY = Gauge("loraflow_worker_ready", "1 while the job worker can take jobs, else 0.", ["queue"])
# 1 while this process's Redis answers the monitor's pings, else 0 (workers and the inference server).
REDIS_UP = Gauge("loraflow_redis_up", "1 while Redis answers this process's health pings, else 0.")
# What /readyz and /healthz answer, as gauges for dashboards and alerts.
PROCESS_READY = Gauge("loraflow_process_ready", "1 while /readyz answers 200, else 0.")
PROCESS_LIVE = Gauge("loraflow_process_live", "1 while /healthz answers 200, else 0.")
# Longest --liveness-grace accepted: a day; beyond that the probe would never fire.
MAX_LIVENESS_GRACE_S = 86_400.0
DEFAULT_LIVENESS_GRACE_S = 120.0


def check_liveness_grace(value: float, field: str = "liveness_grace") -> float:
    """Seconds of being unable to work before /healthz fails: 0..MAX_LIVENESS_GRACE_S."""
    from loraflow.errors import InvalidArgument

    if not isinstance(value, int | float) or not math.isfinite(value) or not 0 <= value <= MAX_LIVENESS_GRACE_S:
        raise InvalidArgument(f"{field} must be in 0..{MAX_LIVENESS_GRACE_S:g} seconds, got {value!r}",
                              field=field, value=value)
    return float(value)


class ProcessHealth:
    """Readiness and liveness of this process, for /readyz, /healthz and their gauges.

    `set_ready(ready)` follows the ReadinessGate; `set_working(working)` says whether the process can do
    its work (for a worker: ready; for the inference server: Redis answers); `mark_dead(reason)` when the
    work loop ended for good. Not working for more than `liveness_grace` seconds = not live.
    """

    def __init__(self, liveness_grace: float = DEFAULT_LIVENESS_GRACE_S):
        self._lock = threading.Lock()
        self.liveness_grace = check_liveness_grace(liveness_grace)
        self._ready = False
        self._not_working_since: float | None = None  # None while working
        self._dead: str | None = None
        self._publish()

    def configure(self, liveness_grace: float) -> None:
        with self._lock:
            self.liveness_grace = check_liveness_grace(liveness_grace)
        self._publish()

    def reset(self) -> None:
        """Back to the state of a fresh process (tests that start several services in one process)."""
        with self._lock:
            self._ready, self._not_working_since, self._dead = False, None, None
        self._publish()

    def set_ready(self, ready: bool) -> None:
        with self._lock:
            self._ready = bool(ready)
        self._publish()

    def set_working(self, working: bool) -> None:
        with self._lock:
            if working:
                self._not_working_since = None
            elif self._not_working_since is None:
                self._not_working_since = time.monotonic()
        self._publish()

    def mark_dead(self, reason: str) -> None:
        with self._lock:
            self._dead = reason
            self._ready = False
        self._publish()

    def readiness(self) -> tuple[bool, str]:
        with self._lock:
            if self._dead is not None:
                return False, f"not ready: {self._dead}"
            return self._ready, "ready" if self._ready else "not ready"

    def liveness(self) -> tuple[bool, str]:
        with self._lock:
            if self._dead is not None:
                return False, f"not live: {self._dead}"
            if self._not_working_since is not None:
                down = time.monotonic() - self._not_working_since
                if down >= self.liveness_grace:
                    return False, f"not live: unable to work for {down:.0f}s (grace {self.liveness_grace:g}s)"
            return True, "live"

    def _publish(self) -> None:
        PROCESS_READY.set(1 if self.readiness()[0] else 0)
        PROCESS_LIVE.set(1 if self.liveness()[0] else 0)


HEALTH = ProcessHealth()


def metrics_app(health: ProcessHealth = HEALTH, registry: CollectorRegistry = REGISTRY):
    """WSGI: /healthz and /readyz (200 or 503, a one-line text body), everything else /metrics."""
    metrics = make_wsgi_app(registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path in ("/healthz", "/readyz"):
            ok, text = health.liveness() if path == "/healthz" else health.readiness()
            health._publish()  # the gauges follow the grace running out, not only the flips
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")])
            return [(text + "\n").encode()]
        health._publish()
        return metrics(environ, start_response)

    return app


class _MetricsConnection:
    """One accepted socket of the metrics listener, as the ConnectionTable sees it."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.deadline = deadline  # monotonic time by which its request head must be complete

    def evict(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # its handler thread reads EOF and ends
        except OSError:
            pass

    def fileno(self) -> int:
        return self.sock.fileno()


class _BoundedHandler(_SilentHandler):
    def parse_request(self) -> bool:
        ok = super().parse_request()
        if ok:  # a complete request head: the connection is no longer closed to make room
            self.server.request_head_done(self.request)
        return ok


class BoundedWSGIServer(ThreadingWSGIServer):
    """prometheus_client's thread-per-connection server with a request-head deadline and a ConnectionTable
    (see the module docstring)."""

    # socketserver's default backlog is 5: a burst of connections fills it and a probe's SYN is dropped and
    # retried a second or more later, whatever the table does. The kernel caps it at somaxconn.
    request_queue_size = 1024
    # How long a new connection waits for the thread of the connection closed to make room for it to end.
    THREAD_WAIT_S = 2.0

    def __init__(self, address, handler_class, *, limits: ServerLimits):
        self.limits = limits
        self.table = ConnectionTable(limits.metrics_max_connections, limits.http_max_waiting_connections_per_client)
        # The table forgets an evicted connection at once, but its handler thread takes a moment to read EOF
        # and end: the threads themselves are counted here, so there are never more than the cap.
        self._handler_slots = threading.BoundedSemaphore(limits.metrics_max_connections)
        self._connections: dict[socket.socket, _MetricsConnection] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()
        super().__init__(address, handler_class)
        threading.Thread(target=self._reap, name="metrics-http-deadlines", daemon=True).start()

    def process_request(self, request, client_address) -> None:
        conn = _MetricsConnection(request, time.monotonic() + self.limits.http_header_timeout_s)
        if not self.table.opened(conn, client_address[0]):
            log.warning("metrics port: connection from %s refused, all %d connections are busy", client_address[0],
                        self.table.max_connections)
            self.shutdown_request(request)
            return
        with self._lock:
            self._connections[request] = conn
        if not self._handler_slots.acquire(timeout=self.THREAD_WAIT_S):
            log.warning("metrics port: connection from %s refused, no handler thread ended within %gs",
                        client_address[0], self.THREAD_WAIT_S)
            self.shutdown_request(request)
            return
        request.settimeout(self.limits.http_header_timeout_s)  # every read is bounded too
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._handler_slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._handler_slots.release()

    def request_head_done(self, request) -> None:
        with self._lock:
            conn = self._connections.get(request)
        if conn is not None:
            self.table.busy(conn)

    def shutdown_request(self, request) -> None:
        with self._lock:
            conn = self._connections.pop(request, None)
        if conn is not None:
            self.table.closed(conn)
        super().shutdown_request(request)

    def _reap(self) -> None:
        """Close connections still without a complete request head past their deadline (slow drips included)."""
        while not self._closing.wait(0.25):
            now = time.monotonic()
            with self._lock:
                late = [c for c in self._connections.values() if c.deadline < now and self.table.is_waiting(c)]
            for conn in late:
                conn.evict()

    def handle_error(self, request, client_address) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # a read timed out, the client went away, or it was closed for room
            log.debug("metrics port: connection from %s ended: %s", client_address[0], error)
            return
        super().handle_error(request, client_address)

    def server_close(self) -> None:
        self._closing.set()
        super().server_close()


def start_metrics_server(port: int, addr: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY,
                         health: ProcessHealth = HEALTH, limits: ServerLimits | None = None):
    """/metrics, /healthz and /readyz on one port, in a daemon thread; returns (server, thread).

    The same exposure as prometheus_client's start_http_server (loopback unless --metrics-host says
    otherwise); the probes reveal one word of state and take no input. Connections are bounded by
    `limits` (the process's ServerLimits; defaults when None)."""
    limits = limits or ServerLimits()
    httpd = make_server(addr, port, metrics_app(health, registry),
                        lambda address, handler: BoundedWSGIServer(address, handler, limits=limits),
                        handler_class=_BoundedHandler)
    thread = threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return httpd, thread


class ReadinessGate:
    """ready = every condition True. `on_change(ready)` runs on each flip (and once at construction)."""

    def __init__(self, on_change: Callable[[bool], None], **conditions: bool):
        self._on_change = on_change
        self._conditions = dict(conditions)
        self._lock = threading.Lock()
        self._ready = all(self._conditions.values())
        on_change(self._ready)

    @property
    def ready(self) -> bool:
        return self._ready

    def publish(self) -> None:
        """Call on_change with the current state (after a consumer that may have missed a flip starts)."""
        with self._lock:
            self._on_change(self._ready)

    def condition(self, name: str) -> bool:
        return self._conditions[name]

    def set(self, name: str, value: bool) -> None:
        with self._lock:
            self._conditions[name] = bool(value)
            ready = all(self._conditions.values())
            if ready == self._ready:
                return
            self._ready = ready
            # Called under the lock so two flips never reach on_change out of order.
            self._on_change(ready)


class RedisMonitor:
    """Pings Redis every `interval` s and sets `gate`'s `condition`; logs once per outage, not per ping."""

    def __init__(self, client: redis.Redis, gate: ReadinessGate, *, condition: str = "redis",
                 interval: float = 1.0, ping_timeout: float = 1.0,
                 on_result: Callable[[bool], None] | None = None):
        # A client of its own with short timeouts: a hung Redis must not hang the probe.
        kwargs = dict(client.connection_pool.connection_kwargs)
        kwargs.update(socket_timeout=ping_timeout, socket_connect_timeout=ping_timeout, health_check_interval=0)
        self._client = redis.Redis(connection_pool=client.connection_pool.__class__(
            connection_class=client.connection_pool.connection_class, max_connections=2, **kwargs))
        self.gate = gate
        self.condition = condition
        self.on_result = on_result  # every ping's outcome (ProcessHealth.set_working for the inference server)
        self.interval = float(interval)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> bool:
        """One ping; updates the gate and returns whether Redis answered."""
        try:
            ok = bool(self._client.ping())
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            ok = False
            if self.gate.condition(self.condition):
                log.warning("redis unreachable (%s): reporting NOT ready until it answers", exc)
        except redis.RedisError as exc:  # e.g. NOAUTH / LOADING: not usable either
            ok = False
            if self.gate.condition(self.condition):
                log.warning("redis not usable (%s): reporting NOT ready until it answers", exc)
        if ok and not self.gate.condition(self.condition):
            log.info("redis reachable again")
        REDIS_UP.set(1 if ok else 0)
        if self.on_result is not None:
            self.on_result(ok)
        self.gate.set(self.condition, ok)
        return ok

    def start(self) -> RedisMonitor:
        self.check()
        self._thread = threading.Thread(target=self._loop, name="redis-monitor", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.check()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval + 2)
        self._client.close()


class ReadyFile:
    """A file that exists exactly while ready: a Kubernetes exec probe (`test -f PATH`) reads it."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None

    def __call__(self, ready: bool) -> None:
        if self.path is None:
            return
        if ready:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("ready\n")
        else:
            self.path.unlink(missing_ok=True)
