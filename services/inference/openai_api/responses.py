"""The OpenAI response bodies of a generation: one JSON body (waited for while watching the client),
or server-sent event chunks; finish reasons and usage as OpenAI names them."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable

from starlette.responses import JSONResponse

from loraflow.artifact.scheduler import FinishReason
from loraflow.errors import Unavailable
from services.inference.engine import GenerationChunk
from services.inference.openai_api import errors
from services.inference.openai_api.schemas import ChatCompletionRequest, CompletionRequest
from services.inference.openai_api.streaming import ChunkStream, run_watched

_FINISH = {FinishReason.STOP: "stop", FinishReason.STOP_STRING: "stop", FinishReason.LENGTH: "length"}


def usage(chunk: GenerationChunk) -> dict:
    return {"prompt_tokens": chunk.prompt_tokens, "completion_tokens": chunk.completion_tokens,
            "total_tokens": chunk.prompt_tokens + chunk.completion_tokens}


def finish_reason(chunk: GenerationChunk, model: str) -> str:
    if chunk.finish_reason == FinishReason.CANCELLED:  # the engine stopped under the request (shutdown)
        raise Unavailable(f"model {model!r} stopped before the request finished; retry", field="model",
                          value=model, reason="MODEL_STOPPING")
    return _FINISH[chunk.finish_reason]


async def event_stream(chunks: ChunkStream, parsed: CompletionRequest | ChatCompletionRequest, request_id: str,
                       where: str) -> AsyncIterator[str]:
    """The server-sent events of a streamed completion or chat completion, ending ``data: [DONE]``; an
    error after the status line went out travels as an ``{"error": ...}`` event. Each yielded string holds the
    events of the chunks that had arrived together (one write for them all)."""
    chat = isinstance(parsed, ChatCompletionRequest)
    created = int(time.time())
    head = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": parsed.model}
    usage_field = {"usage": None} if parsed.include_usage else {}

    def frame(payload: dict) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def choice(text: str, finish: str | None, first: bool = False) -> dict:
        if chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    def frames(chunk: GenerationChunk) -> list[str]:
        if chunk.finish_reason is None:
            return [frame({**head, "choices": [choice(chunk.text, None)], **usage_field})] if chunk.text else []
        finish = finish_reason(chunk, parsed.model)
        last = [frame({**head, "choices": [choice(chunk.text, finish)], **usage_field})]
        if parsed.include_usage:
            last.append(frame({**head, "choices": [], "usage": usage(chunk)}))
        return last

    if chat:
        yield frame({**head, "choices": [choice("", None, first=True)], **usage_field})
    try:
        # One yield (one write) per batch of chunks that arrived together; one event per chunk, as before.
        async for batch in chunks.batches():
            out: list[str] = []
            for chunk in batch:
                try:
                    out.extend(frames(chunk))
                except Exception:
                    if out:  # the events before the failing one still go out, then the error event
                        yield "".join(out)
                    raise
            if out:
                yield "".join(out)
    except Exception as exc:  # noqa: BLE001 - the status line is gone: the error travels as an event
        _, body = errors.from_exception(exc, where)
        yield frame(body)
    yield "data: [DONE]\n\n"


class CollectedResponse:
    """ASGI response of a non-streamed generation: waits for the whole text while watching for a
    disconnect (which cancels the request), then answers with one JSON body."""

    def __init__(self, chunks: ChunkStream, parsed: CompletionRequest | ChatCompletionRequest, request_id: str,
                 kind: str, where: str, release: Callable[[], None]):
        self.chunks, self.parsed, self.request_id = chunks, parsed, request_id
        self.kind, self.where, self.release = kind, where, release
        self.chat = isinstance(parsed, ChatCompletionRequest)

    async def __call__(self, scope, receive, send) -> None:
        texts: list[str] = []
        last: list[GenerationChunk] = []
        failure: list[BaseException] = []

        async def work() -> None:
            try:
                async for chunk in self.chunks:
                    texts.append(chunk.text)
                    last[:] = [chunk]
            except Exception as exc:  # noqa: BLE001 - answered below
                failure.append(exc)

        try:
            gone = await run_watched(work, receive, self.chunks.cancel)
            if gone:
                return
            try:
                if failure:
                    raise failure[0]
                response = JSONResponse(self._body("".join(texts), last[0]))
            except Exception as exc:  # noqa: BLE001
                response = errors.error_response(*errors.from_exception(exc, self.where))
            await response(scope, receive, send)
        finally:
            self.chunks.cancel()
            self.release()

    def _body(self, text: str, end: GenerationChunk) -> dict:
        finish = finish_reason(end, self.parsed.model)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {"id": self.request_id, "object": self.kind, "created": int(time.time()),
                "model": self.parsed.model, "choices": [choice], "usage": usage(end)}
