"""LoadArtifact and LoadAdapter against the inference process's memory budget, on a real InferenceService
(real gRPC on loopback, a real Redis registry, a real file store, the compiler's tiny artifact): an artifact
whose KV cache and banks do not fit beside the loaded models is refused before it is downloaded, naming
artifact_id, the estimate and the limit; an oversized adapter is refused before it is fetched; a model
already serving keeps serving meanwhile."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from loraflow.jobs.registry import AdapterRecord
from loraflow.options.budget import ResourceBudget, serving_estimate
from loraflow.server.grpc_server import GrpcServer, error_info
from loraflow.v1 import inference_pb2 as pb
from loraflow.v1 import inference_pb2_grpc
from services.inference.adapter_slots import AUTO_SLOTS_SHARE, slot_bytes
from services.inference.model_manager import ModelManager, adapter_limit
from services.inference.server import SERVICE_NAME, InferenceServicer

CACHE_CAP = 1 << 20  # the host adapter cache's cap counts against the budget too


@pytest.fixture
def serve(published_store, input_policy, tmp_path):
    """serve(budget_bytes) -> (stub, manager) of a fresh server over the published tiny artifact."""
    opened = []

    def make(budget_bytes: int, adapter_slots=None):
        server = GrpcServer(listen="127.0.0.1:0", service_names=[SERVICE_NAME])
        manager = ModelManager(store=published_store.store, registry=published_store.registry,
                               cache_dir=tmp_path / f"cache{len(opened)}", inputs=input_policy,
                               adapter_cache_bytes=CACHE_CAP, adapter_slots=adapter_slots,
                               budget=ResourceBudget(budget_bytes, f"--memory-budget {budget_bytes}"))
        server.add(inference_pb2_grpc.add_InferenceServiceServicer_to_server, InferenceServicer(manager))
        port = server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        opened.append((server, manager, channel))
        return inference_pb2_grpc.InferenceServiceStub(channel), manager

    yield make
    for server, manager, channel in opened:
        channel.close()
        server.stop(grace=0)
        manager.close()


def _fails(call):
    with pytest.raises(grpc.RpcError) as err:
        result = call()
        if not isinstance(result, pb.Model):
            list(result)
    return err.value.code(), error_info(err.value), err.value.details()


def test_the_estimate_is_what_the_runtime_allocates(tiny_artifact, serve, published_store):
    _, manifest = tiny_artifact
    stub, manager = serve(1 << 34)
    stub.LoadArtifact(pb.LoadArtifactRequest(artifact_id=published_store.artifact_id, model_id="m", num_threads=1))
    model = manager.get("m")
    assert model.memory.total == model.runtime.memory_bytes() == serving_estimate(manifest).total


def test_an_artifact_over_the_budget_is_refused_before_it_is_downloaded(tiny_artifact, serve, published_store):
    _, manifest = tiny_artifact
    needed = serving_estimate(manifest).total
    stub, manager = serve(needed + CACHE_CAP - 1)
    code, info, details = _fails(lambda: stub.LoadArtifact(pb.LoadArtifactRequest(
        artifact_id=published_store.artifact_id, model_id="m")))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and info.reason == "OVER_MEMORY_BUDGET", details
    assert info.metadata["field"] == "artifact_id" and info.metadata["value"] == published_store.artifact_id
    assert info.metadata["estimate_bytes"] == str(needed) and int(info.metadata["limit_bytes"]) == needed - 1
    assert "KV cache" in details and "adapter banks" in details and "--adapter-cache-bytes" in details
    assert not (manager.cache.root / published_store.artifact_id).exists()  # nothing was fetched
    assert manager.list() == []


def test_a_second_model_must_fit_beside_the_first_and_fits_once_it_is_unloaded(tiny_artifact, serve,
                                                                                published_store):
    _, manifest = tiny_artifact
    stub, manager = serve(int(1.5 * serving_estimate(manifest).total) + CACHE_CAP)
    artifact = published_store.artifact_id
    stub.LoadArtifact(pb.LoadArtifactRequest(artifact_id=artifact, model_id="first", num_threads=1))
    generated: list[int] = []
    stop = threading.Event()

    def keep_generating() -> None:  # a well-behaved tenant of the loaded model
        while not stop.is_set():
            started = time.monotonic()
            list(stub.Generate(pb.GenerateRequest(model_id="first", prompt="add 2 and 3 ->",
                                                  sampling=pb.SamplingParams(max_new_tokens=4)), timeout=30))
            generated.append(time.monotonic() - started)

    tenant = threading.Thread(target=keep_generating)
    tenant.start()
    try:
        for _ in range(20):
            code, info, details = _fails(lambda: stub.LoadArtifact(pb.LoadArtifactRequest(
                artifact_id=artifact, model_id="second")))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "1 loaded model(s)" in details, details
    finally:
        stop.set()
        tenant.join(60)
    assert generated and max(generated) < 10.0, generated
    stub.UnloadModel(pb.UnloadModelRequest(model_id="first"))
    assert stub.LoadArtifact(pb.LoadArtifactRequest(artifact_id=artifact, model_id="second",
                                                    num_threads=1)).model_id == "second"


def test_an_oversized_adapter_is_refused_before_it_is_fetched(tiny_artifact, tiny_adapters, serve, published_store,
                                                              tmp_path):
    _, manifest = tiny_artifact
    stub, manager = serve(1 << 34)
    stub.LoadArtifact(pb.LoadArtifactRequest(artifact_id=published_store.artifact_id, model_id="m", num_threads=1))
    limit = adapter_limit(manifest)
    bloated = tmp_path / "bloated"
    bloated.mkdir()
    for f in tiny_adapters["hot"].iterdir():
        (bloated / f.name).write_bytes(f.read_bytes())
    with open(bloated / "padding.bin", "wb") as f:
        f.truncate(limit + 1)
    uri = published_store.store.publish_dir("adapters/bloated", bloated)
    published_store.registry.put_adapter(AdapterRecord(name="bloated", uri=uri, base_model="m"))
    try:
        for spec in (uri, "bloated"):
            code, info, details = _fails(lambda spec=spec: stub.LoadAdapter(pb.LoadAdapterRequest(
                model_id="m", adapter=spec)))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and info.metadata["field"] == "adapter", details
            assert int(info.metadata["estimate_bytes"]) > limit and info.metadata["limit_bytes"] == str(limit)
        # Named by a request on first use: the same refusal, and the model keeps serving others.
        code, info, _ = _fails(lambda: stub.Generate(pb.GenerateRequest(
            model_id="m", prompt="hi", adapter="bloated", sampling=pb.SamplingParams(max_new_tokens=2))))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and info.metadata["field"] == "adapter"
        assert not (manager.cache_dir / "adapters").exists() or not any((manager.cache_dir / "adapters").iterdir())
        assert list(stub.Generate(pb.GenerateRequest(model_id="m", prompt="hi", adapter="hot",
                                                     sampling=pb.SamplingParams(max_new_tokens=2))))
    finally:
        published_store.registry.delete_adapter("bloated")
        published_store.store.delete("adapters/bloated")


def test_explicit_adapter_slots_over_the_budget_are_refused_naming_the_field(tiny_artifact, serve, published_store):
    _, manifest = tiny_artifact
    compiled = serving_estimate(manifest).total
    slots = 64
    needed = serving_estimate(manifest, adapter_slots=slots).total
    assert needed > compiled
    stub, manager = serve(compiled + CACHE_CAP + (needed - compiled) // 2, adapter_slots=slots)
    code, info, details = _fails(lambda: stub.LoadArtifact(pb.LoadArtifactRequest(
        artifact_id=published_store.artifact_id, model_id="m")))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and info.reason == "OVER_MEMORY_BUDGET", details
    assert info.metadata["field"] == "adapter_slots" and info.metadata["value"] == str(slots), info.metadata
    assert info.metadata["estimate_bytes"] == str(needed)
    assert int(info.metadata["limit_bytes"]) == compiled + (needed - compiled) // 2
    assert "adapter banks" in details and manager.list() == []


def test_auto_adapter_slots_fill_their_share_of_the_budget_and_the_estimate_is_what_is_allocated(
        tiny_artifact, serve, published_store):
    _, manifest = tiny_artifact
    fixed = serving_estimate(manifest, adapter_slots=0).total
    want = 20
    budget = CACHE_CAP + fixed + int((want + 0.5) * slot_bytes(manifest) / AUTO_SLOTS_SHARE)
    stub, manager = serve(budget, adapter_slots="auto")
    loaded = stub.LoadArtifact(pb.LoadArtifactRequest(artifact_id=published_store.artifact_id, model_id="m",
                                                      num_threads=1))
    model = manager.get("m")
    assert model.runtime.adapter_slots == want > manifest.adapter_slots
    assert loaded.free_adapter_slots == want - len(manifest.adapters)
    assert model.memory.total == model.runtime.memory_bytes() == serving_estimate(manifest, adapter_slots=want).total
