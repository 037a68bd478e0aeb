"""Model-sized preparation of a request, kept off the RPC threads and bounded.

Some submits need work proportional to the model before they can answer: the compiler plans an artifact
(fetches and hashes the base model, reads the adapters), the trainer builds the model on the meta device
to list its modules. That work runs here, on ``--preparation-threads`` threads of its own; at most
``--preparation-queue`` more requests wait for one, and a request beyond them is RESOURCE_EXHAUSTED at once
(reason ``TOO_MANY_PREPARATIONS``), so waiting submits can never hold every unary RPC thread. The handler
waits for its result while its client is there; once the client cancels or passes its deadline, the handler
stops waiting (ClientGone) and a preparation that had not started is dropped. Cheap validation (fields,
config.json, the memory budget) runs before, on the RPC thread, so a flood of bad requests never queues.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from typing import TypeVar

from loraflow.errors import ResourceExhausted
from loraflow.options.budget import PREPARATION_QUEUE, PREPARATION_THREADS, ResourceBudget, process_budget

T = TypeVar("T")


class ClientGone(Exception):
    """The caller cancelled or passed its deadline: the handler stops instead of finishing unseen work."""


class PreparationPool:
    """`threads` preparations at once, `queue` more waiting, RESOURCE_EXHAUSTED beyond."""

    def __init__(self, threads: int, queue: int, *, poll_s: float = 0.05):
        self.threads, self.queue = threads, queue
        self._pool = futures.ThreadPoolExecutor(threads, thread_name_prefix="prepare")
        self._slots = threading.BoundedSemaphore(threads + queue)
        self._count_lock = threading.Lock()
        self._pending = 0
        self.poll_s = poll_s

    @property
    def pending(self) -> int:
        """Preparations running or waiting for a thread."""
        return self._pending

    def _done(self, _future: futures.Future) -> None:
        with self._count_lock:
            self._pending -= 1
        self._slots.release()

    def submit(self, fn: Callable[[], T], *, what: str) -> futures.Future:
        """Start `fn` on the pool, or ResourceExhausted when `threads + queue` are taken."""
        if not self._slots.acquire(blocking=False):
            raise ResourceExhausted(
                f"{what}: this server is already preparing {self.threads + self.queue} requests "
                f"({PREPARATION_THREADS.flag} {self.threads}, {PREPARATION_QUEUE.flag} {self.queue}); retry later",
                reason="TOO_MANY_PREPARATIONS",
                metadata={"preparation_threads": str(self.threads), "preparation_queue": str(self.queue)})
        with self._count_lock:
            self._pending += 1
        try:
            future = self._pool.submit(fn)
        except BaseException:
            self._done(None)
            raise
        future.add_done_callback(self._done)
        return future

    def wait(self, future: futures.Future, alive: Callable[[], bool]) -> T:
        """`future`'s result while `alive()`; ClientGone (and the future cancelled if not started) otherwise."""
        while True:
            try:
                return future.result(timeout=self.poll_s)
            except futures.TimeoutError:
                if not alive():
                    future.cancel()
                    raise ClientGone("the client went away while its request was being prepared") from None

    def run(self, fn: Callable[[], T], *, alive: Callable[[], bool], what: str) -> T:
        return self.wait(self.submit(fn, what=what), alive)


_pools: dict[tuple[int, int], PreparationPool] = {}
_lock = threading.Lock()


def preparation_pool(budget: ResourceBudget | None = None) -> PreparationPool:
    """The process's pool for `budget`'s settings (the process budget's by default), made once."""
    budget = budget or process_budget()
    key = (budget.preparation_threads, budget.preparation_queue)
    with _lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = PreparationPool(*key)
        return pool
