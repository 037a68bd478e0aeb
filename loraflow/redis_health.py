"""Readiness from several conditions (Redis reachable, a model loaded, a worker's group ready) in one place.

`ReadinessGate` holds named boolean conditions and calls `on_change(ready)` whenever the conjunction
flips, so a gRPC server's health and a worker's readiness file follow Redis outages. `RedisMonitor`
pings Redis every `interval` seconds on a daemon thread and feeds the gate's "redis" condition.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import redis
from prometheus_client import Gauge

log = logging.getLogger(__name__)

# 1 while this process's worker can take jobs (Redis answers, consumer group created), else 0.
WORKER_READY = Gauge("loraflow_worker_ready", "1 while the job worker can take jobs, else 0.", ["queue"])


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
                 interval: float = 1.0, ping_timeout: float = 1.0):
        # A client of its own with short timeouts: a hung Redis must not hang the probe.
        kwargs = dict(client.connection_pool.connection_kwargs)
        kwargs.update(socket_timeout=ping_timeout, socket_connect_timeout=ping_timeout, health_check_interval=0)
        self._client = redis.Redis(connection_pool=client.connection_pool.__class__(
            connection_class=client.connection_pool.connection_class, max_connections=2, **kwargs))
        self.gate = gate
        self.condition = condition
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
