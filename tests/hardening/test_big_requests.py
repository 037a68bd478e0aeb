"""Class 1 of issue 20: one big request must cost its own caller a refusal, never the others their latency.

gRPC request messages are bounded per method before they are parsed (1 MiB like the HTTP body, Upload
chunks on a limit of their own); a prompt is measured in bytes against what the context can hold before
it is tokenized; tokenizing runs without the GIL; detokenizing is the consumer's work, not the engine
step's; a Generate whose client left is never queued.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from loraflow.security.limits import ServerLimits
from loraflow.server.grpc_server import error_info
from loraflow.v1 import inference_pb2 as pb
from loraflow.v1 import jobs_pb2, jobs_pb2_grpc, storage_pb2, storage_pb2_grpc
from services.inference.tokenization import TextTokenizer
from tests.hardening.conftest import CTX_LEN, MODEL_ID
from tests.hardening.probes import grpc_health_probe, http_probe

MiB = 1 << 20
LIMITS = ServerLimits()


def _error(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def _generate(stack, prompt: str, *, max_new_tokens: int = 4, timeout: float = 60):
    return list(stack.stub.Generate(pb.GenerateRequest(model_id=MODEL_ID, prompt=prompt,
                                                       sampling=pb.SamplingParams(max_new_tokens=max_new_tokens)),
                                    timeout=timeout))


def test_oversized_generate_requests_are_refused_naming_the_field_while_others_are_served(inference_stack):
    stack = inference_stack
    big = "x" * (3 * MiB)  # over the 1 MiB request limit, under the transport's cap
    errors: list[grpc.RpcError] = []

    def hostile() -> None:
        for _ in range(3):
            errors.append(_error(lambda: _generate(stack, big)))

    with grpc_health_probe(stack.grpc.address) as probe:
        threads = [threading.Thread(target=hostile) for _ in range(4)]
        for t in threads:
            t.start()
        served = [_generate(stack, "the quick brown fox") for _ in range(5)]  # a tenant on the side
        for t in threads:
            t.join(120)
    probe.assert_unharmed()
    assert all(chunks[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED for chunks in served)
    assert len(errors) == 12
    for err in errors:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = error_info(err)
        assert info.reason == "REQUEST_TOO_LARGE" and info.metadata["field"] == "prompt"
        assert info.metadata["limit_bytes"] == str(LIMITS.max_request_bytes)
        assert "--max-request-bytes" in err.details() and "prompt" in err.details()
    # Far beyond every limit: the transport refuses it before it is buffered, still a canonical status.
    assert _error(lambda: _generate(stack, "y" * (16 * MiB))).code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_upload_chunks_keep_their_own_limit(queue_stacks):
    """A full 1 MiB chunk (over max_request_bytes once framed) still uploads; other RPCs stay at 1 MiB."""
    import hashlib

    channel = queue_stacks["trainer"].channel
    data = bytes(range(256)) * (4 * 4096)  # 4 MiB: four full chunks
    digest = hashlib.sha256(data).hexdigest()

    def messages():
        yield storage_pb2.UploadRequest(header=storage_pb2.UploadHeader(
            kind=storage_pb2.DATA_KIND_MODEL, path="weights.bin", size=len(data), sha256=digest))
        for start in range(0, len(data), MiB):
            yield storage_pb2.UploadRequest(chunk=data[start:start + MiB])

    done = storage_pb2_grpc.StorageServiceStub(channel).Upload(messages(), timeout=60)
    assert done.sha256 == digest and done.size == len(data)
    err = _error(lambda: jobs_pb2_grpc.JobServiceStub(channel).GetJob(
        jobs_pb2.GetJobRequest(job_id="j" * (MiB + 10)), timeout=10))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error_info(err).metadata["field"] == "job_id"


def test_a_malformed_request_message_is_invalid_argument_not_internal(inference_stack):
    raw = inference_stack.channel.unary_unary("/loraflow.v1.InferenceService/ListModels",
                                              request_serializer=None, response_deserializer=None)
    err = _error(lambda: raw(b"\xff\xff\xff", timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err).reason == "MALFORMED_REQUEST" and "ListModelsRequest" in err.details()
    # A string field holding bytes that are not UTF-8 (protobuf refuses to parse it).
    bad_utf8 = b"\x0a\x02\xc3\x28"  # field 1 (model_id), 2 bytes, an invalid sequence
    err = _error(lambda: inference_stack.channel.unary_unary("/loraflow.v1.InferenceService/UnloadModel")(
        bad_utf8, timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_prompt_the_context_cannot_hold_is_refused_before_tokenizing(inference_stack):
    stack = inference_stack
    model = stack.manager.get(MODEL_ID)
    tokenizer = model.tokenizer
    limit = tokenizer.max_prompt_bytes(CTX_LEN - 1)
    calls = []
    real_encode = tokenizer.encode
    tokenizer.encode = lambda *a, **k: (calls.append(len(a[0])), real_encode(*a, **k))[1]
    try:
        err = _error(lambda: _generate(stack, "z" * (limit + 1)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = error_info(err)
        assert info.metadata["field"] == "prompt" and info.metadata["max_prompt_bytes"] == str(limit)
        assert f"{limit + 1} bytes" in err.details() and f"{CTX_LEN} tokens" in err.details()
        err = _error(lambda: list(stack.stub.Generate(pb.GenerateRequest(model_id=MODEL_ID, prompt="z" * (limit + 1),
                                                                         chat=True), timeout=30)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(err).metadata["field"] == "prompt"
        assert calls == []  # refused on its size alone
        assert _generate(stack, "the quick brown fox")[-1].usage.completion_tokens == 4
        assert calls, "a prompt that fits is tokenized"
    finally:
        tokenizer.encode = real_encode


def test_http_prompts_are_measured_before_tokenizing(inference_stack):
    import http.client
    import json

    stack = inference_stack
    limit = stack.manager.get(MODEL_ID).tokenizer.max_prompt_bytes(CTX_LEN - 1)

    def post(path: str, body: dict) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", stack.http.port, timeout=30)
        try:
            conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    status, body = post("/v1/completions", {"model": MODEL_ID, "prompt": "é" * limit})
    assert status == 400 and body["error"]["param"] == "prompt" and "bytes" in body["error"]["message"]
    status, body = post("/v1/chat/completions", {"model": MODEL_ID, "messages": [
        {"role": "user", "content": "a" * (limit // 2)}, {"role": "user", "content": "b" * (limit // 2 + 2)}]})
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = post("/v1/completions", {"model": MODEL_ID, "prompt": list(range(CTX_LEN))})
    assert status == 400 and body["error"]["param"] == "prompt" and "tokens" in body["error"]["message"]
    status, body = post("/v1/completions", {"model": MODEL_ID, "prompt": "the quick", "max_tokens": 2})
    assert status == 200 and body["usage"]["completion_tokens"] == 2


def test_tokenizing_a_long_text_leaves_other_threads_running(tiny_llama):
    tokenizer = TextTokenizer(tiny_llama)
    text = "héllo wörld, the quick brown fox jumps over the lazy dog. " * 30_000  # ~1.8 MB
    gaps: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        last = time.monotonic()
        while not stop.is_set():
            time.sleep(0.001)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = threading.Thread(target=tick)
    ticker.start()
    time.sleep(0.05)
    started = time.monotonic()
    ids = tokenizer.encode(text)
    elapsed = time.monotonic() - started
    stop.set()
    ticker.join()
    assert len(ids) > 100_000
    # Holding the GIL, the ticker would stall for the whole encode; without it, for scheduling noise only.
    assert max(gaps) < max(0.2, elapsed / 2), f"a thread stalled {max(gaps):.2f}s during a {elapsed:.2f}s encode"
    # Long decodes take the GIL-free batch path and say the same as the single call.
    assert tokenizer.decode(ids[:5000]) == tokenizer._tok.decode(ids[:5000], skip_special_tokens=True)
    assert tokenizer.decode(ids[:5000]).startswith("héllo wörld, the quick")


def test_detokenizing_runs_on_the_consumer_thread_never_the_engine_step(inference_stack):
    model = inference_stack.manager.get(MODEL_ID)
    tokenizer = model.tokenizer
    threads: set[str] = set()
    real_decode = tokenizer.decode
    tokenizer.decode = lambda *a, **k: (threads.add(threading.current_thread().name), real_decode(*a, **k))[1]
    try:
        chunks = list(inference_stack.stub.Generate(pb.GenerateRequest(
            model_id=MODEL_ID, prompt="the quick brown fox",
            sampling=pb.SamplingParams(max_new_tokens=12, ignore_eos=True, stop=["never-appears-here"])), timeout=60))
    finally:
        tokenizer.decode = real_decode
    assert chunks[-1].usage.completion_tokens == 12
    assert threads and not any(name.startswith("engine-") for name in threads), threads


@pytest.mark.parametrize("rpc", ["Generate", "GenerateBatch"])
def test_a_generation_whose_client_left_while_it_was_tokenized_is_never_queued(inference_stack, rpc):
    model = inference_stack.manager.get(MODEL_ID)
    tokenizer, engine = model.tokenizer, model.engine
    submitted = []
    real_encode, real_submit = tokenizer.encode, engine.submit
    tokenizer.encode = lambda *a, **k: (time.sleep(1.5), real_encode(*a, **k))[1]
    engine.submit = lambda *a, **k: (submitted.append(a), real_submit(*a, **k))[1]
    one = pb.GenerateRequest(model_id=MODEL_ID, prompt="the quick brown fox")
    try:
        if rpc == "Generate":
            err = _error(lambda: _generate(inference_stack, "the quick brown fox", timeout=0.3))
        else:
            err = _error(lambda: list(inference_stack.stub.GenerateBatch(
                pb.GenerateBatchRequest(requests=[one, one, one]), timeout=0.3)))
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(2.0)  # the handler finished tokenizing meanwhile
        assert submitted == [] and engine.num_active() == 0
    finally:
        tokenizer.encode, engine.submit = real_encode, real_submit


def test_http_bodies_are_capped_at_the_grpc_request_limit(inference_stack):
    with http_probe(inference_stack.http.port) as probe:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", inference_stack.http.port, timeout=30)
        body = b'{"model": "m", "prompt": "' + b"x" * (LIMITS.max_request_bytes + 1) + b'"}'
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 413 and b"--max-request-bytes" in response.read()
        conn.close()
    probe.assert_unharmed()
