"""Adapter records read once, kept locally, dropped the moment Redis says they changed.

A request for an adapter that is not in a slot resolves its registry record (the OpenAI router, the servable
check and the load each asked Redis: three round trips per miss, most of the server's CPU under Zipf traffic
over 1,000 adapters). ``CachedAdapterRecords.find_adapter`` answers from a local copy of each record it
found (unknown names always go to Redis: a name registered a moment ago must resolve), and Redis's server-assisted invalidation keeps the copy exact, with no change to the
writers (the trainer's registrations, ``registry rebuild``):

* one connection subscribes to ``__redis__:invalidate``; another turns on ``CLIENT TRACKING ... REDIRECT
  <subscriber> BCAST PREFIX loraflow:registry:adapters``, so every write to the adapter registry's keys
  (a put, a delete, a FLUSHALL) sends the subscriber a message and the copy is cleared. (redis-py's own
  client-side cache needs Redis >= 7.4; this works from Redis 6, and the embedded Redis is 7.0.)
* a listener thread reads those messages; while it is not connected (start, Redis restarting, a dropped
  connection) nothing is cached and every lookup goes to Redis, so a missed invalidation can never serve a
  stale record; it reconnects with backoff and clears the copy before trusting it again. The tracking
  connection is pinged every ``PING_S`` seconds: Redis stops tracking silently if it drops. A lookup that
  finds an invalidation waiting on the socket (sent, not yet read) reads Redis instead of the copy.

``loraflow_inference_registry_lookups_total{result="cache_hit"|"redis"}`` on /metrics counts the lookups and
where each was answered: the hits are the Redis round trips the copy saved.
"""

from __future__ import annotations

import logging
import select
import threading
from collections import OrderedDict

import redis

from loraflow.jobs.registry import ADAPTERS_KEY, AdapterRecord, Registry
from services.inference import metrics

log = logging.getLogger(__name__)

INVALIDATE_CHANNEL = "__redis__:invalidate"
# Records kept (~0.5 KB each); beyond it the least recently used go (an unbounded name flood cannot grow it).
MAX_RECORDS = 65_536
PING_S = 1.0
RECONNECT_MAX_S = 5.0
_MISSING = object()


class CachedAdapterRecords:
    """``find_adapter`` over a Registry with a local, invalidated copy; thread-safe. ``close()`` stops it."""

    def __init__(self, registry: Registry, *, max_records: int = MAX_RECORDS):
        self.registry = registry
        self.max_records = max_records
        self._records: OrderedDict[str, AdapterRecord | None] = OrderedDict()
        self._lock = threading.Lock()
        self._valid = False  # True only while the invalidation listener is connected and tracking
        self._generation = 0  # bumped by every invalidation: a read that raced one is not kept
        self._subscriber_sock = None  # the listener's subscribed socket (polled, never read, by lookups)
        self._stop = threading.Event()
        self.hits = 0
        self.misses = 0
        self.invalidations = 0
        self._thread = threading.Thread(target=self._listen, name="registry-invalidation", daemon=True)
        self._thread.start()

    @property
    def tracking(self) -> bool:
        return self._valid

    def find_adapter(self, name: str) -> AdapterRecord | None:
        with self._lock:
            # An invalidation Redis has sent but the listener has not read yet: not trusted, read Redis.
            if self._valid and not self._invalidation_pending():
                cached = self._records.get(name, _MISSING)
                if cached is not _MISSING:
                    self._records.move_to_end(name)
                    self.hits += 1
                    metrics.REGISTRY_LOOKUPS.labels("cache_hit").inc()
                    return cached
            generation = self._generation
        record = self.registry.find_adapter(name)  # None for an unknown name
        metrics.REGISTRY_LOOKUPS.labels("redis").inc()
        with self._lock:
            self.misses += 1
            # Only records are kept (an unknown name may be registered by another process at any moment, and
            # a caller that registers and then uses a name must see it), and only if no invalidation arrived
            # while Redis was read (it may predate what we read).
            if record is not None and self._valid and generation == self._generation:
                self._records[name] = record
                self._records.move_to_end(name)
                while len(self._records) > self.max_records:
                    self._records.popitem(last=False)
        return record

    def _invalidation_pending(self) -> bool:
        sock = self._subscriber_sock
        if sock is None:
            return True
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def get_adapter(self, name: str) -> AdapterRecord:
        record = self.find_adapter(name)
        if record is None:
            return self.registry.get_adapter(name)  # the registry's own NotFound (and its wording)
        return record

    def close(self) -> None:
        self._stop.set()
        self._thread.join(PING_S + 1)

    # ---- invalidation ------------------------------------------------------------------------
    def _invalidate(self) -> None:
        with self._lock:
            self._records.clear()
            self._generation += 1
            self.invalidations += 1

    def _set_valid(self, valid: bool) -> None:
        with self._lock:
            self._records.clear()
            self._generation += 1
            self._valid = valid

    def _connection(self) -> redis.Connection:
        """A dedicated connection (outside the pool's accounting) with the client's address, credentials and TLS,
        speaking RESP2: a subscribed connection then reads invalidations as plain messages."""
        pool = self.registry.redis.connection_pool
        kwargs = {k: v for k, v in pool.connection_kwargs.items() if not k.startswith("maint_notifications")}
        return pool.connection_class(**{**kwargs, "protocol": 2})

    def _listen(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            subscriber = tracker = None
            try:
                subscriber, tracker = self._connection(), self._connection()
                for conn in (subscriber, tracker):
                    conn.connect()
                subscriber.send_command("CLIENT", "ID")
                subscriber_id = int(subscriber.read_response())
                subscriber.send_command("SUBSCRIBE", INVALIDATE_CHANNEL)
                subscriber.read_response()
                tracker.send_command("CLIENT", "TRACKING", "ON", "REDIRECT", subscriber_id, "BCAST", "PREFIX",
                                     ADAPTERS_KEY)
                reply = tracker.read_response()
                if reply not in (b"OK", "OK"):
                    raise redis.RedisError(f"CLIENT TRACKING answered {reply!r}")
                self._subscriber_sock = subscriber._sock
                self._set_valid(True)
                backoff = 0.1
                while not self._stop.is_set():
                    if subscriber.can_read(timeout=PING_S):
                        message = subscriber.read_response()
                        if isinstance(message, list) and message and message[0] in (b"message", "message"):
                            self._invalidate()
                    tracker.send_command("PING")
                    tracker.read_response()
            except (redis.RedisError, OSError, ValueError) as err:
                if self._valid:
                    log.warning("registry invalidation lost (%s); adapter records are read from Redis until it "
                                "is back", err)
                self._set_valid(False)
                self._stop.wait(backoff)
                backoff = min(RECONNECT_MAX_S, backoff * 2)
            finally:
                self._set_valid(False)
                self._subscriber_sock = None
                for conn in (subscriber, tracker):
                    if conn is not None:
                        conn.disconnect()
