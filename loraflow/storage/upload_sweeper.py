"""Removes the blobs of pushes that were never committed, so abandoned uploads do not fill the store.

A blob (``uploads/blobs/sha256/<hex>``, storage_layout) is staging: CommitDirectory drops it once a directory
made from it is published and no other push claims it. One that outlives the time-to-live belongs to a push
that stopped and was not run again. Deleting it is safe at any moment: a commit that finds a blob gone
answers with the missing files, and the client uploads them again (transfer.MAX_COMMIT_ROUNDS). Claims
(``uploads/claims/...``) older than the time-to-live go too, and the folders they leave empty. Every API
replica may sweep; deletes of the same key are idempotent.
"""

from __future__ import annotations

import logging
import threading
import time

from loraflow.errors import InvalidArgument, LoraflowError
from loraflow.storage.storage_layout import BLOBS_PREFIX, CLAIMS_PREFIX
from loraflow.storage.store import ObjectStore

log = logging.getLogger(__name__)

DEFAULT_BLOB_TTL_SECONDS = 86400.0
# A push resumed within the TTL sends only what had not arrived; below ten minutes a slow push could lose
# blobs it is about to commit, above thirty days the store keeps garbage for no one.
MIN_BLOB_TTL_SECONDS = 600.0
MAX_BLOB_TTL_SECONDS = 30 * 86400.0
MAX_SWEEP_INTERVAL_SECONDS = 3600.0


def check_blob_ttl(value: float, field: str = "upload_blob_ttl") -> float:
    """0 (never sweep) or MIN..MAX seconds; InvalidArgument naming the field otherwise."""
    value = float(value)
    if value != 0 and not MIN_BLOB_TTL_SECONDS <= value <= MAX_BLOB_TTL_SECONDS:
        shown = f"{value:.0f}" if value.is_integer() else str(value)
        raise InvalidArgument(f"{field} must be 0 (never remove) or {MIN_BLOB_TTL_SECONDS:.0f}.."
                              f"{MAX_BLOB_TTL_SECONDS:.0f} seconds, got {shown}", field=field, value=value)
    return value


def sweep_abandoned_blobs(store: ObjectStore, ttl_seconds: float, *, now: float | None = None) -> tuple[int, int]:
    """Delete the blobs (and claims) last modified more than `ttl_seconds` before `now`; returns the blobs
    (deleted, kept)."""
    cutoff = (time.time() if now is None else now) - ttl_seconds
    deleted = kept = 0
    for key, modified in store.list_modified(BLOBS_PREFIX):
        if modified < cutoff:
            deleted += store.delete(key)
        else:
            kept += 1
    for key, modified in store.list_modified(CLAIMS_PREFIX):
        if modified < cutoff:
            store.delete(key)
    store.prune_empty_dirs(CLAIMS_PREFIX, cutoff)
    return deleted, kept


class BlobSweeper:
    """A daemon thread sweeping every min(ttl/4, 1 h) until stop(); a store outage is logged and retried."""

    def __init__(self, store: ObjectStore, ttl_seconds: float):
        self.store = store
        self.ttl_seconds = check_blob_ttl(ttl_seconds)
        self.interval = min(self.ttl_seconds / 4, MAX_SWEEP_INTERVAL_SECONDS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="upload-blob-sweeper", daemon=True)

    def start(self) -> BlobSweeper:
        if self.ttl_seconds:
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                deleted, kept = sweep_abandoned_blobs(self.store, self.ttl_seconds)
                if deleted:
                    log.info("removed %d upload blob(s) older than %.0f s (%d kept)", deleted, self.ttl_seconds, kept)
            except (LoraflowError, OSError) as exc:
                log.warning("upload blob sweep failed (%s); next try in %.0f s", exc, self.interval)
            self._stop.wait(self.interval)
