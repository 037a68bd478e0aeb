"""Thread pools and a stream cap that keep a sync gRPC server answering while streams hang.

Every RPC of a sync server holds a thread while it runs, and a stream can run as long as its client
likes (a watcher, a client that never reads). So the server gets three pools (grpc's
`experimental_thread_pool` attribute on the behavior picks one per RPC):

* streams: `max_concurrent_streams` threads plus a few that only turn away the streams beyond the cap;
  a stream beyond the cap ends at once with RESOURCE_EXHAUSTED instead of queueing for a thread;
* unary RPCs: their own threads, which no stream can take;
* health Check: two threads nothing else uses, so probes answer even when every unary thread is busy.

A stream's slot is released in the `finally` of its response generator: when it ends, fails, is
cancelled by its client or passes its deadline (grpc then closes the generator).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent import futures

import grpc

from loraflow.errors import ResourceExhausted

log = logging.getLogger(__name__)

STREAM_REJECT_THREADS = 4
HEALTH_CHECK_THREADS = 2
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

    def shutdown(self) -> None:
        for pool in (self.unary, self.streams, self.health):
            pool.shutdown(wait=False, cancel_futures=True)


def _on_pool(behavior: Callable, pool: futures.ThreadPoolExecutor) -> Callable:
    def routed(request, context):
        return behavior(request, context)
    routed.experimental_thread_pool = pool
    return routed


def _exhausted(limiter: StreamLimiter, method: str, context) -> None:
    from loraflow.grpc_server import status_for

    log.warning("%s -> RESOURCE_EXHAUSTED: %d streams already open", method, limiter.cap)
    context.abort_with_status(status_for(ResourceExhausted(
        f"this server already serves {limiter.cap} streaming RPCs (--max-concurrent-streams); retry later",
        reason="TOO_MANY_STREAMS", metadata={"max_concurrent_streams": limiter.cap})))


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
