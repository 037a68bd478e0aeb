"""Prometheus metrics of the inference service and the structured request log.

The metrics are module-level (one set per process, labelled by model), served over HTTP by
``serve_metrics(port)``. ``log_event`` writes one JSON object per line with the request id, so
logs of one request can be followed across submit → first token → finish.
"""

from __future__ import annotations

import json
import logging
import time

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

TIME_TO_FIRST_TOKEN = Histogram(
    "loraflow_inference_time_to_first_token_seconds", "Submit to first generated token.", ["model"],
    buckets=_LATENCY_BUCKETS)
INTER_TOKEN_LATENCY = Histogram(
    "loraflow_inference_inter_token_latency_seconds", "Time between consecutive tokens of one request.",
    ["model"], buckets=_LATENCY_BUCKETS)
QUEUE_DEPTH = Gauge("loraflow_inference_queue_depth", "Requests waiting for a batch slot.", ["model"])
SLOTS_IN_USE = Gauge("loraflow_inference_slots_in_use", "KV-cache slots holding a running request.", ["model"])
SLOTS_TOTAL = Gauge("loraflow_inference_slots_total", "KV-cache slots (full_batch_size).", ["model"])
GENERATED_TOKENS = Counter("loraflow_inference_generated_tokens_total", "Tokens generated.", ["model"])
PROMPT_TOKENS = Counter("loraflow_inference_prompt_tokens_total", "Prompt tokens prefilled.", ["model"])
REQUESTS = Counter("loraflow_inference_requests_total", "Requests finished, by adapter and finish reason.",
                   ["model", "adapter", "finish_reason"])
STEP_SECONDS = Histogram("loraflow_inference_step_seconds", "One runtime call (prefill or decode).",
                         ["model", "kind"], buckets=_LATENCY_BUCKETS)

_log = logging.getLogger("loraflow.inference")


def log_event(event: str, **fields) -> None:
    """One structured log line: {"event": ..., "request_id": ..., ...}."""
    record = {"ts": round(time.time(), 3), "event": event, **fields}
    _log.info(json.dumps(record, default=str, sort_keys=False))


def forget_model(model: str) -> None:
    """Drop the gauges of an unloaded model so they do not report stale values."""
    for gauge in (QUEUE_DEPTH, SLOTS_IN_USE, SLOTS_TOTAL):
        try:
            gauge.remove(model)
        except KeyError:
            pass


def serve_metrics(port: int, addr: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY):
    """Start the /metrics HTTP endpoint in a daemon thread; returns (server, thread)."""
    return start_http_server(port, addr=addr, registry=registry)
