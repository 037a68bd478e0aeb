"""What both front doors (gRPC ``Generate``, the OpenAI HTTP API) check of a generation request, in one place.

The sampling fields come from their one declaration (``loraflow.options.sampling_params.SAMPLING_FIELDS``):
``sampling_from_proto`` reads them from a ``loraflow.v1.SamplingParams``, ``sampling_from_http`` from an
OpenAI request body; the prompt checks (bytes of text before tokenizing, tokens against the context, token
ids against the vocabulary) and ``build_generation`` (the adapter, the request the engine takes) are the
same for both. Errors name the caller's own fields: the gRPC door passes ``requests[2].sampling`` or
``prompt_token_ids``, the HTTP door ``prompt`` or ``messages`` (and maps ``sampling.<name>`` to the
OpenAI name, ``openai_api.errors.param_name``).
"""

from __future__ import annotations

from typing import Any

from loraflow.errors import InvalidArgument
from loraflow.options.sampling_params import DEFAULT_MAX_NEW_TOKENS, SAMPLING_FIELDS, SamplingParams
from loraflow.v1 import inference_pb2
from services.inference.engine import GenerationRequest
from services.inference.model_manager import LoadedModel, ModelManager


def sampling_from_proto(p: inference_pb2.SamplingParams, field_prefix: str = "sampling") -> SamplingParams:
    """Proto defaults (0 = unset) → SamplingParams; errors name e.g. ``requests[2].sampling.top_p``."""
    if p.max_new_tokens < 0:
        raise InvalidArgument(f"{field_prefix}.max_new_tokens must be >= 0 (0 = {DEFAULT_MAX_NEW_TOKENS}), "
                              f"got {p.max_new_tokens}", field=f"{field_prefix}.max_new_tokens", value=p.max_new_tokens)
    try:
        return SamplingParams(**{f.name: f.from_proto(getattr(p, f.name)) for f in SAMPLING_FIELDS})
    except InvalidArgument as err:
        if field_prefix == "sampling":
            raise
        field = field_prefix + err.field.removeprefix("sampling")
        raise InvalidArgument(err.message.replace(err.field, field), field=field, value=err.value) from err


def sampling_from_http(request: Any, max_new_tokens: int) -> SamplingParams:
    """An OpenAI request's sampling fields (``http_name``) → SamplingParams; ``max_new_tokens`` is decided by
    the caller (unset in OpenAI means "until the context is full", which depends on the prompt)."""
    values = {f.name: f.from_http(getattr(request, f.http_name)) for f in SAMPLING_FIELDS if f.name != "max_new_tokens"}
    return SamplingParams(max_new_tokens=max_new_tokens, **values)


def check_prompt_text(text: str, model: LoadedModel, field: str) -> None:
    """Refuse, before tokenizing, text that cannot fit the model's context whatever it tokenizes to:
    more UTF-8 bytes than ``ctx_len - 1`` tokens of the tokenizer's longest entry stand for."""
    ctx_len = model.runtime.ctx_len
    limit = model.tokenizer.max_prompt_bytes(ctx_len - 1)
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise InvalidArgument(
            f"{field} is {size} bytes of text; the model's context of {ctx_len} tokens holds at most {limit} bytes "
            f"({ctx_len - 1} prompt tokens of at most {model.tokenizer.max_token_bytes} bytes each)", field=field,
            value=f"<{size} bytes>", metadata={"prompt_bytes": size, "max_prompt_bytes": limit, "ctx_len": ctx_len})


def check_prompt_tokens(count: int, model: LoadedModel, field: str) -> None:
    ctx_len = model.runtime.ctx_len
    if count >= ctx_len:
        raise InvalidArgument(f"{field} has {count} tokens but the model's context is {ctx_len} "
                              f"tokens (at most {ctx_len - 1} prompt tokens fit)", field=field,
                              value=count, metadata={"prompt_tokens": count, "ctx_len": ctx_len})


def check_prompt_token_ids(ids: list[int], model: LoadedModel, field: str) -> None:
    """Token ids a caller sent: as many as the context holds (checked first, before scanning them), each in
    the vocabulary."""
    check_prompt_tokens(len(ids), model, field)
    vocab = model.runtime.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise InvalidArgument(f"{field} holds token ids outside [0, {vocab}): {bad[:5]}", field=field, value=bad[:5])


def build_generation(manager: ModelManager, model: LoadedModel, ids: list[int], adapter: str,
                     sampling: SamplingParams, request_id: str = "", *, prompt_field: str = "prompt",
                     adapter_field: str = "adapter") -> GenerationRequest:
    """The checks every front door applies to a tokenized request before it reaches its model's engine;
    errors name the caller's fields."""
    if not ids:
        raise InvalidArgument(f"{prompt_field} must not be empty", field=prompt_field, value="")
    check_prompt_tokens(len(ids), model, prompt_field)
    # Loaded, or loadable on first use (compiled in or registered): NotFound otherwise. The load itself
    # runs in the engine's submit (OnDemandAdapters), so every front door shares it.
    model.adapters.check_servable(adapter, field=adapter_field)
    return GenerationRequest(tuple(ids), adapter, sampling, request_id)
