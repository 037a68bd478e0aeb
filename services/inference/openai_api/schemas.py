"""The request bodies the HTTP API accepts, validated strictly: a field it does not implement is a 400
naming that field, never silently ignored.

A field sent as ``null`` counts as not sent, and a few OpenAI fields are accepted at the value that
changes nothing (``echo: false``, ``best_of: 1``, a penalty of 0, ``logprobs: false``) because common
clients send them so. ``top_k``, ``repetition_penalty`` and ``ignore_eos`` are accepted as extensions
(as vLLM does). Strict types throughout: a boolean is not an integer (``"n": true`` is a 400), a string is
not a number. ``openapi_description()`` publishes these models as the API's OpenAPI document.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from loraflow.errors import InvalidArgument
from loraflow.options.sampling_params import SAMPLING_FIELDS

MAX_MESSAGES = 1024
MAX_MODEL_NAME_CHARS = 256


def _is_zero(value: Any) -> bool:
    return type(value) in (int, float) and value == 0


# Fields accepted only at the value that changes nothing; any other value is a 400.
_NO_OP: dict[str, Callable[[Any], bool]] = {
    "echo": lambda v: v is False,
    "best_of": lambda v: type(v) is int and v == 1,
    "presence_penalty": _is_zero,
    "frequency_penalty": _is_zero,
    "logprobs": lambda v: v is False,
}


class _Strict(BaseModel):
    # strict: "1" is not an int, 1 is not a bool; extra="forbid": unknown keys are errors.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _GenerateBase(_Strict):
    model: Annotated[str, Field(min_length=1, max_length=MAX_MODEL_NAME_CHARS)]

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


# The sampling fields under their OpenAI names and defaults (loraflow.options.sampling_params declares them; their
# ranges are checked there, for both front doors), then the fields only this API has.
_GenerateFields = create_model(
    "_GenerateFields", __base__=_GenerateBase,
    **{f.http_name: (f.http_type, Field(default=f.http_default, description=f.help)) for f in SAMPLING_FIELDS},
    n=(Annotated[int, Field(ge=1, le=1)], 1),  # strict int: True and 1.0 are refused, not taken for 1
    stream=(bool, False),
    stream_options=(StreamOptions | None, None),
    user=(str | None, None),  # the caller's end-user id: informational only
)


class CompletionRequest(_GenerateFields):
    # A string, token ids, or a batch of one of them (more than one prompt is a 400).
    prompt: str | list[int] | list[str] | list[list[int]]

    def single_prompt(self) -> str | list[int]:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise InvalidArgument(f"prompt holds {len(prompt)} prompts; send one prompt per request",
                                      field="prompt", value=f"<{len(prompt)} prompts>")
            return prompt[0]
        return prompt


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_GenerateFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: int | None = None  # the newer name of max_tokens

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def _loc(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + f"...({len(text)} chars)"


def _invalid(err: ValidationError, kind: str) -> InvalidArgument:
    first = err.errors(include_url=False)[0]
    # Union members add their type to the location (prompt.str, prompt.list[int]); the field is what counts.
    loc = tuple(p for p in first["loc"] if isinstance(p, int) or not any(c in p for c in "[]")
                and p not in ("str", "int", "float", "bool", "list"))
    param = _loc(loc) or kind
    if first["type"] == "extra_forbidden":
        return InvalidArgument(f"unsupported field {param!r}: loraflow's OpenAI-compatible API does not implement "
                               f"it", field=param, value=first.get("input"), reason="UNSUPPORTED_FIELD")
    if first["type"] == "missing":
        return InvalidArgument(f"{param} is required", field=param, value=None)
    if param == "n":
        return InvalidArgument(f"n must be 1 (one choice per request), got {_short(first.get('input'))}",
                               field="n", value=first.get("input"), reason="UNSUPPORTED_FIELD")
    return InvalidArgument(f"{param}: {first['msg'].lower()}, got {_short(first.get('input'))}", field=param,
                           value=first.get("input"))


def _clean(body: Any, kind: str) -> dict:
    if not isinstance(body, dict):
        raise InvalidArgument(f"the {kind} request body must be a JSON object, got {type(body).__name__}",
                              field="body", value=type(body).__name__)
    cleaned = {}
    for key, value in body.items():
        if value is None:
            continue
        accept = _NO_OP.get(key)
        if accept is not None:
            if accept(value):
                continue
            raise InvalidArgument(f"unsupported field {key!r} (got {_short(value)}): loraflow's OpenAI-compatible "
                                  f"API does not implement it", field=key, value=value, reason="UNSUPPORTED_FIELD")
        cleaned[key] = value
    return cleaned


def _checked(cls: type[_GenerateFields], body: Any, kind: str) -> _GenerateFields:
    try:
        request = cls.model_validate(_clean(body, kind))
    except ValidationError as err:
        raise _invalid(err, kind) from None
    if request.stream_options is not None and not request.stream:
        raise InvalidArgument("stream_options is only allowed with stream: true", field="stream_options",
                              value="set")
    return request


def parse_completion(body: Any) -> CompletionRequest:
    return _checked(CompletionRequest, body, "completion")


def parse_chat(body: Any) -> ChatCompletionRequest:
    request = _checked(ChatCompletionRequest, body, "chat completion")
    if request.max_tokens is not None and request.max_completion_tokens is not None \
            and request.max_tokens != request.max_completion_tokens:
        raise InvalidArgument(f"max_tokens ({request.max_tokens}) and max_completion_tokens "
                              f"({request.max_completion_tokens}) disagree; send one of them",
                              field="max_completion_tokens", value=request.max_completion_tokens)
    return request


@functools.cache
def openapi_description() -> dict:
    """OpenAPI 3.1 for the generation routes, from the models above (so it cannot drift from validation)."""
    from pydantic.json_schema import models_json_schema

    _, top = models_json_schema([(CompletionRequest, "validation"), (ChatCompletionRequest, "validation")],
                                ref_template="#/components/schemas/{model}")
    error = {"description": "an error in OpenAI's shape: {error: {message, type, param, code}}",
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    errors = {str(code): error for code in (400, 401, 404, 408, 413, 429, 503)}

    def generation(schema: str, summary: str) -> dict:
        return {"post": {"summary": summary, "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{schema}"}}}},
            "responses": {"200": {"description": "the completion (JSON), or server-sent events with stream: true"},
                          **errors}}}

    schemas = dict(top["$defs"])
    schemas["Error"] = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type"], "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "loraflow OpenAI-compatible API", "version": "1"},
        "paths": {
            "/v1/completions": generation("CompletionRequest", "text completion of one prompt"),
            "/v1/chat/completions": generation("ChatCompletionRequest", "chat completion of one conversation"),
            "/v1/models": {"get": {"summary": "loaded models and the adapters they serve",
                                   "responses": {"200": {"description": "a list of models"}, **errors}}},
        },
        "components": {"schemas": schemas},
    }
