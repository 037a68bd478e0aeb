"""Adapters loaded on first use, through the real gRPC Generate: a registered adapter that is not in a
slot is loaded (once, however many requests ask), idle slots are reused least recently used first,
busy ones never, a full house waits (bounded) then RESOURCE_EXHAUSTED, and an evicted adapter comes
back from the host cache without a store fetch."""

from __future__ import annotations

import threading
import time

import grpc
from prometheus_client import REGISTRY

from loraflow.jobs.registry import AdapterRecord
from loraflow.v1 import inference_pb2 as pb
from tests.inference.conftest import PROMPTS
from tests.inference.few_slots import (
    ADAPTER_WAIT_S,
    few_slots,
    few_slots_artifact,
    load_model,
    loaded,
    wait_until,
)
from tests.inference.test_server import code_of

__all__ = ["few_slots", "few_slots_artifact"]  # fixtures


def loads(model_id: str, source: str) -> float:
    return REGISTRY.get_sample_value("loraflow_inference_adapter_loads_total",
                                     {"model": model_id, "source": source}) or 0.0


def requests_by_tier(model_id: str, tier: str) -> float:
    return REGISTRY.get_sample_value("loraflow_inference_adapter_requests_total",
                                     {"model": model_id, "tier": tier}) or 0.0


def generate(stub, model_id: str, adapter: str, prompt: str = PROMPTS[0], n: int = 6, **kw) -> list[int]:
    chunks = stub.Generate(pb.GenerateRequest(model_id=model_id, prompt=prompt, adapter=adapter,
                                              sampling=pb.SamplingParams(max_new_tokens=n, **kw)))
    return [t for c in chunks for t in c.token_ids]


def start(stub, model_id: str, adapter: str):
    """A request left in flight (the gate is closed): returns the call, to cancel later."""
    return stub.Generate(pb.GenerateRequest(model_id=model_id, prompt="hi", adapter=adapter,
                                            sampling=pb.SamplingParams(max_new_tokens=4)))


def test_first_use_loads_then_serves_the_explicitly_loaded_tokens(few_slots, tiny_tokenizer, peft_reference):
    stub, manager = few_slots["stub"], few_slots["manager"]
    manager.adapter_cache.forget_artifact(few_slots["artifact_id"])
    model, _ = load_model(few_slots, "first")
    try:
        assert loaded(model) == {"beta"}
        fetched = len(few_slots["fetches"].calls)
        got = generate(stub, "first", "hot", PROMPTS[1], 8)
        assert got == peft_reference.generate(tiny_tokenizer.encode(PROMPTS[1]), "hot", 8)
        assert loaded(model) == {"beta", "hot"} and loads("first", "store") == 1
        assert few_slots["fetches"].calls[fetched:] == ["adapters/hot"]
        listed = stub.ListModels(pb.ListModelsRequest()).models
        assert "hot" in [a.name for m in listed if m.model_id == "first" for a in m.adapters]
        # The same adapter loaded explicitly on another model gives the same tokens.
        load_model(few_slots, "explicit")
        stub.LoadAdapter(pb.LoadAdapterRequest(model_id="explicit", adapter="hot"))
        assert generate(stub, "explicit", "hot", PROMPTS[1], 8) == got
        assert generate(stub, "first", "hot", PROMPTS[1], 8) == got and loads("first", "store") == 1
    finally:
        for m in ("first", "explicit"):
            stub.UnloadModel(pb.UnloadModelRequest(model_id=m))


def test_concurrent_requests_for_one_unloaded_adapter_cause_one_load(few_slots, tiny_tokenizer, peft_reference):
    stub, manager, fetches = few_slots["stub"], few_slots["manager"], few_slots["fetches"]
    manager.adapter_cache.forget_artifact(few_slots["artifact_id"])
    model, _ = load_model(few_slots, "herd")
    before = len(fetches.calls)
    fetches.hold()  # every request arrives while the one load is still fetching
    results: dict[int, list[int]] = {}
    barrier = threading.Barrier(8)

    def one(i: int) -> None:
        barrier.wait()
        results[i] = generate(stub, "herd", "gamma", PROMPTS[2], 5)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: model.adapters.waiting().get("gamma") == 8)
        fetches.release()
        for t in threads:
            t.join(60)
        expected = peft_reference.generate(tiny_tokenizer.encode(PROMPTS[2]), "gamma", 5)
        assert len(results) == 8 and all(r == expected for r in results.values())
        assert fetches.calls[before:] == ["adapters/gamma"] and loads("herd", "store") == 1
        # Eight requests, one load: each request counts under the tier its weights came from.
        assert requests_by_tier("herd", "store") == 8 and requests_by_tier("herd", "slot") == 0
        assert len(results) == 8 and generate(stub, "herd", "gamma", PROMPTS[2], 1)
        assert requests_by_tier("herd", "slot") == 1
        assert model.runtime.slots[model.runtime.adapter_names()["gamma"]].active_requests == 0
    finally:
        fetches.release()
        stub.UnloadModel(pb.UnloadModelRequest(model_id="herd"))


def test_a_loaded_adapter_never_waits_behind_a_cold_load(few_slots, tiny_tokenizer, peft_reference):
    # A cold adapter's store read runs in its own request's thread, before it is queued: while it is held,
    # the engine keeps stepping and requests for adapters in a slot (and the base model) are served.
    stub, manager, fetches = few_slots["stub"], few_slots["manager"], few_slots["fetches"]
    manager.adapter_cache.forget_artifact(few_slots["artifact_id"])
    model, _ = load_model(few_slots, "hot-first")
    result: dict[str, list[int]] = {}
    fetches.hold()
    cold = threading.Thread(target=lambda: result.setdefault("gamma", generate(stub, "hot-first", "gamma")))
    try:
        cold.start()
        wait_until(lambda: model.adapters.waiting().get("gamma") == 1)
        steps = model.engine.steps
        assert generate(stub, "hot-first", "beta") == peft_reference.generate(
            tiny_tokenizer.encode(PROMPTS[0]), "beta", 6)
        assert generate(stub, "hot-first", "") == peft_reference.generate(tiny_tokenizer.encode(PROMPTS[0]), "", 6)
        assert model.engine.steps > steps and "gamma" not in result  # served while the cold load waited
        fetches.release()
        cold.join(60)
        assert result["gamma"] == peft_reference.generate(tiny_tokenizer.encode(PROMPTS[0]), "gamma", 6)
    finally:
        fetches.release()
        stub.UnloadModel(pb.UnloadModelRequest(model_id="hot-first"))


def test_a_request_cancelled_while_its_adapter_loads_leaves_the_queue_and_no_count_on_the_slot(
        few_slots, tiny_tokenizer):
    # Queued before its load (no KV slot), cancelled meanwhile: the load still completes, and its count on the
    # slot is given back, so the adapter is idle (evictable) afterwards.
    from services.inference.engine import GenerationRequest
    from services.inference.sampling import SamplingParams

    manager, fetches = few_slots["manager"], few_slots["fetches"]
    manager.adapter_cache.forget_artifact(few_slots["artifact_id"])
    model, _ = load_model(few_slots, "cancel-loading")
    handles = []
    fetches.hold()
    request = GenerationRequest(tuple(tiny_tokenizer.encode(PROMPTS[0])), "gamma", SamplingParams(max_new_tokens=4),
                                request_id="leaving")
    submitter = threading.Thread(target=lambda: handles.append(model.engine.submit(request)))
    try:
        submitter.start()
        wait_until(lambda: model.adapters.waiting().get("gamma") == 1)
        waiting = list(model.engine.scheduler.waiting)
        assert [(s.request_id, s.lora_id, s.slot) for s in waiting] == [("leaving", None, None)]
        model.engine.cancel("leaving")
        wait_until(lambda: model.engine.num_active() == 0 and model.engine.scheduler.num_waiting == 0)
        fetches.release()
        submitter.join(60)
        (handle,) = handles
        assert handle.result().finish_reason.value == "cancelled"
        slot = model.runtime.adapter_names()["gamma"]
        assert model.runtime.slots[slot].active_requests == 0
    finally:
        fetches.release()
        manager.unload("cancel-loading")


def test_lru_idle_adapter_is_evicted_never_a_busy_one_and_comes_back_from_the_host_cache(
        few_slots, tiny_tokenizer, peft_reference):
    stub, manager, fetches = few_slots["stub"], few_slots["manager"], few_slots["fetches"]
    manager.adapter_cache.forget_artifact(few_slots["artifact_id"])
    model, gate = load_model(few_slots, "lru")
    try:
        hot_tokens = generate(stub, "lru", "hot")  # the free slot 2
        generate(stub, "lru", "beta")  # beta (slot 1) is now the more recently used
        generate(stub, "lru", "alpha")  # both idle: hot, the least recently used, goes
        assert loaded(model) == {"beta", "alpha"}
        assert REGISTRY.get_sample_value("loraflow_inference_adapter_evictions_total", {"model": "lru"}) == 1

        # alpha has a request in flight, beta is idle: gamma takes beta's slot, never alpha's.
        gate.close()
        busy = start(stub, "lru", "alpha")
        wait_until(lambda: model.engine.num_active() == 1)
        result: dict[str, list[int]] = {}
        waiter = threading.Thread(target=lambda: result.setdefault("ids", generate(stub, "lru", "gamma")))
        waiter.start()
        wait_until(lambda: "gamma" in loaded(model))  # the load runs in submit, before any step
        assert loaded(model) == {"alpha", "gamma"}
        gate.open()
        waiter.join(30)
        assert result["ids"] == peft_reference.generate(tiny_tokenizer.encode(PROMPTS[0]), "gamma", 6)
        list(busy)

        # hot comes back: a memory copy from the host cache, no store fetch, the same tokens.
        fetched = len(fetches.calls)
        assert generate(stub, "lru", "hot") == hot_tokens
        assert len(fetches.calls) == fetched and loads("lru", "host_cache") == 1
        # beta, compiled into the artifact and evicted above, comes back from the host cache too.
        assert generate(stub, "lru", "beta") == peft_reference.generate(tiny_tokenizer.encode(PROMPTS[0]), "beta", 6)
        assert len(fetches.calls) == fetched and loads("lru", "host_cache") == 2
        assert requests_by_tier("lru", "host_cache") == 2
    finally:
        gate.open()
        stub.UnloadModel(pb.UnloadModelRequest(model_id="lru"))


def stub_loaded(stub, model_id: str) -> set[str]:
    models = stub.ListModels(pb.ListModelsRequest()).models
    return {a.name for m in models if m.model_id == model_id for a in m.adapters}


def test_all_slots_busy_waits_then_resource_exhausted_or_is_served_when_one_frees(few_slots):
    stub = few_slots["stub"]
    model, gate = load_model(few_slots, "full")
    try:
        generate(stub, "full", "hot")
        assert loaded(model) == {"beta", "hot"}
        gate.close()
        calls = [start(stub, "full", "beta"), start(stub, "full", "hot")]
        wait_until(lambda: model.engine.num_active() == 2)
        started = time.monotonic()
        code, details, meta = code_of(lambda: generate(stub, "full", "gamma"))
        waited = time.monotonic() - started
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "adapter slots" in details and meta["adapter_slots"] == "2" and meta["adapter"] == "gamma"
        assert waited >= ADAPTER_WAIT_S * 0.9
        assert loaded(model) == {"beta", "hot"}

        # The same wait ends well when a slot goes idle within the bound.
        result: dict[str, list[int]] = {}
        waiter = threading.Thread(target=lambda: result.setdefault("ids", generate(stub, "full", "gamma")))
        waiter.start()
        time.sleep(0.2)
        gate.open()  # the busy requests finish; their slots go idle
        waiter.join(30)
        assert len(result.get("ids", [])) == 6 and "gamma" in loaded(model)
        for call in calls:
            list(call)
    finally:
        gate.open()
        stub.UnloadModel(pb.UnloadModelRequest(model_id="full"))


def test_bad_adapters_fail_with_the_loadadapter_errors(few_slots):
    stub, registry = few_slots["stub"], few_slots["registry"]
    load_model(few_slots, "bad")
    try:
        def gen(adapter):
            return lambda: generate(stub, "bad", adapter)

        # r=16 into max_rank=8: the very error LoadAdapter gives, and nothing is left in a slot.
        code, details, meta = code_of(gen("big"))
        explicit = code_of(lambda: stub.LoadAdapter(pb.LoadAdapterRequest(model_id="bad", adapter="big")))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and meta["field"] == "r" and "max_rank=8" in details
        assert (code, details) == explicit[:2]
        assert stub_loaded(stub, "bad") == {"beta"}
        assert few_slots["manager"].get("bad").runtime.free_adapter_slots() == 1

        code, details, meta = code_of(gen("ghost"))
        assert code == grpc.StatusCode.NOT_FOUND and meta["field"] == "adapter" and "ghost" in details
        code, _, meta = code_of(gen("\x00loading:hot"))
        assert code == grpc.StatusCode.NOT_FOUND and meta["field"] == "adapter"
        code, _, meta = code_of(gen("no spaces/or slashes"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and meta["field"] == "adapter"
        # A record planted in Redis pointing outside the store is refused before any read.
        registry.put_adapter(AdapterRecord(name="planted", uri="/etc", base_model="m"))
        code, _, meta = code_of(gen("planted"))
        assert code == grpc.StatusCode.PERMISSION_DENIED and meta["field"] == "adapter"
        # A batch naming an unknown adapter is refused before any of it is queued.
        code, _, meta = code_of(lambda: stub.GenerateBatch(pb.GenerateBatchRequest(requests=[
            pb.GenerateRequest(model_id="bad", prompt="hi", adapter="hot"),
            pb.GenerateRequest(model_id="bad", prompt="hi", adapter="ghost")])))
        assert code == grpc.StatusCode.NOT_FOUND and meta["field"] == "requests[1].adapter"
        # The model serves on, and loads registered adapters on first use inside a batch too.
        got = list(stub.GenerateBatch(pb.GenerateBatchRequest(requests=[
            pb.GenerateRequest(model_id="bad", prompt="hi", adapter=a, sampling=pb.SamplingParams(max_new_tokens=3))
            for a in ("hot", "beta", "")])))
        assert {r.index for r in got if r.response.finish_reason} == {0, 1, 2}
    finally:
        stub.UnloadModel(pb.UnloadModelRequest(model_id="bad"))
