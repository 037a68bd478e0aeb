"""Prometheus metrics of the inference service and the structured request log.

The metrics are module-level (one set per process, labelled by model), served over HTTP by
``serve_metrics(port)``. ``log_event`` writes one JSON object per line with the request id, so
logs of one request can be followed across submit → first token → finish.

Routing metrics (the Gateway API Inference Extension's model-server protocol, which lets a server
name them; deploy/k8s/gateway/ configures the endpoint picker with exactly these names):

* ``loraflow_inference_num_requests_waiting{model}`` (gauge, TotalQueuedRequests; vLLM
  ``vllm:num_requests_waiting``): requests queued for a KV-cache slot, plus those waiting for their
  adapter to be loaded.
* ``loraflow_inference_num_requests_running{model}`` (gauge, TotalRunningRequests).
* ``loraflow_inference_kv_cache_usage_perc{model}`` (gauge, KVCacheUtilization; vLLM
  ``vllm:gpu_cache_usage_perc``): the fraction 0..1 of KV-cache slots holding a request (the cache
  is preallocated per slot, so a slot is the unit a request can be admitted into).
* ``loraflow_inference_lora_requests_info{model, max_lora, running_lora_adapters,
  waiting_lora_adapters}`` (gauge; vLLM ``vllm:lora_requests_info``): value = the unix time of the
  scrape; ``max_lora`` = adapter slots; the lists are comma-separated adapter names with running
  requests, and with waiting requests (queued, or waiting for their adapter's load).

They are computed from the live engines at scrape time, so they never go stale. Per adapter:
``loraflow_inference_requests_total{model, adapter, finish_reason}``,
``loraflow_inference_adapter_prompt_tokens_total`` / ``..._adapter_generated_tokens_total{model,
adapter}``, ``loraflow_inference_adapter_load_seconds{model, source}`` (histogram; source =
store | artifact | path | host_cache), ``..._adapter_loads_total``, ``..._adapter_evictions_total``;
``loraflow_inference_registry_lookups_total{result}`` (cache_hit | redis): registry record lookups and the
Redis round trips the record cache saved.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import weakref
from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

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

ADAPTER_PROMPT_TOKENS = Counter("loraflow_inference_adapter_prompt_tokens_total", "Prompt tokens of finished "
                                "requests, by adapter.", ["model", "adapter"])
ADAPTER_GENERATED_TOKENS = Counter("loraflow_inference_adapter_generated_tokens_total", "Tokens generated for "
                                   "finished requests, by adapter.", ["model", "adapter"])
_LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ADAPTER_LOAD_SECONDS = Histogram("loraflow_inference_adapter_load_seconds", "Loading one adapter into a slot "
                                 "(fetch or host-cache copy, validation, slot wait, bank write).",
                                 ["model", "source"], buckets=_LOAD_BUCKETS)
ADAPTER_LOADS = Counter("loraflow_inference_adapter_loads_total", "Adapters loaded into a slot, by where from.",
                        ["model", "source"])
ADAPTER_LOAD_FAILURES = Counter("loraflow_inference_adapter_load_failures_total", "Adapter loads that failed.",
                                ["model"])
ADAPTER_EVICTIONS = Counter("loraflow_inference_adapter_evictions_total", "Idle adapters evicted from a slot.",
                            ["model"])
ADAPTER_CACHE_BYTES = Gauge("loraflow_inference_adapter_cache_bytes", "Bytes of evicted adapters kept in host memory.")
ADAPTER_CACHE_EVICTIONS = Counter("loraflow_inference_adapter_cache_evictions_total", "Evicted adapters dropped "
                                  "from the host cache to stay within --adapter-cache-bytes.")
# Where each request's adapter came from: "slot" (already loaded: a hit of the first tier), "host_cache"
# (copied back from host memory), "store" (fetched and parsed), "artifact" / "path" (re-read from disk).
ADAPTER_REQUESTS = Counter("loraflow_inference_adapter_requests_total", "Requests naming an adapter, by the tier "
                           "that held its weights: slot, host_cache, store, artifact, path.", ["model", "tier"])

# Registered adapters' records (services.inference.registry_cache): "cache_hit" answered from the local copy,
# "redis" read from Redis (a first lookup, an unknown name, or while invalidation is not tracking).
REGISTRY_LOOKUPS = Counter("loraflow_inference_registry_lookups_total", "Adapter registry record lookups, by "
                           "where the answer came from: cache_hit (no Redis round trip) or redis.", ["result"])

# Names the endpoint picker is configured with (deploy/k8s/gateway/); tests check both sides.
NUM_REQUESTS_WAITING = "loraflow_inference_num_requests_waiting"
NUM_REQUESTS_RUNNING = "loraflow_inference_num_requests_running"
KV_CACHE_USAGE = "loraflow_inference_kv_cache_usage_perc"
LORA_REQUESTS_INFO = "loraflow_inference_lora_requests_info"

_log = logging.getLogger("loraflow.inference")


class _RoutingCollector(Collector):
    """Queue, KV-cache and LoRA gauges read from every live engine at scrape time."""

    def __init__(self):
        self._engines: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def track(self, model: str, engine) -> None:
        with self._lock:
            self._engines[model] = engine

    def forget(self, model: str, engine) -> None:
        """Stop reporting ``engine`` (not a newer engine loaded under the same model id since)."""
        with self._lock:
            if self._engines.get(model) is engine:
                del self._engines[model]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        waiting = GaugeMetricFamily(NUM_REQUESTS_WAITING, "Requests waiting for a KV-cache slot or an adapter load.",
                                    labels=["model"])
        running = GaugeMetricFamily(NUM_REQUESTS_RUNNING, "Requests holding a KV-cache slot.", labels=["model"])
        usage = GaugeMetricFamily(KV_CACHE_USAGE, "Fraction (0..1) of KV-cache slots holding a request.",
                                  labels=["model"])
        lora = GaugeMetricFamily(LORA_REQUESTS_INFO, "LoRA adapters of running and waiting requests; value = "
                                 "scrape time.", labels=["model", "max_lora", "running_lora_adapters",
                                                         "waiting_lora_adapters"])
        with self._lock:
            engines = list(self._engines.items())
        now = time.time()
        for model, engine in engines:
            snap = engine.routing_snapshot()
            waiting.add_metric([model], snap.num_waiting)
            running.add_metric([model], snap.num_running)
            usage.add_metric([model], snap.kv_cache_usage)
            lora.add_metric([model, str(snap.max_lora), ",".join(snap.running_adapters),
                             ",".join(snap.waiting_adapters)], now)
        yield from (waiting, running, usage, lora)


ROUTING = _RoutingCollector()
REGISTRY.register(ROUTING)


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


def serve_metrics(port: int, addr: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY, limits=None):
    """Start the /metrics (+ /healthz, /readyz) HTTP endpoint in a daemon thread; returns (server, thread)."""
    # /metrics plus the /healthz and /readyz probes (loraflow.server.redis_health.HEALTH).
    from loraflow.server.redis_health import start_metrics_server

    return start_metrics_server(port, addr=addr, registry=registry, limits=limits)  # ServerLimits (None: defaults)
