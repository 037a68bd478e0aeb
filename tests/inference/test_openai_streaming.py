"""The OpenAI API's event stream: chunks that arrived together go out as one write, one event each, in order."""

from __future__ import annotations

import asyncio
import json
import threading

from loraflow.artifact.scheduler import FinishReason
from services.inference.engine import GenerationChunk
from services.inference.openai_api.responses import event_stream
from services.inference.openai_api.schemas import parse_completion
from services.inference.openai_api.streaming import ChunkStream


class Handle:
    """A RequestHandle's shape: three chunks at once, the last one when ``go`` is set."""

    request_id = "r1"

    def __init__(self):
        self.go = threading.Event()
        self.finished = threading.Event()

    def __iter__(self):
        for text in ("a", "b", "c"):
            yield GenerationChunk("r1", text, (1,))
        self.go.wait(10)
        yield GenerationChunk("r1", "d", (2,), FinishReason.LENGTH, prompt_tokens=3, completion_tokens=4)
        self.finished.set()

    def cancel(self):
        pass


def events(text: str) -> list[dict | str]:
    frames = [f.removeprefix("data: ") for f in text.split("\n\n") if f]
    return [f if f == "[DONE]" else json.loads(f) for f in frames]


def test_chunks_that_arrived_together_are_one_write_of_one_event_each():
    async def run() -> list[str]:
        handle = Handle()
        chunks = ChunkStream(handle)
        for _ in range(500):  # until the pump thread has queued the first three
            if chunks._queue.qsize() == 3:
                break
            await asyncio.sleep(0.01)
        parsed = parse_completion({"model": "m", "prompt": "hi", "stream": True,
                                   "stream_options": {"include_usage": True}})
        writes = []
        async for text in event_stream(chunks, parsed, "cmpl-1", "POST /v1/completions"):
            writes.append(text)
            handle.go.set()
        return writes

    writes = asyncio.run(run())
    assert len(writes) == 3, writes  # the three waiting chunks, the last chunk with its usage, [DONE]
    first = events(writes[0])
    assert [e["choices"][0]["text"] for e in first] == ["a", "b", "c"]
    assert all(e["choices"][0]["finish_reason"] is None and e["usage"] is None for e in first)
    last = events(writes[1])
    assert last[0]["choices"][0] == {"index": 0, "text": "d", "logprobs": None, "finish_reason": "length"}
    assert last[1]["choices"] == [] and last[1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4,
                                                             "total_tokens": 7}
    assert events(writes[2]) == ["[DONE]"]
