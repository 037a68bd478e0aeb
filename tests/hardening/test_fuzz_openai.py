"""Property-based fuzzing of the OpenAI-compatible HTTP API from its own OpenAPI description
(``GET /openapi.json``, generated from the pydantic models that validate requests): bodies the schema
accepts, bodies with fields broken the ways hostile callers break them, and bytes a JSON parser chokes on,
against the real uvicorn server on loopback.

Every answer is a 2xx or a 4xx in OpenAI's error shape (a 400 names its ``param``) — never a 5xx; /health
on connections of its own keeps answering within the probe bound; RSS stays within a bound. Examples per
route and kind: LORAFLOW_FUZZ_EXAMPLES (default 30, derandomized).
"""

from __future__ import annotations

import http.client
import json
import os

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hardening.conftest import CTX_LEN, MODEL_ID, inference_stack_factory_for
from tests.hardening.probes import http_probe, rss_bytes
from tests.hardening.schema_strategies import request_schemas

EXAMPLES = int(os.environ.get("LORAFLOW_FUZZ_EXAMPLES", "30"))
ALLOWED = {200, 400, 404, 408, 413, 429}
RSS_GROWTH_BOUND = 400 << 20
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def api(redis_server, bare_artifact, tmp_path_factory):
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    make, stacks = inference_stack_factory_for(bare_artifact, redis_server.url, tmp_path_factory.mktemp("fuzz-http"))
    stack = make()
    status, openapi = _send(stack.http.port, "GET", "/openapi.json", None)
    assert status == 200
    yield {"port": stack.http.port, "openapi": openapi, "rss_start": rss_bytes()}
    for one in stacks:
        one.close()
    client.close()


def _send(port: int, method: str, path: str, body: bytes | None) -> tuple[int, object]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body is not None else {})
        response = conn.getresponse()
        raw = response.read()
        if response.getheader("content-type", "").startswith("text/event-stream"):
            return response.status, raw.decode()
        return response.status, json.loads(raw)
    finally:
        conn.close()


def _check(port: int, path: str, body: bytes) -> int:
    status, answer = _send(port, "POST", path, body)
    assert status in ALLOWED, f"{path} answered {status} to {body[:300]!r}: {answer}"
    if status == 200:
        assert isinstance(answer, str) and answer.rstrip().endswith("data: [DONE]") or answer["usage"], answer
    else:
        error = answer["error"]
        assert error["message"] and error["type"], answer
        if status == 400:
            assert error["param"], f"a 400 that names no param: {answer}"
    return status


# What a served example keeps of a schema-valid body: its input and shape, not sampling values the schema
# allows but the sampler refuses (those are the other half's business).
_SERVED_KEEPS = ("prompt", "messages", "stream", "stream_options", "user", "ignore_eos", "n")


def _bodies(strategies, schema):
    """Schema-valid bodies, and as many again on the loaded model with a short generation (so they are served)."""
    valid = strategies.valid(schema)
    served = valid.map(lambda body: {**{k: v for k, v in body.items() if k in _SERVED_KEEPS}, "model": MODEL_ID,
                                     "max_tokens": min(8, CTX_LEN), "temperature": 0})
    return st.one_of(valid, served)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("kind", ["valid", "hostile", "raw"])
def test_the_openai_api_answers_every_body_with_a_2xx_or_a_4xx_naming_the_param(api, path, kind):
    strategies, schemas = request_schemas(api["openapi"])
    schema = schemas[path]
    bodies = _bodies(strategies, schema)
    if kind == "valid":
        strategy = bodies.map(lambda body: json.dumps(body).encode())
    elif kind == "hostile":
        strategy = strategies.hostile(schema, bodies).map(str.encode)
    else:
        strategy = strategies.raw_bodies(schema, bodies)
    statuses: list[int] = []

    @FUZZ_SETTINGS
    @given(body=strategy)
    def one(body: bytes) -> None:
        statuses.append(_check(api["port"], path, body))

    with http_probe(api["port"], "/health") as probe:
        one()
    probe.assert_unharmed()
    assert statuses
    if kind == "valid":
        assert 200 in statuses, f"no valid body was served: {sorted(set(statuses))}"
    else:
        assert set(statuses) & {400, 404}, statuses
    growth = rss_bytes() - api["rss_start"]
    assert growth < RSS_GROWTH_BOUND, f"RSS grew by {growth >> 20} MiB since the fuzzing began"
