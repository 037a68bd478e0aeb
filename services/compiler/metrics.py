"""Prometheus metrics of the compiler worker (served when --metrics-port is set)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

JOBS = Counter("loraflow_compiler_jobs_total", "Compile jobs finished by this process, by outcome.", ["outcome"])
STAGE_SECONDS = Histogram("loraflow_compiler_stage_seconds", "Seconds spent per compile stage.", ["stage"],
                          buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 1200))


def serve_metrics(port: int, addr: str = "127.0.0.1", limits=None) -> None:
    # /metrics plus the /healthz and /readyz probes (loraflow.server.redis_health.HEALTH).
    from loraflow.server.redis_health import start_metrics_server

    start_metrics_server(port, addr=addr, limits=limits)  # limits: ServerLimits (None: defaults)
