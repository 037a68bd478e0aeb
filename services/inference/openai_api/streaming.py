"""A RequestHandle's chunks on the event loop, and responses that cancel the request when the client goes.

The handle's iterator blocks, so one thread per request pumps its chunks into an asyncio queue.
Both response kinds watch ASGI ``receive`` for ``http.disconnect`` while they wait: a client that
closes the connection cancels its engine request (its KV slot frees on the next step) and the
``on_close`` callback (which releases the request's concurrency slot) runs whatever happens.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio

from services.inference.engine import GenerationChunk, RequestHandle

_END = object()


class ChunkStream:
    """Async iteration over one RequestHandle (the engine's errors are raised here)."""

    def __init__(self, handle: RequestHandle):
        self.handle = handle
        self._queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(self._queue.put_nowait, item)
            except RuntimeError:  # the loop closed (server stopped): nobody is listening any more
                pass

        def pump() -> None:
            try:
                for chunk in handle:
                    put(chunk)
            except BaseException as err:  # noqa: BLE001 - handed to the reader, raised there
                put(err)
            put(_END)

        threading.Thread(target=pump, name=f"http-pump-{handle.request_id}", daemon=True).start()

    def cancel(self) -> None:
        if not self.handle.finished.is_set():
            self.handle.cancel()

    def __aiter__(self) -> AsyncIterator[GenerationChunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[GenerationChunk]:
        async for batch in self.batches():
            for chunk in batch:
                yield chunk

    async def batches(self) -> AsyncIterator[list[GenerationChunk]]:
        """The chunks in order, each batch every chunk that had arrived when it was taken (at least one): a
        stream whose loop fell behind catches up in one write instead of one per token."""
        while True:
            item = await self._queue.get()
            batch: list[GenerationChunk] = []
            while True:
                if item is _END or isinstance(item, BaseException):
                    if batch:
                        yield batch
                    if item is _END:
                        return
                    raise item
                batch.append(item)
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
            yield batch


async def until_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    """Returns when the client disconnects (the request body has been read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def run_watched(work: Callable[[], Awaitable[None]], receive, on_disconnect: Callable[[], None]) -> bool:
    """Run ``work`` until it ends or the client disconnects (then cancel it and call on_disconnect).
    True when the client went away first."""
    gone = False
    async with anyio.create_task_group() as group:
        async def watch() -> None:
            nonlocal gone
            await until_disconnect(receive)
            gone = True
            on_disconnect()
            group.cancel_scope.cancel()

        group.start_soon(watch)
        await work()
        group.cancel_scope.cancel()
    return gone


class EventStreamResponse:
    """An ASGI text/event-stream response of ``events`` (each a full ``data: ...\\n\\n`` frame)."""

    def __init__(self, events: AsyncIterator[str], *, on_disconnect: Callable[[], None],
                 on_close: Callable[[], None]):
        self.events = events
        self.on_disconnect = on_disconnect
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async def work() -> None:
                await send({"type": "http.response.start", "status": 200, "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no")]})
                async for event in self.events:
                    await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})

            await run_watched(work, receive, self.on_disconnect)
        finally:
            self.on_close()
