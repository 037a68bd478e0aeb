"""Prometheus metrics of the trainer worker (served by ``serve_metrics(port)`` when --metrics-port is set)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

STEPS = Counter("loraflow_trainer_steps_total", "Optimiser steps reported by training jobs.")
LOSS = Gauge("loraflow_trainer_loss", "Train loss of the latest reported step.")
TOKENS_PER_SECOND = Gauge("loraflow_trainer_tokens_per_second", "Throughput of the latest reported step.")
JOBS = Counter("loraflow_trainer_jobs_total", "Training jobs finished by this worker, by outcome.", ["outcome"])


class TrainerMetrics:
    """The object TrainingHandler calls (observe_step / observe_job)."""

    def observe_step(self, progress) -> None:
        STEPS.inc()
        LOSS.set(progress.loss)
        TOKENS_PER_SECOND.set(progress.tokens_per_second)

    def observe_job(self, outcome: str) -> None:
        JOBS.labels(outcome=outcome).inc()


def serve_metrics(port: int, addr: str = "127.0.0.1", limits=None) -> None:
    # /metrics plus the /healthz and /readyz probes (loraflow.server.redis_health.HEALTH).
    from loraflow.server.redis_health import start_metrics_server

    start_metrics_server(port, addr=addr, limits=limits)  # limits: ServerLimits (None: defaults)
