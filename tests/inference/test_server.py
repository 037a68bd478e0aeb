"""InferenceService end to end on loopback: a real store, real Redis registry, real gRPC server."""

from __future__ import annotations

import threading
import time

import grpc
import onnxruntime
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from loraflow.jobs.registry import AdapterRecord
from loraflow.server.grpc_server import GrpcServer, error_info
from loraflow.v1 import inference_pb2 as pb
from loraflow.v1 import inference_pb2_grpc
from services.inference.model_manager import ModelManager
from services.inference.server import SERVICE_NAME, InferenceServicer
from tests.inference.conftest import PROMPTS
from tests.support.held_steps import steps_held_after_first


@pytest.fixture(scope="module")
def service(published_store, input_policy):
    root, store, registry = published_store.root, published_store.store, published_store.registry
    server = GrpcServer(listen="127.0.0.1:0", service_names=[SERVICE_NAME])
    manager = ModelManager(store=store, registry=registry, cache_dir=root / "cache",
                           on_change=lambda n: server.set_serving(n > 0), inputs=input_policy)
    server.add(inference_pb2_grpc.add_InferenceServiceServicer_to_server, InferenceServicer(manager))
    port = server.start()
    server.set_serving(False)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield {"stub": inference_pb2_grpc.InferenceServiceStub(channel), "channel": channel, "manager": manager,
           "artifact_id": published_store.artifact_id}
    channel.close()
    server.stop(grace=0)
    manager.close()


def code_of(call) -> tuple[grpc.StatusCode, str, dict]:
    with pytest.raises(grpc.RpcError) as err:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, pb.Model):
            list(result)
    info = error_info(err.value)
    return err.value.code(), err.value.details(), dict(info.metadata) if info else {}


def test_lifecycle_generate_batch_adapters_and_errors(service, tiny_tokenizer, peft_reference):
    stub, health = service["stub"], health_pb2_grpc.HealthStub(service["channel"])
    check = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
    assert health.Check(check).status == health_pb2.HealthCheckResponse.NOT_SERVING

    assert code_of(lambda: stub.LoadArtifact(pb.LoadArtifactRequest(artifact_id="nope")))[0] == \
        grpc.StatusCode.NOT_FOUND
    code, details, _ = code_of(lambda: stub.LoadArtifact(pb.LoadArtifactRequest(
        artifact_id=service["artifact_id"], device="ai100")))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "ai100" in details
    code, _, meta = code_of(lambda: stub.LoadArtifact(pb.LoadArtifactRequest(
        artifact_id=service["artifact_id"], device="tpu")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and meta["field"] == "device"
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        code, details, _ = code_of(lambda: stub.LoadArtifact(pb.LoadArtifactRequest(
            artifact_id=service["artifact_id"], device="cuda")))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "CUDAExecutionProvider" in details

    model = stub.LoadArtifact(pb.LoadArtifactRequest(artifact_id=service["artifact_id"], model_id="m",
                                                     num_threads=1))
    assert model.model_id == "m" and model.batch_slots == 4 and model.ctx_len == 64 and model.device == "cpu"
    assert [a.name for a in model.adapters] == ["alpha", "beta", "gamma"] and model.free_adapter_slots == 1
    assert model.memory_bytes > 0
    assert health.Check(check).status == health_pb2.HealthCheckResponse.SERVING
    assert [m.model_id for m in stub.ListModels(pb.ListModelsRequest()).models] == ["m"]

    # Generate: streamed chunks, then a final one with reason and usage.
    prompt_ids = tiny_tokenizer.encode(PROMPTS[1])
    chunks = list(stub.Generate(pb.GenerateRequest(model_id="m", prompt=PROMPTS[1], adapter="beta",
                                                   sampling=pb.SamplingParams(max_new_tokens=10))))
    ids = [t for c in chunks for t in c.token_ids]
    assert ids == peft_reference.generate(prompt_ids, "beta", 10)
    assert "".join(c.text for c in chunks) == tiny_tokenizer.decode(ids)
    assert chunks[-1].finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
    assert chunks[-1].usage.prompt_tokens == len(prompt_ids) and chunks[-1].usage.completion_tokens == len(ids)
    assert chunks[0].request_id and all(c.request_id == chunks[0].request_id for c in chunks)

    # Chat: the template is applied, then generation proceeds.
    chat = list(stub.Generate(pb.GenerateRequest(model_id="m", prompt="hello", chat=True,
                                                 sampling=pb.SamplingParams(max_new_tokens=3))))
    assert chat[-1].usage.prompt_tokens == len(tiny_tokenizer.encode_chat("hello"))

    # GenerateBatch: QEfficient's prompt_to_adapter_mapping, results tagged by index.
    adapters = ["", "alpha", "beta", "gamma", "alpha"]
    batch = pb.GenerateBatchRequest(requests=[
        pb.GenerateRequest(model_id="m", prompt_token_ids=pb.TokenIds(ids=tiny_tokenizer.encode(PROMPTS[i % 4])),
                           adapter=a, sampling=pb.SamplingParams(max_new_tokens=8))
        for i, a in enumerate(adapters)])
    got: dict[int, list[int]] = {}
    finals = set()
    for item in stub.GenerateBatch(batch):
        got.setdefault(item.index, []).extend(item.response.token_ids)
        if item.response.finish_reason:
            finals.add(item.index)
    assert finals == set(range(5))
    for i, a in enumerate(adapters):
        assert got[i] == peft_reference.generate(tiny_tokenizer.encode(PROMPTS[i % 4]), a, 8), i

    # Hot-add a registered adapter; it serves at once.
    model = stub.LoadAdapter(pb.LoadAdapterRequest(model_id="m", adapter="hot"))
    assert "hot" in [a.name for a in model.adapters] and model.free_adapter_slots == 0
    hot = list(stub.Generate(pb.GenerateRequest(model_id="m", prompt=PROMPTS[0], adapter="hot",
                                                sampling=pb.SamplingParams(max_new_tokens=6))))
    assert [t for c in hot for t in c.token_ids] == peft_reference.generate(
        tiny_tokenizer.encode(PROMPTS[0]), "hot", 6)

    # Canonical error codes naming the field.
    def gen(**kw):
        request = {"model_id": "m", "prompt": "hi", **kw}
        return lambda: stub.Generate(pb.GenerateRequest(**request))

    assert code_of(gen(model_id="ghost"))[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(gen(adapter="ghost"))[0] == grpc.StatusCode.NOT_FOUND
    code, details, meta = code_of(gen(sampling=pb.SamplingParams(temperature=-1)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and meta["field"] == "sampling.temperature"
    code, _, meta = code_of(gen(sampling=pb.SamplingParams(top_p=1.5)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and meta["field"] == "sampling.top_p"
    code, details, meta = code_of(gen(prompt=" ".join(["fox"] * 200)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "64" in details and meta["ctx_len"] == "64"
    bad_batch = pb.GenerateBatchRequest(requests=[pb.GenerateRequest(model_id="m", prompt="hi"),
                                                  pb.GenerateRequest(model_id="m", prompt="hi",
                                                                     sampling=pb.SamplingParams(top_k=-2))])
    code, _, meta = code_of(lambda: stub.GenerateBatch(bad_batch))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and meta["field"] == "requests[1].sampling.top_k"
    assert code_of(lambda: stub.LoadAdapter(pb.LoadAdapterRequest(model_id="m", adapter="ghost")))[0] == \
        grpc.StatusCode.NOT_FOUND
    # Confined inputs: outside the allowed roots, kernel files, another bucket, a record planted in Redis.
    service["manager"].registry.put_adapter(AdapterRecord(name="planted", uri="/var/tmp", base_model="m"))
    for adapter in ("/var/tmp", "/proc/self", "file:///etc", "s3://someone-elses-bucket/a", "planted"):
        code, _, meta = code_of(lambda a=adapter: stub.LoadAdapter(pb.LoadAdapterRequest(model_id="m", adapter=a)))
        assert code == grpc.StatusCode.PERMISSION_DENIED and meta["field"] == "adapter", adapter

    # A client that goes away cancels its request: the slot frees and the request counts as cancelled.
    engine = service["manager"].get("m").engine
    labels = {"model": "m", "adapter": "<base>", "finish_reason": "cancelled"}
    before = REGISTRY.get_sample_value("loraflow_inference_requests_total", labels) or 0.0
    # The tiny model could finish its 60 tokens before the client's cancel reaches the engine on a loaded host
    # (it then counts as "length"): after its first step the engine waits until the cancel has arrived.
    real_cancel, cancelled = engine.cancel, threading.Event()

    def cancel(request_id):
        real_cancel(request_id)
        cancelled.set()

    engine.cancel = cancel
    try:
        with steps_held_after_first(engine.runtime, cancelled):
            call = stub.Generate(pb.GenerateRequest(model_id="m", prompt="hi", sampling=pb.SamplingParams(
                max_new_tokens=60, ignore_eos=True)))
            next(call)
            call.cancel()
            assert cancelled.wait(30), "the client's cancel never reached the engine"
        deadline = time.monotonic() + 5
        while engine.num_active() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.cancel = real_cancel
    assert engine.num_active() == 0 and engine.scheduler.num_free_slots == 4
    assert REGISTRY.get_sample_value("loraflow_inference_requests_total", labels) == before + 1

    removed = stub.UnloadModel(pb.UnloadModelRequest(model_id="m")).model
    assert removed.model_id == "m"
    assert health.Check(check).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert code_of(lambda: stub.UnloadModel(pb.UnloadModelRequest(model_id="m")))[0] == grpc.StatusCode.NOT_FOUND


def _broken_adapter(source, out, case):
    import shutil
    import struct

    shutil.copytree(source, out)
    weights, config = out / "adapter_model.safetensors", out / "adapter_config.json"
    if case == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif case == "header_len_2_40":
        weights.write_bytes(struct.pack("<Q", 2**40) + weights.read_bytes()[8:])
    elif case == "config_list":
        config.write_text("[1, 2, 3]")
    elif case == "config_not_utf8":
        config.write_bytes(b'{"r": "\xff\xfe"}')
    elif case == "alpha_inf":
        config.write_text(config.read_text().replace('"lora_alpha": 12', '"lora_alpha": 1e400'))
    return out


def test_hostile_requests_fail_alone_with_invalid_argument(service, tiny_adapters, tiny_tokenizer, peft_reference,
                                                           tmp_path):
    stub = service["stub"]
    code, _, meta = code_of(lambda: stub.LoadArtifact(pb.LoadArtifactRequest(
        artifact_id=service["artifact_id"], model_id="bounds", num_threads=100_000)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and meta["field"] == "num_threads"
    stub.LoadArtifact(pb.LoadArtifactRequest(artifact_id=service["artifact_id"], model_id="bounds", num_threads=1))
    try:
        # Malformed adapter files: INVALID_ARGUMENT naming the file, never INTERNAL.
        for case, file in (("truncated", "adapter_model.safetensors"), ("header_len_2_40", "adapter_model.safetensors"),
                           ("config_list", "adapter_config.json"), ("config_not_utf8", "adapter_config.json"),
                           ("alpha_inf", "lora_alpha")):
            path = _broken_adapter(tiny_adapters["hot"], tmp_path / case, case)
            name = f"bad-{case}".replace("_", "-")
            code, details, meta = code_of(lambda p=path, n=name: stub.LoadAdapter(pb.LoadAdapterRequest(
                model_id="bounds", adapter=str(p), name=n)))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (case, code, details)
            assert file in details, (case, details)

        def gen(**kw):
            return lambda: stub.Generate(pb.GenerateRequest(**{"model_id": "bounds", "prompt": "hi", **kw}))

        # An adapter that passes every check but overflows in the graph: its stream alone ends with
        # FAILED_PRECONDITION naming the request and adapter; the model serves on.
        from tests.inference.test_engine import _overflowing_adapter

        boom = _overflowing_adapter(tiny_adapters["hot"], tmp_path / "boom")
        stub.LoadAdapter(pb.LoadAdapterRequest(model_id="bounds", adapter=str(boom), name="boom"))
        code, details, meta = code_of(gen(adapter="boom", request_id="nan-1",
                                          sampling=pb.SamplingParams(temperature=1.0, seed=3)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "nan-1" in details and "'boom'" in details
        assert meta["adapter"] == "boom"
        prompt2 = tiny_tokenizer.encode(PROMPTS[1])
        after = list(stub.Generate(pb.GenerateRequest(model_id="bounds", prompt_token_ids=pb.TokenIds(ids=prompt2),
                                                      sampling=pb.SamplingParams(max_new_tokens=6))))
        assert [t for c in after for t in c.token_ids] == peft_reference.generate(prompt2, "", 6)

        for sampling, field in ((pb.SamplingParams(temperature=1e-320), "sampling.temperature"),
                                (pb.SamplingParams(repetition_penalty=1e-320), "sampling.repetition_penalty"),
                                (pb.SamplingParams(temperature=float("nan")), "sampling.temperature"),
                                (pb.SamplingParams(max_new_tokens=2**31 - 1), "sampling.max_new_tokens"),
                                (pb.SamplingParams(stop=["x" * 100_000]), "sampling.stop")):
            code, details, meta = code_of(gen(sampling=sampling))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and meta["field"] == field, (field, details)
        code, details, meta = code_of(gen(request_id="r" * 1_000_000))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and meta["field"] == "request_id" and len(details) < 300
        code, _, meta = code_of(lambda: stub.GenerateBatch(pb.GenerateBatchRequest(requests=[
            pb.GenerateRequest(model_id="bounds", prompt="hi"),
            pb.GenerateRequest(model_id="bounds", prompt="hi", request_id="a\nb")])))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and meta["field"] == "requests[1].request_id"
        # An unknown adapter late in a batch is refused before any of the batch is queued.
        before = REGISTRY.get_sample_value("loraflow_inference_requests_total",
                                           {"model": "bounds", "adapter": "<base>", "finish_reason": "cancelled"})
        code, _, meta = code_of(lambda: stub.GenerateBatch(pb.GenerateBatchRequest(requests=[
            *[pb.GenerateRequest(model_id="bounds", prompt="hi")] * 3,
            pb.GenerateRequest(model_id="bounds", prompt="hi", adapter="\x00loading:x")])))
        assert code == grpc.StatusCode.NOT_FOUND and meta["field"] == "requests[3].adapter"
        assert REGISTRY.get_sample_value("loraflow_inference_requests_total",
                                         {"model": "bounds", "adapter": "<base>", "finish_reason": "cancelled"}) \
            == before

        # The documented maximum batch (256) succeeds on an idle server whose queue bound is 64;
        # one more is refused naming the count.
        engine = service["manager"].get("bounds").engine
        assert engine.scheduler.max_waiting == 64
        prompt = tiny_tokenizer.encode(PROMPTS[2])
        expected = peft_reference.generate(prompt, "", 2)
        one = pb.GenerateRequest(model_id="bounds", prompt_token_ids=pb.TokenIds(ids=prompt),
                                 sampling=pb.SamplingParams(max_new_tokens=2, ignore_eos=True))
        tokens: dict[int, list[int]] = {}
        finished = set()
        for r in stub.GenerateBatch(pb.GenerateBatchRequest(requests=[one] * 256), timeout=300):
            tokens.setdefault(r.index, []).extend(r.response.token_ids)
            if r.response.finish_reason:
                finished.add(r.index)
        assert finished == set(range(256)) and all(tokens[i] == expected for i in range(256))
        code, details, meta = code_of(lambda: stub.GenerateBatch(pb.GenerateBatchRequest(requests=[one] * 257)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and meta["field"] == "requests" and "257" in details
    finally:
        stub.UnloadModel(pb.UnloadModelRequest(model_id="bounds"))
