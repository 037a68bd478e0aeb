"""Class 5 of issue 20, HTTP side: every JSON and Unicode edge of an OpenAI request is a 400 naming the field
(never a 500), one strict schema (a boolean is not an integer), a bad model name reported as ``model``,
error bodies bounded in bytes, and a well-behaved caller served meanwhile."""

from __future__ import annotations

import http.client
import json

import pytest

from loraflow.errors import MAX_MESSAGE_BYTES
from tests.hardening.conftest import MODEL_ID
from tests.hardening.probes import http_probe


def post(port: int, path: str, raw: bytes, headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=raw, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


COMPLETION = '{"model": "m", "prompt": %s, "max_tokens": 2}'
CHAT = '{"model": "m", "messages": [{"role": "user", "content": %s}], "max_tokens": 2}'
# (path, body, the param the 400 must name, a word its message must hold)
EDGES = [
    ("/v1/completions", COMPLETION % r'"ab\ud800cd"', "prompt", "surrogate"),
    ("/v1/completions", COMPLETION % r'["ok", "\udfff"]', "prompt[1]", "surrogate"),
    ("/v1/chat/completions", CHAT % r'"hi \udc00"', "messages[0].content", "surrogate"),
    ("/v1/chat/completions", CHAT % r'[{"type": "text", "text": "\ud83d"}]', "messages[0].content[0].text",
     "surrogate"),
    ("/v1/completions", '{"model": "m", "prompt": "x", "\\ud800": 1}', "body", "surrogate"),
    ("/v1/completions", '{"model": "m", "prompt": "x", "max_tokens": %s}' % ("7" * 5000), "max_tokens", "digits"),
    ("/v1/completions", '{"model": "m", "prompt": [%s]}' % ("1" * 4301), "prompt[0]", "digits"),
    ("/v1/completions", '{"model": "m", "prompt": "x", "seed": -%s}' % ("9" * 4400), "seed", "digits"),
    ("/v1/completions", '{"model": "m", "prompt": "x", "temperature": NaN}', "temperature", "NaN"),
    ("/v1/completions", '{"model": "m", "prompt": "x", "top_p": 1e999}', "top_p", "out of range"),
    ("/v1/completions", '{"model": "m", "prompt": "x", "prompt": "y"}', "prompt", "twice"),
    ("/v1/completions", '{"model": "m", "prompt": "x", "n": true}', "n", "n must be 1"),
    ("/v1/completions", '{"model": "m", "prompt": "x", "n": 1.0}', "n", "n must be 1"),
    ("/v1/completions", '{"model": "m", "prompt": "x", "max_tokens": true}', "max_tokens", "integer"),
    ("/v1/completions", '{"model": "m", "prompt": "x", "stream": 1}', "stream", "boolean"),
    ("/v1/completions", '{"model": "m", "prompt": "x", "temperature": "0.5"}', "temperature", "number"),
    ("/v1/completions", '{"model": "bad name!", "prompt": "x"}', "model", "model"),
    ("/v1/completions", '{"model": "m/../../etc", "prompt": "x"}', "model", "model"),
    ("/v1/completions", '{"model": "%s", "prompt": "x"}' % ("\U0001f600" * 200), "model", "model"),
    ("/v1/completions", '{"model": "m", "prompt": %s}' % ("[" * 200 + "]" * 200), "prompt", "deeper"),
    ("/v1/completions", '{"model": "m", "prompt": "x"', "body", "not valid JSON"),
]


@pytest.fixture
def stack(inference_stack):
    return inference_stack


def test_json_and_unicode_edges_are_400_naming_the_field(stack):
    with http_probe(stack.http.port) as probe:
        for path, body, param, word in EDGES:
            status, answer = post(stack.http.port, path, body.encode())
            assert status == 400, (body[:80], status, answer)
            error = answer["error"]
            assert error["param"] == param and error["type"] == "invalid_request_error", (body[:80], error)
            assert word in error["message"], (body[:80], error["message"])
            assert len(error["message"].encode()) <= MAX_MESSAGE_BYTES
        # A well-behaved request between the hostile ones.
        status, answer = post(stack.http.port, "/v1/completions", COMPLETION.encode() % b'"the quick"')
        assert status == 200 and answer["usage"]["completion_tokens"] == 2
    probe.assert_unharmed()


def test_bodies_that_are_not_utf8_json_are_400(stack):
    for raw, word in [(b'{"model": "m", "prompt": "\xff"}', "UTF-8"), (b"\xef\xbb\xbf{}", "byte order mark"),
                      ('{"model": "m", "prompt": "x"}'.encode("utf-16"), "UTF-8"), (b"[1, 2]", "JSON object")]:
        status, answer = post(stack.http.port, "/v1/completions", raw)
        assert status == 400 and answer["error"]["param"] == "body" and word in answer["error"]["message"], answer


def test_a_valid_surrogate_pair_is_text_not_an_error(stack):
    status, answer = post(stack.http.port, "/v1/completions", (COMPLETION % r'"smile \ud83d\ude00"').encode())
    assert status == 200 and answer["usage"]["prompt_tokens"] > 2


def test_an_error_echoing_a_huge_value_is_bounded_in_bytes(stack):
    status, answer = post(stack.http.port, "/v1/completions",
                          json.dumps({"model": MODEL_ID, "prompt": "x", "stop": ["\U0001f600" * 300] * 20}).encode())
    assert status == 400 and answer["error"]["param"] == "stop"
    assert len(json.dumps(answer["error"], ensure_ascii=False).encode()) < 2 * MAX_MESSAGE_BYTES


def test_the_openapi_description_is_the_validating_schema(stack):
    conn = http.client.HTTPConnection("127.0.0.1", stack.http.port, timeout=30)
    conn.request("GET", "/openapi.json")
    response = conn.getresponse()
    spec = json.loads(response.read())
    conn.close()
    completion = spec["components"]["schemas"]["CompletionRequest"]
    assert response.status == 200 and completion["additionalProperties"] is False
    assert completion["properties"]["n"]["maximum"] == 1 and set(completion["required"]) == {"model", "prompt"}
    assert "/v1/chat/completions" in spec["paths"]
