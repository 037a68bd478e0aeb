"""ONNX Runtime execution of a compiled artifact: session, KV cache, adapter banks.

Graphs run through the same step drivers verification runs before publishing:

* fused graphs (fp32/int8/int4, ``graph.kv_layout == "shared-buffer"``):
  loraflow.artifact.step_driver.FusedStepDriver; the cache is [L, F, H, ctx_len, D] per kind and
  GroupQueryAttention updates it in place;
* traced graphs (fp16, and fp32/int8 for models the fused builder refuses):
  loraflow.artifact.traced_step_driver.TracedStepDriver, which owns a time-major cache
  [L, ctx_len, F, H, D] per kind and binds only the positions in use.

Adapter banks ``lora_a.{m}`` [L, N, in, R] / ``lora_b.{m}`` [L, N, R, out] come from loraflow.lora_bank
(the compiler's layout) and are graph inputs bound once through an IOBinding; on CPU the OrtValues share
memory with the numpy banks, so a hot-added adapter is written into its slot in place and serves at once.
Slot 0 is the base model (zeros).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loraflow import graph_contract as gc
from loraflow import native as native_lora
from loraflow.artifact.kv_cache import SharedKvCache
from loraflow.artifact.session import session_options
from loraflow.artifact.step_driver import FusedStepDriver, Row, flat_bank
from loraflow.artifact.traced_step_driver import TracedStepDriver
from loraflow.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from loraflow.lora_bank import BankSpec, clear_slot, empty_banks, write_slot_tensors
from loraflow.manifest import Manifest
from loraflow.names import validate_name
from services.inference.scheduler import SchedulerOutput

DEVICES = ("cpu", "cuda", "ai100")
# ORT starts this many OS threads per session; past the host's cores they only add contention, and
# 256 is above the core count of any CPU host we serve on, so a request cannot spawn thousands.
MAX_NUM_THREADS = 256
# While no row decodes, a fused graph's prefill chunks may be this many times prefill_seq_len long.
IDLE_PREFILL_FACTOR = 4
# Name prefix of a slot reserved while weights are written; no valid adapter name starts with NUL.
_LOADING = "\x00loading:"


@dataclass
class AdapterSlot:
    name: str
    r: int
    source: str
    active_requests: int = 0
    last_used: int = 0  # step counter of the last acquire, for picking an idle slot to reuse


def check_num_threads(num_threads: int) -> int:
    """0 (ONNX Runtime's default) or 1..MAX_NUM_THREADS intra-op threads; InvalidArgument otherwise."""
    if not isinstance(num_threads, int) or isinstance(num_threads, bool) or not 0 <= num_threads <= MAX_NUM_THREADS:
        raise InvalidArgument(f"num_threads must be in 0..{MAX_NUM_THREADS} (0 = runtime default), got {num_threads!r}",
                              field="num_threads", value=num_threads)
    return num_threads


def check_device(device: str) -> str:
    """Validate a device name and that its runtime exists here (FailedPrecondition otherwise)."""
    device = device or "cpu"
    if device not in DEVICES:
        raise InvalidArgument(f"device must be one of {', '.join(DEVICES)}, got {device!r}", field="device",
                              value=device)
    if device == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise FailedPrecondition("device 'cuda' needs onnxruntime's CUDAExecutionProvider, which this "
                                     f"installation lacks (has {ort.get_available_providers()})",
                                     field="device", value=device)
    if device == "ai100":
        from services.inference.ai100_runtime import import_qaic

        try:
            import_qaic()  # the Cloud AI 100 platform SDK's Python runtime (services.inference.ai100_runtime)
        except ImportError as err:
            raise FailedPrecondition("device 'ai100' needs the Qualcomm Cloud AI 100 runtime (qaicrt), "
                                     "which is not installed on this host", field="device", value=device) from err
    return device


class OrtRuntime:
    """Runs SchedulerOutput steps on an artifact's ONNX graph; owns the KV cache and adapter banks."""

    def __init__(self, artifact_dir: str | Path, manifest: Manifest | None = None, *, device: str = "cpu",
                 num_threads: int = 0, allow_spinning: bool = False):
        """``allow_spinning`` lets ORT's idle intra-op threads busy-wait: a little faster on an idle host,
        much slower on a shared one (measured 434 vs 287 ms per SmolLM2 decode step at load 5 on 2 cores),
        and it competes with the engine thread, so it is off by default."""
        import onnxruntime as ort

        self.artifact_dir = Path(artifact_dir)
        self.manifest = manifest or Manifest.load(self.artifact_dir)
        self.device = check_device(device)
        graph = self.manifest.graph
        if graph.target != "onnxruntime":
            raise FailedPrecondition(f"artifact target is {graph.target!r}; ONNX Runtime serves only "
                                     "'onnxruntime' artifacts", field="artifact_id", value=self.manifest.artifact_id)
        check_num_threads(num_threads)
        options = self.manifest.options
        self.full_batch_size = int(options["full_batch_size"])
        self.prefill_seq_len = int(options["prefill_seq_len"])
        self.ctx_len = int(options["ctx_len"])
        # Both ONNX Runtime graphs take any batch of rows in one call, so prefill takes every waiting row
        # that holds a KV slot: ``batch_size`` is the AI 100 prefill specialisation's row count (QEfficient's
        # meaning), not a limit here. A user who compiles as QEfficient's README does (full_batch_size=8,
        # batch_size left at 1) gets the batched prefill.
        self.max_prefill_rows = self.full_batch_size
        self.layers, self.kv_heads, self.head_dim = graph.layers, graph.num_kv_heads, graph.head_dim
        self.vocab_size = graph.vocab_size
        self.dtype = np.dtype(graph.dtype)
        out_dtypes = {t.name: np.dtype(t.dtype) for t in graph.outputs}
        self.logits_dtype = out_dtypes.get(gc.LOGITS, self.dtype)
        self.adapter_slots = self.manifest.adapter_slots
        self.max_rank = self.manifest.max_rank

        # Weights memory-mapped, pre-packed once: opening costs them plus the KV cache (loraflow/artifact/session.py).
        so = session_options(ort, num_threads=num_threads, allow_spinning=allow_spinning)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device == "cuda" \
            else ["CPUExecutionProvider"]
        # The native LoRA kernel's graph where this process can load the kernel (CPU only), else the
        # standard-operator one; the artifact holds both, each verified before it was published.
        self.lora_kernel = "native" if graph.native_file and self.device == "cpu" and native_lora.library_path() \
            else "onnx"
        if self.lora_kernel == "native":
            native_lora.register(so)
        file = graph.native_file if self.lora_kernel == "native" else graph.file
        self.session = ort.InferenceSession(str(self.artifact_dir / file), so, providers=providers)
        input_names = {i.name for i in self.session.get_inputs()}
        required = ((gc.INPUT_IDS, gc.LORA_IDS, gc.SEQLENS_K, gc.TOTAL_SEQUENCE_LENGTH) if graph.shared_kv
                    else (gc.INPUT_IDS, gc.POSITION_IDS, gc.LORA_IDS, gc.BATCH_INDEX))
        missing = [n for n in required if n not in input_names]
        if missing:
            raise FailedPrecondition(f"artifact graph lacks inputs {missing}", field="artifact_id",
                                     value=self.manifest.artifact_id)

        self.shared_kv = graph.shared_kv
        # A fused graph takes any chunk length: while no row decodes, the scheduler may feed whole prompts of
        # up to IDLE_PREFILL_FACTOR chunks in one call (8 prompts of 35-39 tokens: one call, not 1 + 8).
        self.idle_prefill_seq_len = (min(self.ctx_len - 1, IDLE_PREFILL_FACTOR * self.prefill_seq_len)
                                     if self.shared_kv else self.prefill_seq_len)
        if self.shared_kv and self.device != "cpu":
            raise FailedPrecondition(f"artifact {self.manifest.artifact_id} is a fused CPU graph (fp32/int8/int4); "
                                     "for device 'cuda' compile with dtype 'fp16'", field="device", value=self.device)
        if self.shared_kv:
            # One buffer per kind that the graph updates in place (loraflow/artifact/kv_cache.py).
            self.kv = SharedKvCache(layers=self.layers, slots=self.full_batch_size, kv_heads=self.kv_heads,
                                    ctx_len=self.ctx_len, head_dim=self.head_dim, dtype=self.dtype)

        # Adapter banks, laid out as the compiler lays them; slot 0 (the base model) stays zero.
        self.lora_a, self.lora_b = empty_banks(BankSpec.from_manifest(self.manifest), self.dtype)
        self.slots: list[AdapterSlot | None] = [None] * (self.adapter_slots + 1)
        self._lock = threading.Lock()
        self._slot_idle = threading.Condition(self._lock)  # notified when a slot's last request ends
        self._clock = 0

        bank_device = "cuda" if self.device == "cuda" else "cpu"
        self._bank_values: dict[str, object] = {}
        for module in graph.lora_modules:
            for name, bank in ((gc.lora_a(module), self.lora_a[module]), (gc.lora_b(module), self.lora_b[module])):
                if self.shared_kv:
                    bank = flat_bank(bank)  # [L, N, ...] -> [L*N, ...] view: hot-adds reach the bound input
                self._bank_values[name] = ort.OrtValue.ortvalue_from_numpy(bank, bank_device, 0)
        if self.shared_kv:
            self._driver = FusedStepDriver(self.session, self.kv, self._bank_values, vocab_size=self.vocab_size,
                                           logits_dtype=self.logits_dtype)
        else:
            # Owns the time-major cache [L, ctx_len, F, H, D] per kind (loraflow/artifact/traced_step_driver.py).
            self._driver = TracedStepDriver(self.session, self._bank_values, layers=self.layers,
                                            slots=self.full_batch_size, kv_heads=self.kv_heads, ctx_len=self.ctx_len,
                                            head_dim=self.head_dim, vocab_size=self.vocab_size, dtype=self.dtype,
                                            logits_dtype=self.logits_dtype)

        for entry in self.manifest.adapters:
            self._fill_slot(entry.slot, entry.name, self.artifact_dir / entry.path, source=f"artifact:{entry.path}")

    # ---- adapters --------------------------------------------------------------------------
    def adapter_names(self) -> dict[str, int]:
        with self._lock:
            return {s.name: i for i, s in enumerate(self.slots) if s is not None}

    def free_adapter_slots(self) -> int:
        with self._lock:
            return sum(1 for s in self.slots[1:] if s is None)

    def load_adapter(self, name: str, path: str | Path, *, source: str = "") -> int:
        """Bind a PEFT adapter dir into a free slot (or the least recently used idle one); returns the slot.

        The adapter is read and checked before any slot changes: InvalidArgument when it is not a LoRA
        adapter the banks can express, FailedPrecondition when its rank, targets or shapes do not fit
        the artifact or the name is taken; ResourceExhausted when every slot serves a request.
        """
        validate_name("name", name)
        tensors, rank = self.slot_tensors_of(name, Path(path))
        slot, _ = self.reserve_slot(name)
        self.install(slot, name, tensors, rank, source=source or str(path))
        return slot

    def reserve_slot(self, name: str, *, wait_s: float = 0.0) -> tuple[int, AdapterSlot | None]:
        """Reserve a free slot, else the least recently used idle one, for ``name``: (slot, evicted).

        ``evicted`` is the adapter that held the slot (its weights are still in the banks until
        ``install``; ``copy_slot`` saves them). With every slot serving a request, waits up to ``wait_s``
        for one to go idle, then ResourceExhausted. FailedPrecondition when ``name`` is already loaded.
        """
        deadline = time.monotonic() + wait_s
        with self._slot_idle:
            while True:
                if any(s is not None and s.name in (name, _LOADING + name) for s in self.slots):
                    raise FailedPrecondition(f"adapter {name!r} is already loaded on this model", field="name",
                                             value=name)
                free = [i for i in range(1, len(self.slots)) if self.slots[i] is None]
                idle = [i for i in range(1, len(self.slots))
                        if self.slots[i] is not None and self.slots[i].active_requests == 0
                        and not self.slots[i].name.startswith(_LOADING)]
                if free or idle:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    waited = f" for {wait_s:g} s" if wait_s else ""
                    raise ResourceExhausted(f"all {self.adapter_slots} adapter slots serve running requests "
                                            f"(waited{waited or ' not at all'}); retry when one is idle",
                                            metadata={"adapter_slots": self.adapter_slots, "adapter": name})
                self._slot_idle.wait(left)
            slot = free[0] if free else min(idle, key=lambda i: self.slots[i].last_used)
            evicted = self.slots[slot]
            # Reserve the slot (an unresolvable name) so no request uses it while its weights change.
            self.slots[slot] = AdapterSlot(name=_LOADING + name, r=0, source="")
        return slot, evicted

    def copy_slot(self, slot: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """A copy of one slot's bank slices (of a reserved slot, before ``install`` overwrites it)."""
        return {m: (self.lora_a[m][:, slot].copy(), self.lora_b[m][:, slot].copy()) for m in self.lora_a}

    def install(self, slot: int, name: str, tensors: dict, rank: int, *, source: str) -> None:
        """Write ``tensors`` into a reserved slot and name it (it serves from now on)."""
        self.write_reserved(slot, tensors)
        self.commit_slot(slot, name, rank, source=source)

    def write_reserved(self, slot: int, tensors: dict) -> None:
        """Write an adapter's tensors into a slot ``reserve_slot`` returned (no request reads it yet)."""
        self._write_slot(slot, tensors)

    def commit_slot(self, slot: int, name: str, rank: int, *, source: str, active_requests: int = 0) -> None:
        """Name a written slot so requests resolve it; ``active_requests`` counts requests that acquire
        it in the same instant (so no other load can evict it before they are queued)."""
        with self._lock:
            self._clock += 1
            self.slots[slot] = AdapterSlot(name=name, r=rank, source=source, active_requests=active_requests,
                                           last_used=self._clock)

    def release_reservation(self, slot: int) -> None:
        """Free a reserved slot whose load failed (zeroed: it may hold part of the new weights)."""
        clear_slot(self.lora_a, self.lora_b, slot)
        self._sync_banks()
        with self._slot_idle:
            self.slots[slot] = None
            self._slot_idle.notify_all()

    def slot_tensors_of(self, name: str, path: Path) -> tuple[dict, int]:
        """Read a PEFT dir and lay it out for one slot: InvalidArgument / FailedPrecondition (see load_adapter)."""
        return self._slot_tensors(name, path)

    def _slot_tensors(self, name: str, path: Path) -> tuple[dict, int]:
        from loraflow.lora_bank import BankSpec, read_adapter, slot_tensors

        adapter = read_adapter(name, path)  # InvalidArgument: not a LoRA adapter we can express
        tensors = slot_tensors(adapter, BankSpec.from_manifest(self.manifest))  # FailedPrecondition: no fit
        return tensors, adapter.max_module_rank

    def _write_slot(self, slot: int, tensors: dict) -> None:
        # A module the adapter does not touch gets zeros (a zero delta).
        write_slot_tensors(self.lora_a, self.lora_b, slot, tensors)
        self._sync_banks()

    def _fill_slot(self, slot: int, name: str, path: Path, *, source: str) -> None:
        tensors, rank = self._slot_tensors(name, path)
        self._write_slot(slot, tensors)
        with self._lock:
            self.slots[slot] = AdapterSlot(name=name, r=rank, source=source)

    def _sync_banks(self) -> None:
        # On CPU the bound OrtValues alias the numpy banks; elsewhere copy the banks to the device.
        if self.device != "cpu":
            for module in self.lora_a:
                self._bank_values[gc.lora_a(module)].update_inplace(self.lora_a[module])
                self._bank_values[gc.lora_b(module)].update_inplace(self.lora_b[module])

    def acquire_adapter(self, name: str) -> int:
        """lora_id for ``name`` ("" = base model) and count one more request on it; NotFound if unknown."""
        if not name:
            return 0
        with self._lock:
            for i, s in enumerate(self.slots):
                # A "\x00loading:" reservation is never a servable name, whatever a client sends.
                if s is not None and s.name == name and not name.startswith(_LOADING[0]):
                    s.active_requests += 1
                    self._clock += 1
                    s.last_used = self._clock
                    return i
        raise NotFound(f"adapter {name!r} is not loaded on this model (loaded: "
                       f"{sorted(n for n in self.adapter_names() if not n.startswith(chr(0)))})",
                       field="adapter", value=name)

    def release_adapter(self, lora_id: int) -> None:
        if lora_id == 0:
            return
        with self._slot_idle:
            s = self.slots[lora_id]
            if s is not None and s.active_requests > 0:
                s.active_requests -= 1
                if s.active_requests == 0:
                    self._slot_idle.notify_all()

    def reset_slot(self, slot: int) -> None:
        """Zero one KV-cache slot across layers and positions. A failed request may have left NaN/inf
        there, and masked attention still multiplies stale values by 0 (0 * NaN = NaN)."""
        if not 0 <= slot < self.full_batch_size:
            raise InvalidArgument(f"slot {slot} is outside 0..{self.full_batch_size - 1}", field="slot", value=slot)
        if self.shared_kv:
            self.kv.reset(slot)
        else:
            self._driver.reset(slot)

    def memory_bytes(self) -> int:
        weights = sum(f.size for f in self.manifest.files if f.path.endswith((".onnx", ".data", ".onnx_data")))
        cache = self.kv.nbytes if self.shared_kv else self._driver.nbytes
        banks = sum(b.nbytes for b in list(self.lora_a.values()) + list(self.lora_b.values()))
        return int(weights + cache + banks)

    # ---- execution -------------------------------------------------------------------------
    def execute(self, step: SchedulerOutput) -> np.ndarray:
        """Run one step; returns logits [B, V] (valid until the next call) and stores the new K/V."""
        rows = [Row(r.slot, r.lora_id, r.token_ids, r.start_position) for r in step.rows]
        if self.shared_kv:
            return self._driver.step(rows)
        if step.past_len > self.ctx_len:
            raise InvalidArgument(f"step needs {step.past_len} past positions but ctx_len is {self.ctx_len}",
                                  field="position_ids", value=step.past_len)
        return self._driver.step(rows)

    def close(self) -> None:
        self._driver.close()
        self._bank_values.clear()
        del self.session
