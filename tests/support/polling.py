"""Waiting for a condition that another thread or process brings about, with a bound."""

from __future__ import annotations

import time


def wait_for(predicate, timeout: float = 10.0, what: str = "the condition"):
    """The first truthy value of `predicate()`, polled every 50 ms; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
