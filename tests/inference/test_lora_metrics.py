"""The routing metrics a LoRA-aware gateway reads, scraped from the real /metrics HTTP endpoint while
requests are queued, running and waiting for their adapter's load, and after they finish."""

from __future__ import annotations

import threading
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from loraflow.v1 import inference_pb2 as pb
from services.inference import metrics
from services.inference.metrics import serve_metrics
from tests.inference.few_slots import few_slots, few_slots_artifact, load_model, wait_until

__all__ = ["few_slots", "few_slots_artifact"]  # fixtures


def scrape(port: int) -> dict[str, list]:
    """Metric name -> samples, from one GET /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def value(samples: dict, name: str, **labels) -> float | None:
    for s in samples.get(name, []):
        if all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def lora_info(samples: dict, model: str):
    rows = [s for s in samples.get(metrics.LORA_REQUESTS_INFO, []) if s.labels["model"] == model]
    assert len(rows) == 1, rows  # one series per model: the EPP reads the latest
    return rows[0]


def test_routing_metrics_follow_requests_and_adapter_loads(few_slots):
    stub, fetches = few_slots["stub"], few_slots["fetches"]
    server, _ = serve_metrics(0, "127.0.0.1")
    port = server.server_port
    few_slots["manager"].adapter_cache.forget_artifact(few_slots["artifact_id"])
    model, gate = load_model(few_slots, "routed")
    calls = []
    try:
        idle = scrape(port)
        assert value(idle, metrics.NUM_REQUESTS_WAITING, model="routed") == 0
        assert value(idle, metrics.KV_CACHE_USAGE, model="routed") == 0
        info = lora_info(idle, "routed")
        assert info.labels["max_lora"] == "2" and info.labels["running_lora_adapters"] == ""
        assert info.labels["waiting_lora_adapters"] == "" and info.value > 1.7e9  # a unix time

        # Five requests (beta and the base model) held by the gate: the step loop is blocked inside its
        # first step, so some are running (in a KV slot) and the rest queued; the gauges must say which.
        gate.close()
        for adapter in ("beta", "", "beta", "", "beta"):
            calls.append(stub.Generate(pb.GenerateRequest(model_id="routed", prompt="hi", adapter=adapter,
                                                          sampling=pb.SamplingParams(max_new_tokens=3))))
        wait_until(lambda: model.engine.num_active() == 5 and model.engine.scheduler.num_running >= 1)
        # And three requests waiting for hot's load (its fetch is held, so they wait on it together).
        fetches.hold()
        for _ in range(3):
            calls.append(stub.Generate(pb.GenerateRequest(model_id="routed", prompt="hi", adapter="hot",
                                                          sampling=pb.SamplingParams(max_new_tokens=3))))
        threading.Thread(target=lambda: [list(c) for c in calls[5:]], daemon=True).start()
        wait_until(lambda: model.adapters.waiting().get("hot") == 3)
        held = time.monotonic()  # the load is in flight from here at least until release()
        scheduler = model.engine.scheduler
        running, queued = scheduler.num_running, scheduler.num_waiting
        # The three wait in the scheduler's queue (holding no KV slot) while hot loads.
        assert running + queued == 8
        assert sum(1 for s in scheduler.waiting if s.lora_id is None) == 3
        busy = scrape(port)
        assert value(busy, metrics.NUM_REQUESTS_WAITING, model="routed") == queued
        assert value(busy, metrics.NUM_REQUESTS_RUNNING, model="routed") == running
        assert value(busy, metrics.KV_CACHE_USAGE, model="routed") == running / 4
        info = lora_info(busy, "routed")
        # Which of the five the server admitted first is up to its threads; "" (the base model) is no adapter.
        running_beta = any(model.engine._states[rid].request.adapter == "beta" for rid in scheduler.running)
        waiting_beta = any(model.engine._states[s.request_id].request.adapter == "beta" for s in scheduler.waiting)
        assert running_beta or waiting_beta
        assert info.labels["running_lora_adapters"] == ("beta" if running_beta else "")
        assert info.labels["waiting_lora_adapters"] == ("beta,hot" if waiting_beta else "hot")

        time.sleep(0.2)
        held = time.monotonic() - held
        fetches.release()
        wait_until(lambda: "hot" in model.runtime.adapter_names())
        gate.open()
        for call in calls[:5]:
            list(call)
        wait_until(lambda: model.engine.num_active() == 0)
        after = scrape(port)
        assert value(after, metrics.NUM_REQUESTS_WAITING, model="routed") == 0
        assert value(after, metrics.KV_CACHE_USAGE, model="routed") == 0
        assert lora_info(after, "routed").labels["running_lora_adapters"] == ""
        # Per-adapter counters and the load-time histogram.
        assert value(after, "loraflow_inference_requests_total", model="routed", adapter="hot",
                     finish_reason="length") == 3
        assert value(after, "loraflow_inference_adapter_generated_tokens_total", model="routed", adapter="hot") == 9
        assert value(after, "loraflow_inference_adapter_prompt_tokens_total", model="routed", adapter="beta") > 0
        assert value(after, "loraflow_inference_adapter_load_seconds_count", model="routed", source="store") == 1
        assert value(after, "loraflow_inference_adapter_load_seconds_sum", model="routed", source="store") >= held

        stub.UnloadModel(pb.UnloadModelRequest(model_id="routed"))
        gone = scrape(port)
        assert value(gone, metrics.NUM_REQUESTS_WAITING, model="routed") is None
        assert not [s for s in gone.get(metrics.LORA_REQUESTS_INFO, []) if s.labels["model"] == "routed"]
    finally:
        fetches.release()
        gate.open()
        server.shutdown()
        if "routed" in [m.model_id for m in few_slots["manager"].list()]:
            stub.UnloadModel(pb.UnloadModelRequest(model_id="routed"))
