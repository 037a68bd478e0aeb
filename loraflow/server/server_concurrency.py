"""Thread pools and a stream cap that keep a sync gRPC server answering while streams hang.

Every RPC of a sync server holds a thread while it runs, and a stream can run as long as its client
likes (a watcher, a client that never reads). So the server gets three pools (grpc's
`experimental_thread_pool` attribute on the behavior picks one per RPC):

* streams: `max_concurrent_streams` threads plus a few that only turn away the streams beyond the cap;
  a stream beyond the cap ends at once with RESOURCE_EXHAUSTED instead of queueing for a thread;
* unary RPCs: their own threads, which no stream can take;
* health Check: two threads nothing else uses, so probes answer even when every unary thread is busy;
* refusals: the auth interceptor's UNAUTHENTICATED answers run on two threads of their own and take no
  stream slot, so a flood of calls without a valid token cannot queue ahead of authenticated ones.

With `max_streams_per_client`, `ClientStreamInterceptor` also caps the streams one client holds (its
caller name with tokens, else its address), so one client cannot take every stream slot.

A stream's slot is released in the `finally` of its response generator: when it ends, fails, is
cancelled by its client or passes its deadline (grpc then closes the generator).
"""

from __future__ import annotations

import fcntl
import logging
import socket
import struct
import termios
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent import futures
from typing import Protocol

import grpc

from loraflow.errors import ResourceExhausted
from loraflow.server.error_status import status_for

log = logging.getLogger(__name__)

STREAM_REJECT_THREADS = 4
HEALTH_CHECK_THREADS = 2
REFUSAL_THREADS = 2
# Set on a behavior that only refuses the call (auth): it runs on the refusal pool and takes no stream slot.
REFUSAL_ATTRIBUTE = "loraflow_refusal"
HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"


class StreamLimiter:
    """Counts the streaming RPCs in progress; acquire() is False once `cap` are."""

    def __init__(self, cap: int):
        self.cap = cap
        self._active = 0
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        with self._lock:
            if self._active >= self.cap:
                return False
            self._active += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._active -= 1

    @property
    def active(self) -> int:
        return self._active


class ServerPools:
    """The three executors of one server (see module docstring)."""

    def __init__(self, max_concurrent_streams: int, unary_workers: int):
        self.unary = futures.ThreadPoolExecutor(unary_workers, thread_name_prefix="grpc-unary")
        self.streams = futures.ThreadPoolExecutor(max_concurrent_streams + STREAM_REJECT_THREADS,
                                                  thread_name_prefix="grpc-stream")
        self.health = futures.ThreadPoolExecutor(HEALTH_CHECK_THREADS, thread_name_prefix="grpc-health")
        self.refusals = futures.ThreadPoolExecutor(REFUSAL_THREADS, thread_name_prefix="grpc-refuse")

    def shutdown(self) -> None:
        for pool in (self.unary, self.streams, self.health, self.refusals):
            pool.shutdown(wait=False, cancel_futures=True)


def _on_pool(behavior: Callable, pool: futures.ThreadPoolExecutor) -> Callable:
    def routed(request, context):
        return behavior(request, context)
    routed.experimental_thread_pool = pool
    return routed


def _exhausted(limiter: StreamLimiter, method: str, context) -> None:
    log.warning("%s -> RESOURCE_EXHAUSTED: %d streams already open", method, limiter.cap)
    context.abort_with_status(status_for(ResourceExhausted(
        f"this server already serves {limiter.cap} streaming RPCs (--max-concurrent-streams); retry later",
        reason="TOO_MANY_STREAMS", metadata={"max_concurrent_streams": limiter.cap})))


def _with_behavior(handler: grpc.RpcMethodHandler, behavior: Callable) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` running ``behavior``."""
    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(behavior, des, ser)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(behavior, des, ser)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(behavior, des, ser)
    return grpc.stream_stream_rpc_method_handler(behavior, des, ser)


class ConcurrencyInterceptor(grpc.ServerInterceptor):
    """Must be the outermost interceptor: the pool it sets is read from the behavior grpc finally gets."""

    def __init__(self, pools: ServerPools, limiter: StreamLimiter):
        self.pools = pools
        self.limiter = limiter

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        des, ser = handler.request_deserializer, handler.response_serializer
        behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        if getattr(behavior, REFUSAL_ATTRIBUTE, False):
            return _with_behavior(handler, _on_pool(behavior, self.pools.refusals))
        if handler.unary_unary:
            pool = self.pools.health if method == HEALTH_CHECK_METHOD else self.pools.unary
            return grpc.unary_unary_rpc_method_handler(_on_pool(handler.unary_unary, pool), des, ser)
        limiter = self.limiter

        def response_stream(behavior):
            def limited(request, context):
                if not limiter.acquire():
                    _exhausted(limiter, method, context)
                try:
                    yield from behavior(request, context)
                finally:
                    limiter.release()
            return _on_pool(limited, self.pools.streams)

        def single_response(behavior):
            def limited(request_iterator, context):
                if not limiter.acquire():
                    _exhausted(limiter, method, context)
                try:
                    return behavior(request_iterator, context)
                finally:
                    limiter.release()
            return _on_pool(limited, self.pools.streams)

        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(response_stream(handler.unary_stream), des, ser)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(single_response(handler.stream_unary), des, ser)
        return grpc.stream_stream_rpc_method_handler(response_stream(handler.stream_stream), des, ser)


def client_of(context) -> str:
    """Who a call counts against: the authenticated caller, else the peer's address without its port."""
    from loraflow.security.auth import current_caller

    caller = current_caller()
    if caller:
        return f"caller:{caller}"
    peer = context.peer() or ""  # "ipv4:127.0.0.1:5678", "ipv6:[::1]:5678", "unix:..."
    return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer


class ClientCounter:
    """In-flight work per client (a caller name or an address); acquire() is False once one holds ``cap``."""

    def __init__(self, cap: int):
        self.cap = cap
        self._active: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, client: str) -> bool:
        with self._lock:
            if self._active.get(client, 0) >= self.cap:
                return False
            self._active[client] = self._active.get(client, 0) + 1
            return True

    def release(self, client: str) -> None:
        with self._lock:
            left = self._active[client] - 1
            if left:
                self._active[client] = left
            else:
                del self._active[client]


def too_many_for_client(client: str, cap: int) -> ResourceExhausted:
    who = client.removeprefix("caller:")
    return ResourceExhausted(f"client {who} already holds {cap} streaming calls on this server "
                             f"(--max-streams-per-client); end one or retry later",
                             reason="TOO_MANY_STREAMS_PER_CLIENT", metadata={"max_streams_per_client": cap})


class ClientStreamInterceptor(grpc.ServerInterceptor):
    """At most ``cap`` streaming RPCs per client (see client_of) at once; RESOURCE_EXHAUSTED beyond.
    Place it inside the auth interceptor, so the caller is known."""

    def __init__(self, cap: int):
        self.cap = cap
        self.counter = ClientCounter(cap)

    def _refuse(self, client: str, method: str, context) -> None:
        log.warning("%s -> RESOURCE_EXHAUSTED: %s already holds %d streams", method, client, self.cap)
        context.abort_with_status(status_for(too_many_for_client(client, self.cap)))

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary:
            return handler
        behavior = handler.unary_stream or handler.stream_unary or handler.stream_stream
        if getattr(behavior, REFUSAL_ATTRIBUTE, False):
            return handler
        method = handler_call_details.method

        if handler.stream_unary:
            def single(request_iterator, context):
                client = client_of(context)
                if not self.counter.acquire(client):
                    self._refuse(client, method, context)
                try:
                    return behavior(request_iterator, context)
                finally:
                    self.counter.release(client)
            return _with_behavior(handler, single)

        def streaming(request, context):
            client = client_of(context)
            if not self.counter.acquire(client):
                self._refuse(client, method, context)
            try:
                yield from behavior(request, context)
            finally:
                self.counter.release(client)
        return _with_behavior(handler, streaming)


class Evictable(Protocol):
    def evict(self) -> None:
        """Close this connection now (called by ConnectionTable to make room)."""

    def fileno(self) -> int:
        """The socket descriptor (-1 when closed): a request head the kernel holds unread for it is not idle."""


# How many of the longest-waiting connections ConnectionTable looks at for one to close.
IDLE_SCAN = 64
# How much of a waiting connection's unread bytes is looked at for the end of a request head.
HEAD_PEEK_BYTES = 16 * 1024


def holds_request_head(fd: int) -> bool:
    """True when the kernel holds, unread by the server, a complete HTTP request head for socket ``fd``: the
    connection is a caller the server has not got to yet, not a slow or idle one."""
    if fd < 0:
        return False
    try:
        unread = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
        if not unread:
            return False
        with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as dup:  # a dup: closing it keeps fd open
            head = dup.recv(min(unread, HEAD_PEEK_BYTES), socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return False
    return b"\r\n\r\n" in head


class ConnectionTable:
    """Open connections of one HTTP listener and which to close when a new one needs room.

    A connection is *waiting* (opened, or between requests, and still sending no complete request head)
    or *busy* (a request in progress). Waiting connections cost a slot and serve nobody, so they are what
    gets closed: when the listener holds ``max_connections``, a new connection closes the longest-waiting
    one of the client address that holds the most waiting connections (none waiting: the new one is
    refused); a client address holding more than ``max_waiting_per_client`` waiting connections loses its
    own longest-waiting one. A flood of slow or idle connections therefore churns itself while a caller
    that sends its request at once is served, and a caller whose connection is still being set up is not
    the one closed while a flooding address holds more.
    A waiting connection whose complete request head the kernel already holds is waiting on the server, not
    the client (a loaded server accepts a backlog of connections in one go before it reads any of them: a
    caller's request sits unread behind a burst of flood connections), so it is never the one closed; the
    per-client bound waits for such connections to be read (it is enforced again at that client's next
    connection); at ``max_connections`` with no other waiting connection the new one is refused.
    Thread-safe (the metrics listener opens connections from its accept thread, handlers end them).
    """

    def __init__(self, max_connections: int, max_waiting_per_client: int):
        self.max_connections = max_connections
        self.max_waiting_per_client = max_waiting_per_client
        self._lock = threading.Lock()
        self._clients: dict[Evictable, str] = {}
        self._waiting: OrderedDict[Evictable, None] = OrderedDict()  # oldest first
        self._waiting_by_client: dict[str, OrderedDict[Evictable, None]] = {}
        self.evicted = 0
        self.refused = 0

    def __len__(self) -> int:
        return len(self._clients)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def waiting_of(self, client: str) -> int:
        """Waiting connections of one client address."""
        with self._lock:
            return len(self._waiting_by_client.get(client, ()))

    def is_waiting(self, conn: Evictable) -> bool:
        return conn in self._waiting

    def opened(self, conn: Evictable, client: str) -> bool:
        """Register a new (waiting) connection; False when it must be refused (every slot busy)."""
        victims: list[Evictable] = []
        with self._lock:
            if len(self._clients) >= self.max_connections:
                victim = self._global_victim()
                if victim is None:  # every connection has a request in progress or one the server owes a read
                    self.refused += 1
                    return False
                victims.append(self._drop(victim))
            self._clients[conn] = client
            victims += self._wait(conn, client)
        self._evict(victims)
        return True

    def busy(self, conn: Evictable) -> None:
        """The connection delivered a request head: it is not closed to make room until it waits again."""
        with self._lock:
            client = self._clients.get(conn)
            if client is None:
                return
            self._waiting.pop(conn, None)
            self._waiting_by_client.get(client, {}).pop(conn, None)  # type: ignore[call-overload]

    def waiting_again(self, conn: Evictable) -> None:
        """The response is complete; the connection waits for its next request (keep-alive)."""
        with self._lock:
            client = self._clients.get(conn)
            victims = self._wait(conn, client) if client is not None else []
        self._evict(victims)

    def closed(self, conn: Evictable) -> None:
        with self._lock:
            if conn in self._clients:
                self._drop(conn)

    def _wait(self, conn: Evictable, client: str) -> list[Evictable]:
        self._waiting[conn] = None
        mine = self._waiting_by_client.setdefault(client, OrderedDict())
        mine[conn] = None
        victims = []
        while len(mine) > self.max_waiting_per_client:
            victim = self._idlest(mine)
            if victim is None:  # all hold unread requests (one accepted burst): checked again at its next connection
                break
            victims.append(self._drop(victim))
        return victims

    def _global_victim(self) -> Evictable | None:
        """At the hard cap: the idlest connection of the address holding the most waiting ones (then the
        next heaviest, when all of that address's hold unread requests)."""
        by_client = self._waiting_by_client
        heaviest = max(by_client, key=lambda c: len(by_client[c]), default=None)
        if heaviest is None:
            return None
        victim = self._idlest(by_client[heaviest])
        if victim is not None:
            return victim
        for client in sorted(by_client, key=lambda c: len(by_client[c]), reverse=True)[1:IDLE_SCAN]:
            victim = self._idlest(by_client[client])
            if victim is not None:
                return victim
        return None

    @staticmethod
    def _idlest(waiting: OrderedDict[Evictable, None]) -> Evictable | None:
        """The longest-waiting connection that holds no unread complete request head, or None. Looks at the
        IDLE_SCAN oldest only, so a table of connections that all hold requests costs a bounded number of calls."""
        for conn, _ in zip(waiting, range(IDLE_SCAN), strict=False):
            if not holds_request_head(conn.fileno()):
                return conn
        return None

    def _drop(self, conn: Evictable) -> Evictable:
        client = self._clients.pop(conn)
        self._waiting.pop(conn, None)
        mine = self._waiting_by_client.get(client)
        if mine is not None:
            mine.pop(conn, None)
            if not mine:
                del self._waiting_by_client[client]
        return conn

    def _evict(self, victims: list[Evictable]) -> None:
        for victim in victims:
            self.evicted += 1
            try:
                victim.evict()
            except Exception:  # noqa: BLE001 - a connection that is already gone needs no closing
                log.debug("evicting a connection failed", exc_info=True)
