"""Adapters loaded on first use: a request naming an adapter that is not in a slot loads it, then runs.

Every request of a model goes through ``acquire_resident`` (the engine calls it in ``submit``, so gRPC and
HTTP share it) and, when its adapter is not in a slot, ``acquire_adapter`` once the request is queued
(waiting without a KV slot: see loraflow/artifact/scheduler.py). A name already in a slot is counted and served at once. A
name that is not loaded is resolved (compiled into the artifact, else the registry), and one load
runs per name however many requests ask for it at once: the first request becomes the loader, the
others wait on its result. The load takes a free slot, else the least recently used idle one (no
queued or running request uses it); with every slot busy it waits up to ``wait_s`` (default
``DEFAULT_ADAPTER_WAIT_S``) and then fails with RESOURCE_EXHAUSTED.

Eviction policy (as vLLM and LoRAX do it): every slot is a cache entry. Adapters compiled into the
artifact, hot-added with LoadAdapter, or loaded on first use are all evictable once idle, least
recently used first; an adapter with a queued or running request never is. The adapter leaving a
slot is copied into the host cache (``HostAdapterCache``), so bringing it back is a memory copy.
An adapter LoadAdapter took from a URI or path that is not registered cannot come back on first
use (a request names adapters, never files): after its eviction it is NOT_FOUND until loaded again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loraflow.errors import FailedPrecondition, NotFound
from loraflow.options.names import validate_name
from services.inference import metrics
from services.inference.adapter_cache import CachedAdapter, HostAdapterCache
from services.inference.adapter_slots import AdapterSlots
from services.inference.engine import StepRuntime

# How long a request waits for an adapter slot to go idle before RESOURCE_EXHAUSTED.
DEFAULT_ADAPTER_WAIT_S = 30.0
MAX_ADAPTER_WAIT_S = 3600.0


@dataclass(frozen=True)
class AdapterOrigin:
    """Where a not-loaded adapter comes from: ``source`` names it for the host cache and ``Model``
    listings (a registry URI, or ``artifact:<path>`` for one compiled in); ``fetch`` returns its local
    PEFT dir and is called only on a host-cache miss; ``kind`` labels the load metrics."""

    source: str
    fetch: Callable[[], Path]
    kind: str  # "store" | "artifact" | "path"


@dataclass
class _PendingLoad:
    """One in-flight load; ``waiters`` requests (the loader included) get the slot counted for them."""

    waiters: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    slot: int = 0
    error: BaseException | None = None
    tier: str = ""  # where the weights came from: host_cache, store, artifact, path

    def result(self) -> int:
        self.done.wait()  # the loader is bounded (slot wait), so this is too
        if self.error is not None:
            raise self.error
        return self.slot


class OnDemandAdapters:
    """The adapter slots of one loaded model, filled on demand; thread-safe."""

    def __init__(self, runtime: StepRuntime, *, model_id: str, artifact_id: str,
                 resolve: Callable[[str], AdapterOrigin], cache: HostAdapterCache,
                 wait_s: float = DEFAULT_ADAPTER_WAIT_S):
        self.runtime = runtime
        self.slots: AdapterSlots = runtime.adapters
        self.model_id = model_id
        self.artifact_id = artifact_id
        self._resolve = resolve
        self.cache = cache
        self.wait_s = wait_s
        self._pending: dict[str, _PendingLoad] = {}
        self._lock = threading.Lock()

    # ---- requests --------------------------------------------------------------------------
    def acquire_adapter(self, name: str) -> int:
        """lora_id for ``name`` ("" = base), counting one more request on it; loads it when absent."""
        if not name:
            return 0
        try:
            slot = self.runtime.acquire_adapter(name)  # the common case: no lock of ours
        except NotFound:
            self._check_name(name)
        else:
            metrics.ADAPTER_REQUESTS.labels(self.model_id, "slot").inc()
            return slot
        with self._lock:
            try:
                slot = self.runtime.acquire_adapter(name)  # a load may have finished meanwhile
            except NotFound:
                pass
            else:
                metrics.ADAPTER_REQUESTS.labels(self.model_id, "slot").inc()
                return slot
            pending = self._pending.get(name)
            leader = pending is None
            if leader:
                pending = self._pending[name] = _PendingLoad()
            pending.waiters += 1
        if leader:
            self._load(name, pending, wait_s=self.wait_s)
        slot = pending.result()
        metrics.ADAPTER_REQUESTS.labels(self.model_id, pending.tier).inc()
        return slot

    def acquire_resident(self, name: str) -> int | None:
        """lora_id for ``name`` ("" = base) if it is in a slot, counting one more request on it; else None
        (``acquire_adapter`` loads it). InvalidArgument for a malformed name."""
        if not name:
            return 0
        try:
            slot = self.runtime.acquire_adapter(name)
        except NotFound:
            self._check_name(name)
            return None
        metrics.ADAPTER_REQUESTS.labels(self.model_id, "slot").inc()
        return slot

    def check_servable(self, name: str, *, field: str = "adapter") -> None:
        """NotFound unless ``name`` is loaded or can be loaded (compiled in or registered); no fetch."""
        if not name:
            return
        self._check_name(name, field)
        if name in self.runtime.adapter_names():
            return
        try:
            self._resolve(name)
        except NotFound as err:
            raise NotFound(err.message, field=field, value=name) from None

    def waiting(self) -> dict[str, int]:
        """Adapter name -> requests waiting for its load (for the routing metrics)."""
        with self._lock:
            return {name: p.waiters for name, p in self._pending.items()}

    # ---- explicit loads (LoadAdapter) --------------------------------------------------------
    def load(self, name: str, origin: AdapterOrigin) -> int:
        """Load ``name`` from ``origin`` now (no waiting for a slot); returns its slot."""
        validate_name("name", name)
        with self._lock:
            if name in self._pending:
                raise FailedPrecondition(f"adapter {name!r} is being loaded on this model", field="name", value=name)
            pending = self._pending[name] = _PendingLoad()
        self._load(name, pending, wait_s=0.0, origin=origin)
        return pending.result()

    # ---- the load ----------------------------------------------------------------------------
    def _load(self, name: str, pending: _PendingLoad, *, wait_s: float, origin: AdapterOrigin | None = None) -> None:
        """Resolve, read (host cache or source), take a slot, write, publish; errors go to every waiter."""
        started = time.monotonic()
        slot = None
        try:
            origin = origin or self._resolve(name)
            cached = self.cache.get((self.artifact_id, name, origin.source))
            if cached is not None:
                weights, rank, kind = cached.tensors, cached.rank, "host_cache"
            else:
                # read_adapter's validation + the fit check: the precise LoadAdapter errors.
                weights, rank = self.slots.tensors_of(name, origin.fetch())
                kind = origin.kind
            slot, evicted = self.slots.reserve(name, wait_s=wait_s)
            if evicted is not None:
                self._keep_evicted(slot, evicted.name, evicted.source, evicted.r)
            self.slots.write(slot, weights)
            with self._lock:
                self.slots.commit(slot, name, rank, source=origin.source,
                                   active_requests=pending.waiters)
                del self._pending[name]
            pending.slot, pending.tier = slot, kind
        except BaseException as err:
            if slot is not None:
                self.slots.release_reservation(slot)
            with self._lock:
                self._pending.pop(name, None)
            pending.error = err
            metrics.ADAPTER_LOAD_FAILURES.labels(self.model_id).inc()
            metrics.log_event("adapter_load_failed", model=self.model_id, adapter=name, error=repr(err))
        else:
            seconds = time.monotonic() - started
            metrics.ADAPTER_LOADS.labels(self.model_id, kind).inc()
            metrics.ADAPTER_LOAD_SECONDS.labels(self.model_id, kind).observe(seconds)
            metrics.log_event("adapter_loaded", model=self.model_id, adapter=name, slot=slot, source=origin.source,
                              via=kind, seconds=round(seconds, 4), requests=pending.waiters)
        finally:
            pending.done.set()

    def _keep_evicted(self, slot: int, name: str, source: str, rank: int) -> None:
        metrics.ADAPTER_EVICTIONS.labels(self.model_id).inc()
        metrics.log_event("adapter_evicted", model=self.model_id, adapter=name, slot=slot)
        if self.cache.max_bytes:
            dropped = self.cache.put((self.artifact_id, name, source), CachedAdapter(self.slots.copy(slot), rank))
            metrics.ADAPTER_CACHE_EVICTIONS.inc(dropped)
            metrics.ADAPTER_CACHE_BYTES.set(self.cache.nbytes)

    def _check_name(self, name: str, field: str = "adapter") -> None:
        if name.startswith("\x00"):  # no adapter is ever loaded under a NUL name: unknown, not malformed
            raise NotFound(f"adapter {name!r} is not loaded on model {self.model_id!r}", field=field, value=name)
        validate_name(field, name)
