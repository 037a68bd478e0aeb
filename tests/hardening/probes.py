"""What the hardening tests measure beside a hostile caller: a well-behaved caller's latency, and RSS.

``LatencyProbe`` calls a cheap endpoint (gRPC health Check, HTTP /health) on a connection of its own every
``interval`` seconds on a thread, for as long as the ``with`` block runs, and records every latency (a
call that fails counts as the probe's timeout). Bounds asserted on it are generous for a loaded 2-core
host; the protections under test keep latencies in milliseconds, their absence in seconds.
"""

from __future__ import annotations

import http.client
import os
import threading
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# What a well-behaved caller may wait while a hostile one does its worst on a loaded 2-core host.
PROBE_BOUND_S = 2.0


class LatencyProbe:
    def __init__(self, call: Callable[[], None], *, interval: float = 0.05, timeout: float = 10.0,
                 close: Callable[[], None] = lambda: None):
        self._call = call
        self._close = close
        self.interval = interval
        self.timeout = timeout
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="latency-probe", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._call()
                self.latencies.append(time.monotonic() - started)
            except Exception as err:  # noqa: BLE001 - recorded, asserted by the test
                self.failures.append(repr(err)[:200])
                self.latencies.append(max(self.timeout, time.monotonic() - started))
            self._stop.wait(self.interval)

    def __enter__(self) -> LatencyProbe:
        self._call()  # warm: connection set up before the measurement starts
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(self.timeout + 5)
        self._close()

    @property
    def worst(self) -> float:
        return max(self.latencies, default=0.0)

    def assert_unharmed(self, bound: float = PROBE_BOUND_S) -> None:
        assert self.latencies, "the probe never ran"
        assert not self.failures, f"the well-behaved caller failed: {self.failures[:3]}"
        assert self.worst < bound, (f"the well-behaved caller waited {self.worst:.2f}s (bound {bound}s; "
                                    f"{len(self.latencies)} calls)")


def grpc_health_probe(address: str, **kwargs) -> LatencyProbe:
    channel = grpc.insecure_channel(address)
    stub = health_pb2_grpc.HealthStub(channel)
    timeout = kwargs.get("timeout", 10.0)

    def call() -> None:
        stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)

    return LatencyProbe(call, close=channel.close, **kwargs)


def http_probe(port: int, path: str = "/health", headers: dict | None = None, **kwargs) -> LatencyProbe:
    """A new connection per call, as a kubelet probe makes."""
    timeout = kwargs.get("timeout", 10.0)

    def call() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            conn.request("GET", path, headers=headers or {})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise AssertionError(f"GET {path} answered {response.status}")
        finally:
            conn.close()

    return LatencyProbe(call, **kwargs)


def rss_bytes() -> int:
    """Resident set size of this process (the servers under test run in it)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
