"""Every inference replica converges to its deployment's desired models (services.inference.desired_state).

`Reconciler.run()` (a thread, until `stop`): reconcile on start, on each change message, and at least
every `poll_s` (the version counter) so a missed message cannot stall convergence. One pass loads the
desired models missing here, unloads the loaded ones no longer desired, and hot-adds the adapters listed
after the last one applied here. A failure is recorded for this replica (`failures()`, the
`loraflow_inference_reconcile_failures` gauge, a log line) and retried with capped exponential backoff,
never in a hot loop. `converged` (every desired model loaded here) drives readiness via `on_converged`.

The RPC side (`load_artifact`, `unload`, `load_adapter`): validate, write the desired state, then apply
it locally so the answer comes once this replica has converged; the other replicas follow.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
from prometheus_client import Gauge

from loraflow.errors import InvalidArgument, LoraflowError, NotFound, Unavailable
from services.inference.desired_state import DesiredModel, DesiredState
from services.inference.model_manager import LoadedModel, ModelManager, model_identity

log = logging.getLogger(__name__)

CONVERGED = Gauge("loraflow_inference_converged",
                  "1 while every model of this replica's deployment is loaded here, else 0.")
FAILURES = Gauge("loraflow_inference_reconcile_failures",
                 "Consecutive failures of this replica to apply a desired model.", ["model"])

DEFAULT_POLL_S = 5.0
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 60.0


@dataclass(frozen=True)
class Failure:
    model_id: str
    error: str
    attempts: int
    retry_at: float  # time.monotonic()


@dataclass
class _Applied:
    load_id: str
    adapters: int  # how many of the entry's adapters were hot-added here


class Reconciler:
    def __init__(self, state: DesiredState, manager: ModelManager, *, stop: threading.Event | None = None,
                 poll_s: float = DEFAULT_POLL_S, on_converged: Callable[[bool], None] | None = None,
                 backoff_base_s: float = BACKOFF_BASE_S, backoff_cap_s: float = BACKOFF_CAP_S):
        if not isinstance(poll_s, int | float) or not 0.05 <= poll_s <= 300:
            raise InvalidArgument(f"poll_s must be in 0.05..300 seconds, got {poll_s!r}", field="poll_s",
                                  value=poll_s)
        self.state, self.manager = state, manager
        self.stop_event = stop or threading.Event()
        self.poll_s = float(poll_s)
        self.backoff_base_s, self.backoff_cap_s = float(backoff_base_s), float(backoff_cap_s)
        self._on_converged = on_converged or (lambda ok: None)
        self._lock = threading.RLock()  # one pass at a time: the thread and the RPCs share it
        self._applied: dict[str, _Applied] = {}
        self._failures: dict[str, Failure] = {}
        self.converged = False
        self.passes = 0
        self._thread: threading.Thread | None = None
        self._set_converged(False)

    # ---- status --------------------------------------------------------------------------------
    def failures(self) -> dict[str, Failure]:
        with self._lock:
            return dict(self._failures)

    def _set_converged(self, ok: bool) -> None:
        self.converged = ok
        CONVERGED.set(1 if ok else 0)
        self._on_converged(ok)

    # ---- the loop ------------------------------------------------------------------------------
    def start(self) -> Reconciler:
        self._thread = threading.Thread(target=self.run, name="inference-reconciler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(self.poll_s + 10)

    def run(self) -> None:
        watch = self.state.subscribe()
        seen_version = -1
        backoff = 0.1
        try:
            while not self.stop_event.is_set():
                try:
                    version = self.state.version()
                    due = any(f.retry_at <= time.monotonic() for f in self.failures().values())
                    if version != seen_version or due:
                        self.reconcile_once()
                        seen_version = version
                    backoff = 0.1
                    watch.wait(self._next_wait())
                except (redis.ConnectionError, redis.TimeoutError, Unavailable) as exc:
                    # Redis away: keep serving what is loaded; look again with backoff + jitter.
                    log.warning("reconciler: redis unreachable (%s); retrying", type(exc).__name__)
                    self.stop_event.wait(random.uniform(0.5, 1.0) * backoff)
                    backoff = min(backoff * 2, 5.0)
                except Exception:  # noqa: BLE001 - e.g. a WRONGTYPE key: the loop must outlive it, slowly
                    log.exception("reconciler pass failed; retrying in %.0fs", self.poll_s)
                    self._set_converged(False)
                    self.stop_event.wait(self.poll_s)
        finally:
            watch.close()

    def _next_wait(self) -> float:
        wait = self.poll_s
        now = time.monotonic()
        for f in self.failures().values():
            wait = min(wait, max(0.05, f.retry_at - now))
        return wait

    def reconcile_once(self) -> bool:
        """One pass; returns whether this replica has converged."""
        with self._lock:
            desired = self.state.models()
            loaded = {m.model_id: m for m in self.manager.list()}
            for model_id in list(loaded):
                entry = desired.get(model_id)
                applied = self._applied.get(model_id)
                stale = isinstance(entry, DesiredModel) and applied is not None and applied.load_id != entry.load_id
                if entry is None or stale:
                    self._unload_here(model_id)
                    loaded.pop(model_id)
            for model_id in list(self._failures):
                if model_id not in desired:
                    self._clear_failure(model_id)
            ok = True
            for model_id, entry in desired.items():
                if not self._apply(model_id, entry, loaded.get(model_id)):
                    ok = False
            self.passes += 1
            if ok != self.converged:
                log.info("replica %s deployment %r (%d models)", "converged on" if ok else "is converging to",
                         self.state.deployment, len(desired))
            self._set_converged(ok)
            return ok

    def _apply(self, model_id: str, entry: DesiredModel | ValueError, model: LoadedModel | None) -> bool:
        failure = self._failures.get(model_id)
        if failure is not None and failure.retry_at > time.monotonic():
            return False  # backing off
        try:
            if isinstance(entry, ValueError):
                raise entry
            if model is None:
                model = self.manager.load_artifact(entry.artifact_id, entry.device, entry.model_id, entry.num_threads)
                self._applied[model_id] = _Applied(entry.load_id, 0)
                log.info("reconciler: loaded %s (artifact %s on %s)", model_id, entry.artifact_id, entry.device)
            applied = self._applied.setdefault(model_id, _Applied(entry.load_id, 0))
            for desired_adapter in entry.adapters[applied.adapters:]:
                self.manager.load_adapter(model_id, desired_adapter.adapter, desired_adapter.name)
                applied.adapters += 1
                log.info("reconciler: hot-added adapter %s to %s", desired_adapter.name, model_id)
        except (redis.ConnectionError, redis.TimeoutError, Unavailable):
            raise
        except Exception as exc:  # noqa: BLE001 - one bad entry must not stop the others converging
            self._record_failure(model_id, exc)
            return False
        self._clear_failure(model_id)
        return True

    def _record_failure(self, model_id: str, exc: BaseException) -> None:
        previous = self._failures.get(model_id)
        attempts = previous.attempts + 1 if previous else 1
        delay = min(self.backoff_cap_s, self.backoff_base_s * 2 ** (attempts - 1)) * random.uniform(0.8, 1.0)
        text = str(exc) if isinstance(exc, LoraflowError) else f"{type(exc).__name__}: {exc}"
        self._failures[model_id] = Failure(model_id, text, attempts, time.monotonic() + delay)
        FAILURES.labels(model=model_id).set(attempts)
        log.warning("reconciler: cannot apply desired model %s (attempt %d, next try in %.1fs): %s",
                    model_id, attempts, delay, text)

    def _clear_failure(self, model_id: str) -> None:
        if self._failures.pop(model_id, None) is not None:
            try:
                FAILURES.remove(model_id)
            except KeyError:
                pass

    def _unload_here(self, model_id: str) -> None:
        try:
            self.manager.unload(model_id)
            log.info("reconciler: unloaded %s (no longer desired)", model_id)
        except NotFound:
            pass
        self._applied.pop(model_id, None)

    # ---- the RPCs ------------------------------------------------------------------------------
    def load_artifact(self, artifact_id: str, device: str = "cpu", model_id: str = "",
                      num_threads: int = 0) -> LoadedModel:
        device, model_id = model_identity(artifact_id, device, model_id)
        self.manager.registry.get_artifact(artifact_id)  # NotFound before anything is written
        with self._lock:
            before = self.state.get(model_id)
            entry = self.state.put_model(model_id, artifact_id, device, num_threads)
            created = before is None
            if model_id not in {m.model_id for m in self.manager.list()}:
                try:
                    self.manager.load_artifact(artifact_id, device, model_id, num_threads)
                except BaseException:
                    # It does not load here: withdraw what this call desired (unless changed meanwhile) and
                    # answer with the load's own error, as a single server does.
                    if created:
                        self.state.remove_model(model_id, load_id=entry.load_id)
                    raise
                self._applied[model_id] = _Applied(entry.load_id, 0)
            self.reconcile_once()  # adapters the entry lists already, and the readiness flip
            return self.manager.get(model_id)

    def unload(self, model_id: str) -> LoadedModel:
        with self._lock:
            model = self.manager.get(model_id)  # NotFound as today for a model not loaded here
            try:
                self.state.remove_model(model_id)
            except NotFound:
                pass  # loaded here outside the desired state (cannot happen with one writer): just unload
            self.reconcile_once()
            if model_id in {m.model_id for m in self.manager.list()}:
                self._unload_here(model_id)
            return model

    def load_adapter(self, model_id: str, adapter: str, name: str = "") -> LoadedModel:
        with self._lock:
            self.manager.get(model_id)
            # Validated by doing it here first (registry lookup, path confinement, a free slot).
            model = self.manager.load_adapter(model_id, adapter, name)
            entry = self.state.add_adapter(model_id, adapter, name)
            applied = self._applied.get(model_id)
            if applied is not None and applied.load_id == entry.load_id:
                applied.adapters = len(entry.adapters)  # already in a slot here
            return model
