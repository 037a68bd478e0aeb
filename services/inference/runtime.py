"""ONNX Runtime execution of a compiled artifact: session, KV cache, adapter banks.

Graphs run through the same step drivers verification runs before publishing:

* fused graphs (fp32/int8/int4, ``graph.kv_layout == "shared-buffer"``):
  loraflow.artifact.step_driver.FusedStepDriver; the cache is [L, F, H, ctx_len, D] per kind and
  GroupQueryAttention updates it in place;
* traced graphs (fp16, and fp32/int8 for models the fused builder refuses):
  loraflow.artifact.traced_step_driver.TracedStepDriver, which owns a time-major cache
  [L, ctx_len, F, H, D] per kind and binds only the positions in use.

Adapter banks ``lora_a.{m}`` [L, N, in, R] / ``lora_b.{m}`` [L, N, R, out] come from loraflow.artifact.lora_bank
(the compiler's layout) and are graph inputs bound once through an IOBinding; on CPU the OrtValues share
memory with the numpy banks, so a hot-added adapter is written into its slot in place and serves at once.
Slot 0 is the base model (zeros). A fused graph's ``lora_ranks`` (graph8: [N, P], AdapterSlots.module_ranks, each
slot's rank per module; before: [N], AdapterSlots.ranks) is bound the same way, so LoraRows computes each row's own
rank of each module, none of a module its adapter does not touch, at no per-step cost. The slot table and
banks are services/inference/adapter_slots.py's AdapterSlots (``runtime.adapters``), shared with the AI 100
runtime.

Threads: ``spinning`` (services/inference/spinning.py); under ``auto`` a fused graph gets a second, sleeping
session over the same file, cache and banks for the steps that run while the host is contended.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from loraflow import native as native_lora
from loraflow.artifact import graph_contract as gc
from loraflow.artifact.kv_cache import SharedKvCache
from loraflow.artifact.manifest import Manifest
from loraflow.artifact.scheduler import SchedulerOutput
from loraflow.artifact.session import session_options
from loraflow.artifact.step_driver import FusedStepDriver, Row, flat_bank
from loraflow.artifact.traced_step_driver import TracedStepDriver
from loraflow.errors import FailedPrecondition, InvalidArgument
from services.inference.adapter_slots import AdapterSlots, ServesAdapterSlots, slots_chosen_at_runtime
from services.inference.spinning import DEFAULT_SPINNING, HostContention, check_spinning

log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda", "ai100")
# ORT starts this many OS threads per session; past the host's cores they only add contention, and
# 256 is above the core count of any CPU host we serve on, so a request cannot spawn thousands.
MAX_NUM_THREADS = 256
# While no row decodes, a fused graph's prefill chunks may be this many times prefill_seq_len long.
IDLE_PREFILL_FACTOR = 4
# While rows decode, a fused graph's prefill call takes whole prompts (up to the idle chunk limit) of as many rows
# as fit this many times prefill_seq_len padded tokens: a continuing chunk costs a one-row call of its own (CPU
# GroupQueryAttention), and every call a pass over the weights, so fewer, fuller prefill calls (issue 22).
PREFILL_BUDGET_FACTOR = 8
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
        from services.inference.qaic_sdk import import_qaic

        try:
            import_qaic()  # the Cloud AI 100 platform SDK's Python runtime (services.inference.qaic_sdk)
        except ImportError as err:
            raise FailedPrecondition("device 'ai100' needs the Qualcomm Cloud AI 100 runtime (qaicrt), "
                                     "which is not installed on this host", field="device", value=device) from err
    return device


class OrtRuntime(ServesAdapterSlots):
    """Runs SchedulerOutput steps on an artifact's ONNX graph; owns the KV cache and adapter banks."""

    def __init__(self, artifact_dir: str | Path, manifest: Manifest | None = None, *, device: str = "cpu",
                 num_threads: int = 0, spinning: str = DEFAULT_SPINNING,
                 may_grow: Callable[[int], bool] | None = None, adapter_slots: int | None = None):
        """``adapter_slots``: the resident slots the banks hold (None: the compiled count; only a fused CPU
        graph of compiler 0.5 on takes another, see adapter_slots.resident_slots).
        ``spinning``: the ONNX Runtime threading policy, ``auto`` | ``on`` | ``off`` (services/inference/
        spinning.py: spinning is faster on a dedicated host and collapses on a shared one). ``may_grow(nbytes)``:
        whether the process's memory budget allows ``nbytes`` more: the weights' mapped pages while they are packed
        in parallel, auto's sleeping session (its packed weights); None: yes."""
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
        if adapter_slots is not None and adapter_slots != self.manifest.adapter_slots \
                and not slots_chosen_at_runtime(self.manifest, self.device):
            log.warning("%s fixes its adapter slots at %d (an AI 100 or traced graph, or one compiled before "
                        "compiler 0.5): adapter_slots=%d is not used", self.manifest.artifact_id,
                        self.manifest.adapter_slots, adapter_slots)
            adapter_slots = None
        self.max_rank = self.manifest.max_rank

        # Weights memory-mapped, pre-packed once: opening costs them plus the KV cache (loraflow/artifact/session.py),
        # and for a moment, packed on every intra-op thread, the whole data file's pages too: only where the budget
        # has room for them (otherwise one thread packs, a weight at a time).
        self.spinning = check_spinning(spinning)
        self._may_grow = may_grow
        mapped = self._weights_bytes()
        self.parallel_prepack = self._budget_allows(mapped)
        if not self.parallel_prepack:
            log.info("%s: weights packed on one thread (the memory budget has no room for the %d bytes of mapped "
                     "weights packing on every thread holds at once)", self.manifest.artifact_id, mapped)
        so = session_options(ort, num_threads=num_threads, allow_spinning=spinning != "off",
                             stop_spinning_after_run=spinning == "auto", parallel_prepack=self.parallel_prepack)
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
        # Fused graphs: whole prompts next to decoding rows within a token budget, and running rows kept in the
        # lowest KV slots (SharedKvCache.move) so the rows admitted together prefill in one padded call.
        self.prefill_token_budget = PREFILL_BUDGET_FACTOR * self.prefill_seq_len if self.shared_kv else None
        self.compacts_kv_slots = self.shared_kv
        if self.shared_kv and self.device != "cpu":
            raise FailedPrecondition(f"artifact {self.manifest.artifact_id} is a fused CPU graph (fp32/int8/int4); "
                                     "for device 'cuda' compile with dtype 'fp16'", field="device", value=self.device)
        if self.shared_kv:
            # One buffer per kind that the graph updates in place (loraflow/artifact/kv_cache.py).
            self.kv = SharedKvCache(layers=self.layers, slots=self.full_batch_size, kv_heads=self.kv_heads,
                                    ctx_len=self.ctx_len, head_dim=self.head_dim, dtype=self.dtype)

        # Adapter banks, laid out as the compiler lays them; slot 0 (the base model) stays zero.
        self.adapters = AdapterSlots(self.manifest, self.dtype, sync=self._sync_banks, adapter_slots=adapter_slots)
        self.adapter_slots = self.adapters.adapter_slots  # resident slots (1..N; slot 0 is the base model)
        self.lora_a, self.lora_b = self.adapters.lora_a, self.adapters.lora_b

        bank_device = "cuda" if self.device == "cuda" else "cpu"
        self._bank_values: dict[str, object] = {}
        for module in graph.lora_modules:
            for name, bank in ((gc.lora_a(module), self.lora_a[module]), (gc.lora_b(module), self.lora_b[module])):
                if self.shared_kv:
                    bank = flat_bank(bank)  # [L, N, ...] -> [L*N, ...] view: hot-adds reach the bound input
                self._bank_values[name] = ort.OrtValue.ortvalue_from_numpy(bank, bank_device, 0)
        if self.shared_kv:
            self._driver = FusedStepDriver(self.session, self.kv, self._bank_values, vocab_size=self.vocab_size,
                                           logits_dtype=self.logits_dtype, lora_ranks=self.adapters.ranks,
                                     lora_module_ranks=self.adapters.module_ranks)
        else:
            # Owns the time-major cache [L, ctx_len, F, H, D] per kind (loraflow/artifact/traced_step_driver.py).
            self._driver = TracedStepDriver(self.session, self._bank_values, layers=self.layers,
                                            slots=self.full_batch_size, kv_heads=self.kv_heads, ctx_len=self.ctx_len,
                                            head_dim=self.head_dim, vocab_size=self.vocab_size, dtype=self.dtype,
                                            logits_dtype=self.logits_dtype)

        for entry in self.manifest.adapters:
            self.adapters.fill(entry.slot, entry.name, self.artifact_dir / entry.path, source=f"artifact:{entry.path}")

        # auto: a sleeping session over the same file, cache and banks for the steps that run while other
        # processes contend for the cores (services/inference/spinning.py), opened when first needed.
        self._num_threads = num_threads
        self._graph_file = file
        self.contention = (HostContention(own_threads=num_threads)
                           if self.spinning == "auto" and self.shared_kv and self.device == "cpu" else None)
        self._sleeping_driver: FusedStepDriver | None = None
        self._sleeping_opener: threading.Thread | None = None
        self._closed = False
        self.steps_by_spinning = {"spinning": 0, "sleeping": 0}

    def _sync_banks(self) -> None:
        # On CPU the bound OrtValues alias the numpy banks; elsewhere copy the banks to the device.
        if self.device != "cpu":
            for module in self.lora_a:
                self._bank_values[gc.lora_a(module)].update_inplace(self.lora_a[module])
                self._bank_values[gc.lora_b(module)].update_inplace(self.lora_b[module])

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
        if self._sleeping_driver is not None:
            weights *= 2  # the sleeping session holds its own packed copies
        cache = self.kv.nbytes if self.shared_kv else self._driver.nbytes
        return int(weights + cache + self.adapters.nbytes)

    # ---- threading policy ------------------------------------------------------------------
    def _step_driver(self):
        """The spinning session's driver, or the sleeping one's while the host is contended (auto)."""
        if self.contention is None or not self.contention.check():
            self.steps_by_spinning["spinning"] += 1
            return self._driver
        if self._sleeping_driver is None:
            if self._sleeping_opener is None and not self._weights_fit():
                self.contention = None  # over the memory budget: spin inside calls only, from now on
            elif self._sleeping_opener is None:  # opened beside the steps, which go on spinning meanwhile
                self._sleeping_opener = threading.Thread(target=self._open_sleeping, name="ort-sleeping-session",
                                                         daemon=True)
                self._sleeping_opener.start()
            self.steps_by_spinning["spinning"] += 1
            return self._driver
        self.steps_by_spinning["sleeping"] += 1
        return self._sleeping_driver

    def _weights_bytes(self) -> int:
        return sum(f.size for f in self.manifest.files if f.path.endswith((".onnx", ".data", ".onnx_data")))

    def _budget_allows(self, nbytes: int) -> bool:
        return self._may_grow is None or self._may_grow(nbytes)

    def _weights_fit(self) -> bool:
        weights = self._weights_bytes()
        if self._budget_allows(weights):
            return True
        log.warning("%s: no sleeping session for a contended host (its %d bytes of packed weights exceed the "
                    "memory budget); its threads spin inside calls only", self.manifest.artifact_id, weights)
        return False

    def _open_sleeping(self) -> None:
        import onnxruntime as ort

        # Packed on one thread: it opens in the background while the spinning session serves.
        so = session_options(ort, num_threads=self._num_threads, allow_spinning=False, parallel_prepack=False)
        if self.lora_kernel == "native":
            native_lora.register(so)
        try:
            session = ort.InferenceSession(str(self.artifact_dir / self._graph_file), so,
                                           providers=["CPUExecutionProvider"])
            driver = FusedStepDriver(session, self.kv, self._bank_values, vocab_size=self.vocab_size,
                                     logits_dtype=self.logits_dtype, lora_ranks=self.adapters.ranks,
                                     lora_module_ranks=self.adapters.module_ranks)
        except Exception as err:  # the spinning session keeps serving
            log.warning("could not open the sleeping session of %s: %s", self.manifest.artifact_id, err)
            return
        if self._closed:
            driver.close()
            return
        self._sleeping_driver = driver

    # ---- execution -------------------------------------------------------------------------
    def execute(self, step: SchedulerOutput) -> np.ndarray:
        """Run one step; returns logits [B, V] (valid until the next call) and stores the new K/V."""
        rows = [Row(r.slot, r.lora_id, r.token_ids, r.start_position) for r in step.rows]
        if step.moves and not self.compacts_kv_slots:
            raise InvalidArgument(f"this runtime does not move KV slots (asked {list(step.moves)})", field="moves",
                                  value=list(step.moves))
        for src, dst in step.moves:  # first: the scheduler already counts the rows in their new slots
            self.kv.move(src, dst)
        if self.shared_kv:
            driver = self._step_driver()
            try:
                return driver.step(rows)
            finally:
                if self.contention is not None:
                    self.contention.step_ended()
        if step.past_len > self.ctx_len:
            raise InvalidArgument(f"step needs {step.past_len} past positions but ctx_len is {self.ctx_len}",
                                  field="position_ids", value=step.past_len)
        return self._driver.step(rows)

    def close(self) -> None:
        self._closed = True
        if self._sleeping_opener is not None:
            self._sleeping_opener.join()
        if self._sleeping_driver is not None:
            self._sleeping_driver.close()
            self._sleeping_driver = None
        self._driver.close()
        self._bank_values.clear()
        del self.session
