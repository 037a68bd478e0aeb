"""An OpenAI request → (model, GenerationRequest) through the same checks and manager entry points
as gRPC Generate (``request_validation``), so both front doors admit, sample and fail alike.

``model`` names a loaded model id, an adapter one loaded model can serve (see ``resolve_model``), or
``MODEL_ID/ADAPTER`` (names never hold '/'). An adapter not in a slot loads on first use in the
engine's submit, for both front doors. Blocking (the registry is Redis, tokenizing is CPU): call it
from a worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraflow.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from loraflow.options.names import validate_name
from loraflow.options.sampling_params import MAX_NEW_TOKENS
from services.inference.engine import GenerationRequest
from services.inference.model_manager import LoadedModel, ModelManager
from services.inference.openai_api.schemas import ChatCompletionRequest, CompletionRequest
from services.inference.request_validation import (
    build_generation,
    check_prompt_text,
    check_prompt_token_ids,
    sampling_from_http,
)


@dataclass(frozen=True)
class Target:
    model: LoadedModel
    adapter: str  # "" = the base model


def served_adapters(model: LoadedModel) -> list[str]:
    """Adapter names serving in a slot of the model now (slot 0 is the base; loading slots are not listed)."""
    return sorted(name for name, slot in model.runtime.adapter_names().items() if slot != 0)


def compiled_adapters(model: LoadedModel) -> list[str]:
    """Adapters compiled into the model's artifact: servable even after their slot went to another."""
    return sorted(entry.name for entry in model.manifest.adapters)


# Registry pages read for /v1/models; beyond this many registered adapters the listing stops there.
MAX_LISTED_REGISTERED = 10_000


def servable_adapters(manager: ModelManager, models: list[LoadedModel]) -> dict[str, list[str]]:
    """model id -> every adapter it can serve: in a slot, compiled in, or registered for its base model
    (those load on first use)."""
    by_base: dict[str, set[str]] = {}
    token, seen = "", 0
    while seen < MAX_LISTED_REGISTERED:
        records, token = manager.registry.list_adapters(page_size=1000, page_token=token)
        for record in records:
            by_base.setdefault(record.base_model, set()).add(record.name)
        seen += len(records)
        if not token:
            break
    return {m.model_id: sorted(set(served_adapters(m)) | set(compiled_adapters(m)) | by_base.get(m.base_model, set()))
            for m in models}


def _one(name: str, candidates: list[str]) -> str | None:
    if len(candidates) > 1:
        raise InvalidArgument(f"adapter {name!r} is ambiguous: models {sorted(candidates)} can serve it; send model "
                              f"as MODEL_ID/{name} (e.g. {sorted(candidates)[0]}/{name})", field="model", value=name,
                              reason="AMBIGUOUS_MODEL", metadata={"models": ",".join(sorted(candidates))})
    return candidates[0] if candidates else None


def resolve_model(manager: ModelManager, name: str) -> Target:
    """The model (and adapter) a request's ``model`` names. An adapter is looked for in the slots of the
    loaded models, then among the adapters compiled into them, then in the registry (its base model
    picks the model; with one model loaded, that one); it is ambiguous (400) when several match."""
    models = manager.list()
    if not models:
        raise Unavailable("no model is loaded on this server yet", field="model", value=name, reason="NO_MODEL")
    by_id = {m.model_id: m for m in models}
    if name in by_id:
        return Target(by_id[name], "")
    if "/" in name:
        model_id, _, adapter = name.partition("/")
        if model_id not in by_id:
            raise NotFound(f"model {model_id!r} is not loaded (loaded: {sorted(by_id)})", field="model", value=name,
                           reason="MODEL_NOT_FOUND")
        validate_name("model", adapter)  # the adapter part: errors name the request's own field
        return Target(by_id[model_id], adapter)
    validate_name("model", name)
    chosen = _one(name, [m.model_id for m in models if name in served_adapters(m)]) \
        or _one(name, [m.model_id for m in models if name in compiled_adapters(m)])
    if chosen is None:
        record = manager.find_adapter(name)
        if record is None:
            raise NotFound(f"model {name!r} does not exist: it is neither a loaded model ({sorted(by_id)}) nor an "
                           f"adapter one of them can serve", field="model", value=name, reason="MODEL_NOT_FOUND")
        chosen = _one(name, [m.model_id for m in models if m.base_model == record.base_model])
        if chosen is None and len(models) == 1:
            chosen = models[0].model_id  # the engine's load says precisely if the adapter does not fit
        if chosen is None:
            raise NotFound(f"adapter {name!r} is registered for base model {record.base_model!r}, which no loaded "
                           f"model serves (loaded: {sorted(by_id)})", field="model", value=name,
                           reason="MODEL_NOT_FOUND")
    return Target(by_id[chosen], name)


def _prompt_ids(model: LoadedModel, request: CompletionRequest | ChatCompletionRequest) -> tuple[list[int], str]:
    """(token ids, the field they came from)."""
    tokenizer = model.tokenizer
    if isinstance(request, ChatCompletionRequest):
        messages = [{"role": m.role, "content": m.text} for m in request.messages]
        # Sizes before the template renders and the tokenizer runs: the contents alone, then the rendered text.
        check_prompt_text("".join(m["content"] for m in messages), model, "messages")
        try:
            text = tokenizer.apply_chat_template(messages)
        except FailedPrecondition as err:
            if err.field != "chat":
                raise
            raise FailedPrecondition(f"model {model.model_id!r}: {err.message.split(';')[0]}; use /v1/completions",
                                     field="messages", value="<messages>", reason="NO_CHAT_TEMPLATE") from None
        check_prompt_text(text, model, "messages")
        return tokenizer.encode(text, add_special_tokens=False), "messages"
    prompt = request.single_prompt()
    if isinstance(prompt, str):
        check_prompt_text(prompt, model, "prompt")
        return tokenizer.encode(prompt), "prompt"
    check_prompt_token_ids(list(prompt), model, "prompt")
    return list(prompt), "prompt"


def prepare(manager: ModelManager, request: CompletionRequest | ChatCompletionRequest,
            request_id: str) -> tuple[LoadedModel, GenerationRequest]:
    target = resolve_model(manager, request.model)
    model = target.model
    ids, prompt_field = _prompt_ids(model, request)
    limit = request.token_limit if isinstance(request, ChatCompletionRequest) else request.max_tokens
    # Unset: until the context is full, as OpenAI's chat API and vLLM do (the scheduler ends it there).
    max_new_tokens = limit if limit is not None else max(1, min(MAX_NEW_TOKENS, model.runtime.ctx_len - len(ids)))
    sampling = sampling_from_http(request, max_new_tokens)
    generation = build_generation(manager, model, ids, target.adapter, sampling, request_id,
                                  prompt_field=prompt_field, adapter_field="model")
    return model, generation
