"""The OpenAI-compatible HTTP API against a real uvicorn server on loopback, called with the official
``openai`` client (and raw HTTP for what a client library hides), on the same ModelManager as gRPC."""

from __future__ import annotations

import http.client
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import openai
import pytest
import redis
from prometheus_client import REGISTRY

from loraflow.errors import FailedPrecondition
from loraflow.jobs.registry import ArtifactRecord, Registry
from loraflow.security.auth import Authenticator, add_token
from loraflow.security.settings import SecuritySettings
from loraflow.server.grpc_server import GrpcServer
from loraflow.storage.store import open_store
from loraflow.v1 import inference_pb2 as pb
from loraflow.v1 import inference_pb2_grpc
from services.inference.model_manager import ModelManager
from services.inference.openai_api.app import ApiLimits, OpenAIApi
from services.inference.openai_api.serve import HttpServer
from services.inference.server import SERVICE_NAME, InferenceServicer
from tests.inference.conftest import PROMPTS
from tests.support.certs import make_ca, make_leaf

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = SecuritySettings()


def serve(api: OpenAIApi, security: SecuritySettings = LOOPBACK) -> HttpServer:
    return HttpServer("127.0.0.1:0", security=security, authenticated=False, grace_s=2).start(api.app)


def request(server: HttpServer, method: str, path: str, body=None, headers: dict | None = None,
            raw: bytes | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=payload, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


@pytest.fixture(scope="module")
def env(published_store, input_policy):
    root, store, registry = published_store.root, published_store.store, published_store.registry
    manager = ModelManager(store=store, registry=registry, cache_dir=root / "cache", inputs=input_policy)
    manager.load_artifact(published_store.artifact_id, "cpu", model_id="m", num_threads=1)
    grpc_server = GrpcServer(listen="127.0.0.1:0", service_names=[SERVICE_NAME])
    grpc_server.add(inference_pb2_grpc.add_InferenceServiceServicer_to_server, InferenceServicer(manager))
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_server.start()}")
    api = OpenAIApi(manager)
    http_server = serve(api)
    client = openai.OpenAI(base_url=f"{http_server.url}/v1", api_key="unused", max_retries=0, timeout=30)
    yield {"manager": manager, "api": api, "http": http_server, "client": client, "root": root,
           "stub": inference_pb2_grpc.InferenceServiceStub(channel), "artifact_id": published_store.artifact_id}
    client.close()
    http_server.stop()
    channel.close()
    grpc_server.stop(grace=0)
    manager.close()


def grpc_text(env, prompt: str, adapter: str, max_new_tokens: int, chat: bool = False) -> tuple[str, list]:
    chunks = list(env["stub"].Generate(pb.GenerateRequest(
        model_id="m", prompt=prompt, adapter=adapter, chat=chat,
        sampling=pb.SamplingParams(max_new_tokens=max_new_tokens))))
    return "".join(c.text for c in chunks), chunks


FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_STOP_STRING: "stop", pb.FINISH_REASON_LENGTH: "length"}


def test_models_lists_the_model_and_its_adapters(env):
    models = env["client"].models.list().data
    by_id = {m.id: m for m in models}
    # Compiled in, and "hot": registered for the same base model, loaded on first use.
    assert set(by_id) == {"m", "alpha", "beta", "gamma", "hot"}
    assert by_id["m"].parent is None and by_id["alpha"].parent == "m" and by_id["hot"].parent == "m"
    assert all(m.object == "model" and m.owned_by == "loraflow" and m.created > 1_600_000_000 for m in models)


@pytest.mark.parametrize("model,adapter", [("m", ""), ("alpha", "alpha"), ("m/beta", "beta")])
def test_completion_has_the_greedy_text_of_grpc_generate(env, model, adapter):
    prompt = PROMPTS[0]
    expected, chunks = grpc_text(env, prompt, adapter, 8)
    out = env["client"].completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    assert out.object == "text_completion" and out.model == model and out.id.startswith("cmpl-")
    assert out.choices[0].text == expected and expected
    assert out.choices[0].finish_reason == FINISH[chunks[-1].finish_reason]
    assert out.usage.prompt_tokens == chunks[-1].usage.prompt_tokens
    assert out.usage.completion_tokens == chunks[-1].usage.completion_tokens
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens

    stream = env["client"].completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                              stream_options={"include_usage": True})
    events = list(stream)
    assert "".join(e.choices[0].text for e in events if e.choices) == expected
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == FINISH[chunks[-1].finish_reason]
    assert events[-1].choices == [] and events[-1].usage.completion_tokens == chunks[-1].usage.completion_tokens
    assert all(e.usage is None for e in events[:-1])


def test_completion_takes_token_ids_and_stops_on_a_stop_string(env, tiny_tokenizer):
    ids = tiny_tokenizer.encode(PROMPTS[1])
    full, _ = grpc_text(env, PROMPTS[1], "gamma", 12)
    by_ids = env["client"].completions.create(model="gamma", prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == full and by_ids.choices[0].finish_reason in ("stop", "length")
    cut = full.strip()[:2]
    stopped = env["client"].completions.create(model="gamma", prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                               stop=[cut])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == full[:full.find(cut)]
    one = env["client"].completions.create(model="gamma", prompt=PROMPTS[1], max_tokens=1, temperature=0)
    assert one.choices[0].finish_reason == "length" and one.usage.completion_tokens == 1
    longest = env["client"].completions.create(model="gamma", prompt=PROMPTS[1], max_tokens=30, temperature=0,
                                               extra_body={"ignore_eos": True})
    assert longest.choices[0].finish_reason == "length" and longest.usage.completion_tokens == 30


def test_chat_has_the_greedy_text_of_grpc_chat_generate(env):
    expected, chunks = grpc_text(env, "say hi", "beta", 8, chat=True)
    messages = [{"role": "user", "content": "say hi"}]
    out = env["client"].chat.completions.create(model="beta", messages=messages, max_tokens=8, temperature=0)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == expected
    assert out.usage.prompt_tokens == chunks[-1].usage.prompt_tokens
    # The same turn as content parts.
    parts = [{"role": "user", "content": [{"type": "text", "text": "say "}, {"type": "text", "text": "hi"}]}]
    assert env["client"].chat.completions.create(model="beta", messages=parts, max_completion_tokens=8,
                                                 temperature=0).choices[0].message.content == expected

    stream = env["client"].chat.completions.create(model="beta", messages=messages, max_tokens=8, temperature=0,
                                                   stream=True, stream_options={"include_usage": True})
    events = list(stream)
    assert events[0].choices[0].delta.role == "assistant"
    assert "".join(e.choices[0].delta.content or "" for e in events if e.choices) == expected
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == FINISH[chunks[-1].finish_reason]
    assert events[-1].usage.prompt_tokens == chunks[-1].usage.prompt_tokens


def test_a_registered_adapter_loads_on_first_use_as_over_grpc(env):
    """'hot' is registered, not compiled in: HTTP resolves it to the model of its base and the engine's
    submit loads it, as for gRPC Generate."""
    assert "hot" not in env["manager"].get("m").runtime.adapter_names()
    out = env["client"].completions.create(model="hot", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert "hot" in env["manager"].get("m").runtime.adapter_names()
    assert out.choices[0].text == grpc_text(env, PROMPTS[0], "hot", 6)[0]


def test_sampled_requests_with_a_seed_repeat(env):
    kwargs = dict(model="alpha", prompt=PROMPTS[2], max_tokens=8, temperature=0.9, top_p=0.95, seed=7)
    first = env["client"].completions.create(**kwargs).choices[0].text
    assert env["client"].completions.create(**kwargs).choices[0].text == first


UNSUPPORTED = [("logprobs", 2), ("n", 2), ("best_of", 3), ("suffix", "x"), ("echo", True), ("logit_bias", {"1": 5}),
               ("presence_penalty", 0.5), ("frequency_penalty", 1), ("foo", 1)]
CHAT_UNSUPPORTED = [("tools", [{"type": "function", "function": {"name": "f"}}]), ("response_format", {"type": "json_object"}),
                    ("logprobs", True), ("n", 3), ("tool_choice", "auto")]


@pytest.mark.parametrize("field,value", UNSUPPORTED)
def test_unsupported_completion_fields_are_400_naming_them(env, field, value):
    status, body = request(env["http"], "POST", "/v1/completions",
                           {"model": "m", "prompt": "hi", "max_tokens": 2, field: value})
    assert status == 400, body
    assert body["error"]["param"] == field and body["error"]["type"] == "invalid_request_error"
    assert field in body["error"]["message"]


@pytest.mark.parametrize("field,value", CHAT_UNSUPPORTED)
def test_unsupported_chat_fields_are_400_naming_them(env, field, value):
    status, body = request(env["http"], "POST", "/v1/chat/completions",
                           {"model": "m", "messages": [{"role": "user", "content": "hi"}], field: value})
    assert status == 400 and body["error"]["param"] == field, body


def test_no_op_values_of_unsupported_fields_are_accepted(env):
    status, body = request(env["http"], "POST", "/v1/completions",
                           {"model": "m", "prompt": "hi", "max_tokens": 2, "n": 1, "echo": False, "best_of": 1,
                            "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": None, "user": "u1"})
    assert status == 200 and body["usage"]["completion_tokens"] >= 1, body


@pytest.mark.parametrize("field,value,param", [
    ("temperature", 200, "temperature"), ("temperature", -1, "temperature"), ("temperature", "hot", "temperature"),
    ("top_p", 1.5, "top_p"), ("max_tokens", 0, "max_tokens"), ("max_tokens", 1 << 20, "max_tokens"),
    ("seed", -1, "seed"), ("stop", [""], "stop"), ("stop", ["s"] * 17, "stop"), ("prompt", "", "prompt"),
    ("prompt", [10 ** 9], "prompt"), ("prompt", ["a", "b"], "prompt"), ("prompt", "word " * 100, "prompt"),
    ("stream", "yes", "stream"), ("model", "", "model"),
])
def test_bad_values_are_400_with_the_param(env, field, value, param):
    body = {"model": "m", "prompt": "hi", "max_tokens": 2, field: value}
    status, answer = request(env["http"], "POST", "/v1/completions", body)
    assert status == 400, answer
    assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error", answer
    assert "sampling." not in answer["error"]["message"]


def test_bad_chat_messages_are_400(env):
    for messages, param in [([], "messages"), ([{"role": "tool", "content": "x"}], "messages[0].role"),
                            ([{"role": "user", "content": "x", "name": "n"}], "messages[0].name"),
                            ([{"role": "user"}], "messages[0].content")]:
        status, body = request(env["http"], "POST", "/v1/chat/completions", {"model": "m", "messages": messages})
        assert status == 400 and body["error"]["param"] == param, (messages, body)


def test_malformed_bodies_are_400_and_big_bodies_413(env):
    status, body = request(env["http"], "POST", "/v1/completions", raw=b"{not json")
    assert status == 400 and body["error"]["param"] == "body"
    status, body = request(env["http"], "POST", "/v1/completions", [1, 2])
    assert status == 400 and "JSON object" in body["error"]["message"]
    status, body = request(env["http"], "POST", "/v1/completions", raw=b"[" * 500_000)
    assert status == 400 and body["error"]["param"] == "body", body
    big = {"model": "m", "prompt": "x" * (2 << 20)}
    status, body = request(env["http"], "POST", "/v1/completions", big)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    # Chunked, without a Content-Length: counted while read.
    conn = http.client.HTTPConnection("127.0.0.1", env["http"].port, timeout=30)
    conn.request("POST", "/v1/completions", body=iter([b"{" + b" " * (1 << 19)] * 3), encode_chunked=True,
                 headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    conn.close()


def test_unknown_models_routes_and_methods(env):
    with pytest.raises(openai.NotFoundError) as err:
        env["client"].completions.create(model="nope", prompt="hi", max_tokens=2)
    assert err.value.body["param"] == "model" and err.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        env["client"].completions.create(model="zz/alpha", prompt="hi", max_tokens=2)
    status, body = request(env["http"], "POST", "/v1/completions", {"model": "m/nope", "prompt": "hi"})
    assert status == 404 and "'nope'" in body["error"]["message"]
    status, body = request(env["http"], "GET", "/v1/nothing")
    assert status == 404 and body["error"]["type"] == "not_found_error"
    status, body = request(env["http"], "GET", "/v1/completions")
    assert status == 405 and "error" in body


def test_an_adapter_on_two_models_is_ambiguous(env):
    manager = env["manager"]
    manager.load_artifact(env["artifact_id"], "cpu", model_id="m2", num_threads=1)
    try:
        with pytest.raises(openai.BadRequestError) as err:
            env["client"].completions.create(model="alpha", prompt="hi", max_tokens=2)
        message = err.value.body["message"]
        assert "'m'" in message and "'m2'" in message and err.value.body["code"] == "ambiguous_model"
        out = env["client"].completions.create(model="m2/alpha", prompt=PROMPTS[0], max_tokens=8, temperature=0)
        assert out.choices[0].text == grpc_text(env, PROMPTS[0], "alpha", 8)[0]
    finally:
        manager.unload("m2")


def test_no_model_loaded_is_503(env, tmp_path):
    empty = ModelManager(store=env["manager"].store, registry=env["manager"].registry, cache_dir=tmp_path)
    server = serve(OpenAIApi(empty, ready=lambda: False))
    try:
        status, body = request(server, "POST", "/v1/completions", {"model": "m", "prompt": "hi"})
        assert status == 503 and body["error"]["code"] == "no_model"
        assert request(server, "GET", "/ready")[0] == 503 and request(server, "GET", "/health")[0] == 200
        assert request(server, "GET", "/v1/models") == (200, {"object": "list", "data": []})
    finally:
        server.stop()


def _cancelled(model_id: str, adapter: str) -> float:
    return REGISTRY.get_sample_value("loraflow_inference_requests_total",
                                     {"model": model_id, "adapter": adapter, "finish_reason": "cancelled"}) or 0.0


@pytest.fixture
def slow_engine(env, monkeypatch):
    """About 50 ms a step, so a 50-token request is still running when the test acts on it."""
    runtime = env["manager"].get("m").runtime
    execute = runtime.execute

    def slow(step):
        time.sleep(0.05)
        return execute(step)

    monkeypatch.setattr(runtime, "execute", slow)
    return env["manager"].get("m").engine


def _open_stream(server: HttpServer, model: str = "alpha") -> tuple[socket.socket, bytes]:
    """POST a streamed completion on a raw socket and read until the first event arrived."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    body = json.dumps({"model": model, "prompt": PROMPTS[0], "max_tokens": 50, "ignore_eos": True,
                       "stream": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    received = b""
    while b"data: " not in received:
        part = sock.recv(4096)
        assert part, received
        received += part
    return sock, received


def _wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_a_client_that_disconnects_cancels_its_request(env, slow_engine):
    before = _cancelled("m", "alpha")
    sock, received = _open_stream(env["http"])
    assert received.startswith(b"HTTP/1.1 200") and b"text/event-stream" in received
    assert slow_engine.num_active() == 1
    sock.close()
    assert _wait_for(lambda: slow_engine.num_active() == 0)
    assert _cancelled("m", "alpha") == before + 1
    assert _wait_for(lambda: env["api"].generations.active == 0)

    # A non-streamed request whose client goes away is cancelled too.
    sock = socket.create_connection(("127.0.0.1", env["http"].port), timeout=30)
    body = json.dumps({"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 50, "ignore_eos": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(body)).encode()
                 + b"\r\n\r\n" + body)
    assert _wait_for(lambda: slow_engine.num_active() == 1)
    sock.close()
    assert _wait_for(lambda: slow_engine.num_active() == 0)
    assert _cancelled("m", "alpha") == before + 2
    assert _wait_for(lambda: env["api"].generations.active == 0)


def test_an_engine_failure_mid_request_is_an_openai_error(env, monkeypatch):
    """Non-finite logits fail the request in the engine: a 400 body, or an error event in a stream."""
    runtime = env["manager"].get("m").runtime
    execute = runtime.execute
    monkeypatch.setattr(runtime, "execute", lambda step: np.full_like(execute(step), np.nan))
    with pytest.raises(openai.BadRequestError) as err:
        env["client"].completions.create(model="alpha", prompt="hi", max_tokens=4)
    assert err.value.body["code"] == "non_finite_logits" and "'alpha'" in err.value.body["message"]
    with pytest.raises(openai.APIError) as err:
        list(env["client"].chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=4, stream=True))
    assert "non-finite logits" in err.value.message
    assert _wait_for(lambda: env["api"].generations.active == 0)
    assert env["manager"].get("m").engine.num_active() == 0


def test_generations_beyond_the_cap_are_429(env, slow_engine):
    api = OpenAIApi(env["manager"], limits=ApiLimits(max_concurrent_generations=1))
    server = serve(api)
    try:
        sock, _ = _open_stream(server)
        status, body = request(server, "POST", "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 2})
        assert status == 429 and body["error"]["type"] == "rate_limit_error", body
        assert body["error"]["code"] == "too_many_streams"
        sock.close()
        assert _wait_for(lambda: api.generations.active == 0)
        assert request(server, "POST", "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 2})[0] == 200
    finally:
        server.stop()


def test_bearer_tokens_are_the_grpc_servers_and_reload_together(env, tmp_path, caplog):
    tokens = tmp_path / "tokens"
    good = add_token(tokens, "alice")
    authenticator = Authenticator(tokens)
    server = serve(OpenAIApi(env["manager"], authenticator=authenticator))
    url = f"{server.url}/v1"
    try:
        for key in ("", "wrong-token-0123456789"):
            client = openai.OpenAI(base_url=url, api_key=key or "x", max_retries=0,
                                   default_headers={} if key else {"Authorization": ""})
            with pytest.raises(openai.AuthenticationError) as err:
                client.models.list()
            assert err.value.status_code == 401 and err.value.body["type"] == "authentication_error"
        status, body = request(server, "POST", "/v1/completions", {"model": "m", "prompt": "hi"})
        assert status == 401 and "Bearer" in body["error"]["message"]
        status, _ = request(server, "POST", "/v1/completions", {"model": "m"}, headers={"Authorization": "Basic eA=="})
        assert status == 401
        # Probes need no token.
        assert request(server, "GET", "/health") == (200, {"status": "ok"})
        assert request(server, "GET", "/ready") == (200, {"status": "ready"})

        client = openai.OpenAI(base_url=url, api_key=good, max_retries=0)
        with caplog.at_level(logging.DEBUG, logger="services.inference.openai_api.app"):
            out = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=4, temperature=0)
        assert out.choices[0].text == grpc_text(env, PROMPTS[0], "alpha", 4)[0]
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert "POST /v1/completions called by alice" in logged and good not in logged
        # A reload (what SIGHUP does to the gRPC server's Authenticator) applies here at once.
        tokens.write_text(f"bob:{'b' * 32}\n")
        assert authenticator.reload()
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
        assert openai.OpenAI(base_url=url, api_key="b" * 32, max_retries=0).models.list().data
    finally:
        server.stop()


def test_an_exposed_address_without_tokens_is_refused():
    with pytest.raises(FailedPrecondition) as err:
        HttpServer("0.0.0.0:0", security=SecuritySettings(), authenticated=False)
    assert err.value.field == "http_listen" and "--allow-unauthenticated" in err.value.message


def test_the_process_refuses_an_exposed_http_address_from_the_environment(redis_url, tmp_path, monkeypatch, caplog):
    from services.inference.__main__ import main

    monkeypatch.setenv("LORAFLOW_HTTP_LISTEN", "0.0.0.0:0")
    assert main(["--listen", "127.0.0.1:0", "--redis-url", redis_url, "--store-url", (tmp_path / "s").as_uri(),
                 "--cache-dir", str(tmp_path / "c")]) == 2
    assert "refusing to serve 0.0.0.0:0 without authentication" in caplog.text


def test_tls_and_mtls(env, tmp_path):
    ca = make_ca(tmp_path, "ca")
    leaf = make_leaf(tmp_path, "server", ca, server=True)
    client_pair = make_leaf(tmp_path, "client", ca, server=False)
    security = SecuritySettings(tls_cert=str(leaf.cert), tls_key=str(leaf.key), tls_client_ca=str(ca.cert))
    server = serve(OpenAIApi(env["manager"]), security)
    assert server.url.startswith("https://")
    try:
        context = ssl.create_default_context(cafile=str(ca.cert))
        context.load_cert_chain(str(client_pair.cert), str(client_pair.key))
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=30)
        conn.request("GET", "/v1/models")
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["data"]
        conn.close()
        no_cert = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=30,
                                              context=ssl.create_default_context(cafile=str(ca.cert)))
        with pytest.raises((ssl.SSLError, ConnectionError)):
            no_cert.request("GET", "/v1/models")
            no_cert.getresponse()
        no_cert.close()
    finally:
        server.stop()


def test_the_process_serves_the_http_api(tiny_artifact, redis_url, tmp_path):
    artifact_dir, manifest = tiny_artifact
    store_url = (tmp_path / "store").as_uri()
    uri = open_store(store_url).publish_dir(f"artifacts/{manifest.artifact_id}", artifact_dir)
    Registry(redis.Redis.from_url(redis_url)).put_artifact(
        ArtifactRecord(artifact_id=manifest.artifact_id, uri=uri, base_model="tiny"))
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "LORAFLOW_HTTP_LISTEN": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.inference", "--listen", f"127.0.0.1:{ports[0]}", "--redis-url", redis_url,
         "--store-url", store_url, "--cache-dir", str(tmp_path / "cache"), "--load", f"{manifest.artifact_id}@cpu",
         "--num-threads", "1", "--http-listen", f"127.0.0.1:{ports[1]}"],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        ready = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", ports[1], timeout=2)
                conn.request("GET", "/ready")
                ready = conn.getresponse().status
                conn.close()
                if ready == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        assert ready == 200, proc.stderr.read() if proc.poll() is not None else ready
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{ports[1]}/v1", api_key="unused", max_retries=0)
        assert "alpha" in {m.id for m in client.models.list().data}
        out = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=3, temperature=0)
        assert out.usage.completion_tokens >= 1
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_http_api_imports_without_torch():
    code = ("import sys; import services.inference.openai_api.app, services.inference.openai_api.serve; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
