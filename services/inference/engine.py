"""The step loop of one loaded model: schedule → execute → sample → stream token ids.

One background thread per model runs the loop (stopped by ``stop()``). ``submit`` returns a
``RequestHandle`` whose iterator yields incremental ``GenerationChunk``s, the last one with a
finish reason and usage. ``handle.cancel()`` (client gone, deadline) frees the request's slot on the
next step.

Detokenizing is not the loop's work (as in vLLM v1, where it is the output processor's): the loop hands
each request its sampled ids, and the request's own consumer (the RPC or HTTP thread iterating the
handle) turns them into text and matches stop strings. A match asks the loop to end the request
(``stop_string``); tokens the loop sampled meanwhile are dropped and not counted. So text work, however
long a request's stop strings or text, costs that request's consumer, never every row's step.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from loraflow.artifact.scheduler import FinishReason, Scheduler, SchedulerOutput, Sequence
from loraflow.errors import FailedPrecondition, LoraflowError
from loraflow.options.names import validate_request_id
from services.inference import metrics
from services.inference.adapter_slots import AdapterSlots
from services.inference.detokenizer import IncrementalDetokenizer
from services.inference.sampling import NonFiniteLogits, Sampler, SamplingParams

# How long the idle loop sleeps before re-checking the stop flag.
_IDLE_WAIT_S = 0.1
# An idle engine that just got a request waits while more keep arriving (each within this long of the
# last, at most _ADMISSION_MAX_S in all), so a batch submitted row by row (GenerateBatch, generate())
# is prefilled as one call instead of its first row alone and the rest behind that row's decode steps.
_ADMISSION_GAP_S = 0.002
_ADMISSION_MAX_S = 0.02


class StepRuntime(Protocol):
    """What the engine needs from a runtime (services.inference.runtime.OrtRuntime and
    services.inference.ai100_runtime.Ai100Runtime implement it)."""

    adapters: AdapterSlots  # the adapter-slot table (OnDemandAdapters loads into it)
    full_batch_size: int
    prefill_seq_len: int
    ctx_len: int
    max_prefill_rows: int
    # The chunk limit while no row decodes: longer than prefill_seq_len for graphs that take any chunk length.
    idle_prefill_seq_len: int
    # Padded tokens a prefill call next to decoding rows may take, in whole prompts (None: prefill_seq_len chunks).
    prefill_token_budget: int | None
    # Whether ``execute`` applies SchedulerOutput.moves (the scheduler then keeps running rows in the lowest slots).
    compacts_kv_slots: bool

    def execute(self, step: SchedulerOutput) -> np.ndarray:
        """Logits [B, V] (float32) at the last real token of each row of ``step``."""

    def acquire_adapter(self, name: str) -> int:
        """lora_id for an adapter name ("" = base, 0); counts the request as using it. NotFound if unknown."""

    def release_adapter(self, lora_id: int) -> None: ...

    def reset_slot(self, slot: int) -> None:
        """Zero one KV-cache slot (after a request whose values may be NaN/inf)."""


class AdapterAcquirer(Protocol):
    """Resolves a request's adapter to a lora_id, counting the request on it (OnDemandAdapters loads
    absent adapters here); released through the runtime's ``release_adapter``."""

    def acquire_adapter(self, name: str) -> int: ...

    def acquire_resident(self, name: str) -> int | None:
        """lora_id of an adapter already in a slot (counting the request on it), else None (no load)."""

    def waiting(self) -> dict[str, int]:
        """Adapter name -> requests waiting for it to be loaded."""


@dataclass(frozen=True)
class RoutingSnapshot:
    """What a LoRA-aware router reads about one engine (see services.inference.metrics)."""

    num_waiting: int
    num_running: int
    kv_cache_usage: float  # fraction of KV-cache slots in use
    max_lora: int
    running_adapters: tuple[str, ...]
    waiting_adapters: tuple[str, ...]


class Tokenizer(Protocol):
    eos_ids: frozenset[int]

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    adapter: str = ""
    sampling: SamplingParams = SamplingParams()
    request_id: str = ""

    def __post_init__(self) -> None:
        validate_request_id(self.request_id)  # echoed in every chunk: bounded and of a safe charset


@dataclass(frozen=True)
class GenerationChunk:
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


_END = object()


@dataclass(frozen=True)
class _Sampled:
    """What the loop hands a request's consumer per step: its new token, and at the end the reason and usage."""

    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class RequestHandle:
    """Iterate for chunks; cancel() to stop early. Raises the engine's error if the request failed.

    The iterating thread detokenizes (see module docstring); iterate from one thread only."""

    def __init__(self, engine: Engine, request_id: str, detokenizer: IncrementalDetokenizer, prompt_tokens: int):
        self.request_id = request_id
        self._engine = engine
        self._detok = detokenizer
        self._prompt_tokens = prompt_tokens
        self._chunks: queue.Queue = queue.Queue()
        self.finished = threading.Event()

    def cancel(self) -> None:
        self._engine.cancel(self.request_id)

    def __iter__(self) -> Iterator[GenerationChunk]:
        detok, consumed = self._detok, 0
        while True:
            item = self._chunks.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            text = ""
            for token in item.token_ids:
                text += detok.add(token)
                consumed += 1
            reason, completion = item.finish_reason, item.completion_tokens
            if detok.stopped and reason is None:
                # A stop string matched: end here; the loop frees the slot on its next step.
                self._engine.stop_string(self.request_id)
                reason, completion = FinishReason.STOP_STRING, consumed
            if reason is None:
                yield GenerationChunk(self.request_id, text, item.token_ids)
                continue
            if reason != FinishReason.CANCELLED:
                text += detok.finish()
            yield GenerationChunk(self.request_id, text, item.token_ids, reason, self._prompt_tokens, completion)
            return

    def result(self) -> GenerationChunk:
        """Block until the end; one chunk with all text and token ids."""
        text, ids, last = [], [], None
        for chunk in self:
            text.append(chunk.text)
            ids.extend(chunk.token_ids)
            last = chunk
        assert last is not None
        return GenerationChunk(self.request_id, "".join(text), tuple(ids), last.finish_reason,
                               last.prompt_tokens, last.completion_tokens)

    # engine side
    def _put(self, item: _Sampled | BaseException) -> None:
        self._chunks.put(item)

    def _close(self) -> None:
        self.finished.set()
        self._chunks.put(_END)


@dataclass
class _RequestState:
    request: GenerationRequest
    seq: Sequence
    handle: RequestHandle
    sampler: Sampler
    submit_time: float = field(default_factory=time.monotonic)
    last_token_time: float | None = None


class Engine:
    """Continuous batching over one runtime; thread-safe submit/cancel, one loop thread."""

    def __init__(self, runtime: StepRuntime, tokenizer: Tokenizer, *, model_id: str = "model",
                 max_waiting: int = 64, adapters: AdapterAcquirer | None = None):
        self.runtime = runtime
        self.adapters = adapters  # None: only adapters already in a slot serve
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.scheduler = Scheduler(full_batch_size=runtime.full_batch_size,
                                   prefill_seq_len=runtime.prefill_seq_len, ctx_len=runtime.ctx_len,
                                   max_waiting=max_waiting, max_prefill_rows=runtime.max_prefill_rows,
                                   idle_prefill_seq_len=runtime.idle_prefill_seq_len,
                                   prefill_token_budget=runtime.prefill_token_budget,
                                   compact_slots=runtime.compacts_kv_slots)
        self._states: dict[str, _RequestState] = {}
        self._cancels: set[str] = set()
        self._stop_strings: set[str] = set()  # requests whose consumer matched a stop string
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._last_submit = 0.0  # monotonic time of the latest admission into the scheduler
        self._admission_started = 0.0  # when the current admission wait began (0: none)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0
        metrics.SLOTS_TOTAL.labels(model_id).set(runtime.full_batch_size)
        metrics.ROUTING.track(model_id, self)

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"engine-{self.model_id}", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; every request still queued or running ends with finish_reason cancelled."""
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            for rid in list(self._states):
                seq = self.scheduler.abort(rid)
                if seq is not None:
                    self._finalize(self._states[rid])
        metrics.forget_model(self.model_id)
        metrics.ROUTING.forget(self.model_id, self)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    # ---- requests --------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, *, wait_for_room: threading.Event | None = None) -> RequestHandle:
        """Queue a request; InvalidArgument (prompt too long, ...) / ResourceExhausted (queue full) / NotFound.

        With ``wait_for_room``, a full waiting queue makes the call wait until the loop admits a request
        (or the event is set: the caller gave up) instead of failing, so a bounded batch always fits
        through a bounded queue."""
        request_id = request.request_id or uuid.uuid4().hex
        # An adapter in a slot (or the base) is counted at once; one that is not is loaded below, after the
        # request is queued: it waits in the scheduler holding no KV slot, and requests for resident adapters
        # are admitted past it (loraflow/artifact/scheduler.py).
        if self.adapters is None:
            lora_id: int | None = self.runtime.acquire_adapter(request.adapter)
        else:
            lora_id = self.adapters.acquire_resident(request.adapter)
        seq = Sequence(request_id=request_id, prompt_ids=list(request.prompt_ids), lora_id=lora_id,
                       max_new_tokens=request.sampling.max_new_tokens, eos_ids=self.tokenizer.eos_ids,
                       ignore_eos=request.sampling.ignore_eos)
        handle = RequestHandle(self, request_id, IncrementalDetokenizer(self.tokenizer.decode, request.prompt_ids,
                                                                        request.sampling.stop),
                               len(request.prompt_ids))
        state = _RequestState(request, seq, handle, Sampler(request.sampling))
        try:
            with self._wake:
                # Checked under the lock: stop() cleans up under it, so nothing slips in after that.
                while True:
                    if self._stop.is_set():
                        raise FailedPrecondition(f"model {self.model_id!r} is shutting down", field="model_id",
                                                 value=self.model_id)
                    full = self.scheduler.num_waiting >= self.scheduler.max_waiting
                    if not full or wait_for_room is None or wait_for_room.is_set():
                        break
                    self._wake.wait(_IDLE_WAIT_S)  # the loop notifies after each admission
                self.scheduler.add(seq)
                self._last_submit = time.monotonic()
                self._states[request_id] = state
                metrics.QUEUE_DEPTH.labels(self.model_id).set(self.scheduler.num_waiting)
                self._wake.notify_all()
        except BaseException:
            if lora_id is not None:
                self.runtime.release_adapter(lora_id)
            raise
        if lora_id is None:
            self._load_adapter(state)
        metrics.log_event("request_queued", model=self.model_id, request_id=request_id,
                          adapter=request.adapter or "<base>", prompt_tokens=len(request.prompt_ids))
        return handle

    def _load_adapter(self, state: _RequestState) -> None:
        """Load a queued request's adapter in the caller's thread (bounded wait for a slot); the request is
        admissible once it is in a slot. A failed load takes the request out of the queue and raises."""
        request_id = state.seq.request_id
        try:
            lora_id = self.adapters.acquire_adapter(state.request.adapter)
        except BaseException:
            with self._wake:
                if self._states.get(request_id) is state:
                    self.scheduler.abort(request_id)
                    self._states.pop(request_id, None)
                    metrics.QUEUE_DEPTH.labels(self.model_id).set(self.scheduler.num_waiting)
                    self._wake.notify_all()
            raise
        with self._wake:
            if self._states.get(request_id) is state and self.scheduler.adapter_ready(request_id, lora_id):
                self._wake.notify_all()
                return
        self.runtime.release_adapter(lora_id)  # cancelled (or the engine stopped) while its adapter loaded

    def cancel(self, request_id: str) -> None:
        with self._wake:
            if request_id in self._states:
                self._cancels.add(request_id)
                self._wake.notify_all()

    def stop_string(self, request_id: str) -> None:
        """The request's consumer matched a stop string: end it (STOP_STRING) before its next step."""
        with self._wake:
            if request_id in self._states:
                self._stop_strings.add(request_id)
                self._wake.notify_all()

    def num_active(self) -> int:
        with self._lock:
            return len(self._states)

    def routing_snapshot(self) -> RoutingSnapshot:
        loading = {n: w for n, w in self.adapters.waiting().items() if w} if self.adapters is not None else {}
        with self._lock:
            running = {self._states[rid].request.adapter for rid in self.scheduler.running if rid in self._states}
            waiting = {self._states[s.request_id].request.adapter for s in self.scheduler.waiting
                       if s.request_id in self._states}
            num_waiting, num_running = self.scheduler.num_waiting, self.scheduler.num_running
        # Requests waiting on a load are in the scheduler's queue (Engine.submit queues them first).
        return RoutingSnapshot(
            num_waiting=num_waiting, num_running=num_running,
            kv_cache_usage=num_running / self.scheduler.full_batch_size,
            max_lora=int(getattr(self.runtime, "adapter_slots", 0)),
            running_adapters=tuple(sorted(running - {""})), waiting_adapters=tuple(sorted((waiting | set(loading)) - {""})))

    # ---- the loop --------------------------------------------------------------------------
    def _admission_wait(self) -> float:
        """Seconds to wait for more arrivals before scheduling (0: schedule now). Called under the lock."""
        sched = self.scheduler
        if sched.num_running or not sched.num_waiting or sched.num_waiting >= min(sched.max_waiting,
                                                                                     sched.num_free_slots):
            return 0.0
        now = time.monotonic()
        first = self._admission_started = self._admission_started or now
        return max(0.0, min(self._last_submit + _ADMISSION_GAP_S, first + _ADMISSION_MAX_S) - now)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._wake:
                self._apply_cancels()
                pause = self._admission_wait()
                if pause > 0:
                    self._wake.wait(pause)
                    continue
                self._admission_started = 0.0
                waiting = self.scheduler.num_waiting
                step = self.scheduler.schedule()
                if self.scheduler.num_waiting < waiting:
                    self._wake.notify_all()  # room in the waiting queue for submitters that wait for it
                if step is None:
                    self._wake.wait(_IDLE_WAIT_S)
                    continue
                self._update_gauges()
            try:
                self._run_step(step)
            except Exception as err:  # a failed call fails its requests, not the engine
                self._fail(step, err)

    def _apply_cancels(self) -> None:
        for rid in self._cancels:
            state = self._states.get(rid)
            if state is not None and self.scheduler.abort(rid) is not None:
                self._finalize(state)
        self._cancels.clear()
        for rid in self._stop_strings:
            state = self._states.get(rid)
            if state is not None and self.scheduler.finish(rid, FinishReason.STOP_STRING) is not None:
                self._finalize(state)  # its consumer has ended already; this frees the slot and counts it
        self._stop_strings.clear()

    def _run_step(self, step: SchedulerOutput) -> None:
        started = time.monotonic()
        logits = self.runtime.execute(step)  # [B, V]
        metrics.STEP_SECONDS.labels(self.model_id, step.kind).observe(time.monotonic() - started)
        if step.kind == "prefill":
            metrics.PROMPT_TOKENS.labels(self.model_id).inc(sum(len(r.token_ids) for r in step.rows))
        sampled: dict[str, int] = {}
        with self._lock:
            failed: list[tuple[_RequestState, Exception]] = []
            for i, row in enumerate(step.rows):
                state = self._states.get(row.request_id)
                if row.samples and state is not None:
                    history = state.seq.all_ids if state.sampler.needs_history else []
                    try:
                        sampled[row.request_id] = state.sampler(logits[i], history)
                    except Exception as err:  # this row alone: NaN/inf logits, or a sampler fault
                        failed.append((state, err))
            for state, err in failed:
                self._fail_request(state, err)
            touched = self.scheduler.update(step, sampled)
            now = time.monotonic()
            for seq in touched:
                self._emit(self._states[seq.request_id], seq, now)
            self.steps += 1
        metrics.GENERATED_TOKENS.labels(self.model_id).inc(len(touched))

    def _emit(self, state: _RequestState, seq: Sequence, now: float) -> None:
        token = seq.output_ids[-1]
        if state.last_token_time is None:
            metrics.TIME_TO_FIRST_TOKEN.labels(self.model_id).observe(now - state.submit_time)
        else:
            metrics.INTER_TOKEN_LATENCY.labels(self.model_id).observe(now - state.last_token_time)
        state.last_token_time = now
        if seq.finish_reason is None:
            state.handle._put(_Sampled((token,)))
        else:
            self._finalize(state, (token,))

    def _finalize(self, state: _RequestState, token_ids: tuple[int, ...] = ()) -> None:
        """Send the last token ids with the reason and usage, and release the request's resources."""
        seq = state.seq
        state.handle._put(_Sampled(token_ids, seq.finish_reason, len(seq.prompt_ids), len(seq.output_ids)))
        state.handle._close()
        if seq.lora_id is not None:  # None: ended while its adapter loaded (_load_adapter releases it)
            self.runtime.release_adapter(seq.lora_id)
        adapter = state.request.adapter or "<base>"
        metrics.REQUESTS.labels(self.model_id, adapter, seq.finish_reason.value).inc()
        metrics.ADAPTER_PROMPT_TOKENS.labels(self.model_id, adapter).inc(len(seq.prompt_ids))
        metrics.ADAPTER_GENERATED_TOKENS.labels(self.model_id, adapter).inc(len(seq.output_ids))
        # Last: whoever sees the request gone (num_active) also sees its slot released and its counters.
        self._states.pop(seq.request_id, None)
        metrics.log_event("request_finished", model=self.model_id, request_id=seq.request_id,
                          finish_reason=seq.finish_reason.value, prompt_tokens=len(seq.prompt_ids),
                          completion_tokens=len(seq.output_ids),
                          seconds=round(time.monotonic() - state.submit_time, 4))

    def _fail_request(self, state: _RequestState, err: Exception) -> None:
        """End one request with an error (the rest of its step goes on); its slot and cache are freed."""
        seq, adapter = state.seq, state.request.adapter or "<base>"
        if isinstance(err, NonFiniteLogits):
            error: LoraflowError = FailedPrecondition(
                f"request {seq.request_id!r} on model {self.model_id!r} with adapter {adapter!r}: the model "
                f"produced non-finite logits ({err}); the adapter's weights or scaling overflow",
                reason="NON_FINITE_LOGITS",
                metadata={"request_id": seq.request_id, "adapter": adapter, "model_id": self.model_id})
        else:
            error = err if isinstance(err, LoraflowError) else LoraflowError(
                f"request {seq.request_id!r}: sampling failed: {err}", metadata={"request_id": seq.request_id})
        metrics.log_event("request_failed", model=self.model_id, request_id=seq.request_id, adapter=adapter,
                          error=repr(err))
        slot = seq.slot
        self.scheduler.abort(seq.request_id)
        self._states.pop(seq.request_id, None)
        if slot is not None:
            # NaN K/V left in the slot would leak into its next request (0 * NaN in masked attention).
            self.runtime.reset_slot(slot)
        self.runtime.release_adapter(seq.lora_id)
        metrics.REQUESTS.labels(self.model_id, adapter, "error").inc()
        state.handle._put(error)
        state.handle._close()

    def _fail(self, step: SchedulerOutput, err: Exception) -> None:
        metrics.log_event("step_failed", model=self.model_id, error=repr(err),
                          request_ids=[r.request_id for r in step.rows])
        wrapped = err if isinstance(err, LoraflowError) else LoraflowError(f"runtime step failed: {err}")
        with self._lock:
            for row in step.rows:
                state = self._states.pop(row.request_id, None)
                if state is None:
                    continue
                self.scheduler.abort(row.request_id)
                self.runtime.release_adapter(state.seq.lora_id)
                state.handle._put(wrapped)
                state.handle._close()

    def _update_gauges(self) -> None:
        metrics.QUEUE_DEPTH.labels(self.model_id).set(self.scheduler.num_waiting)
        metrics.SLOTS_IN_USE.labels(self.model_id).set(self.scheduler.num_running)
