"""Hold a runtime's steps after its first until the test says so: for tests that must act while a tiny model's
generation is still running (a tiny model can finish its tokens before a client's next move on a loaded host)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def steps_held_after_first(runtime, release: threading.Event, timeout_s: float = 30.0) -> Iterator[list]:
    """While inside: ``runtime.execute`` runs its first step at once and waits for ``release`` (at most
    ``timeout_s``) before each later one. Yields the steps seen; on leaving, releases and restores."""
    real_execute = runtime.execute
    steps: list = []

    def execute(step):
        steps.append(step)
        if len(steps) > 1:
            release.wait(timeout_s)
        return real_execute(step)

    runtime.execute = execute
    try:
        yield steps
    finally:
        release.set()
        runtime.execute = real_execute
