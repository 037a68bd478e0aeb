"""ONNX Runtime execution of a compiled artifact: session, time-major KV cache, adapter banks.

The KV cache is one preallocated numpy array per layer and kind, laid out [ctx_len, F, H, D]
(time-major), so the first P positions ``cache[:P]`` are one contiguous block handed to the graph
without a copy; a decode step therefore costs what is in use, not ctx_len. After each call the
runtime writes the new tokens' K/V (``present_*`` [S, B, H, D]) to ``cache[position, slot]``.

Adapter banks ``lora_a.{m}`` [L, N, in, R] / ``lora_b.{m}`` [L, N, R, out] are graph inputs bound
once through an IOBinding; on CPU the OrtValues share memory with the numpy banks, so a hot-added
adapter is written into its slot in place and serves at once. Slot 0 is the base model (zeros).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loraflow import graph_contract as gc
from loraflow.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from loraflow.manifest import Manifest
from loraflow.names import validate_name
from services.inference.scheduler import SchedulerOutput

DEVICES = ("cpu", "cuda", "ai100")


@dataclass
class AdapterSlot:
    name: str
    r: int
    source: str
    active_requests: int = 0
    last_used: int = 0  # step counter of the last acquire, for picking an idle slot to reuse


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
        try:
            import qaicrt  # noqa: F401  (the Cloud AI 100 platform SDK's Python runtime)
        except ImportError as err:
            raise FailedPrecondition("device 'ai100' needs the Qualcomm Cloud AI 100 runtime (qaicrt), "
                                     "which is not installed on this host", field="device", value=device) from err
        raise FailedPrecondition("device 'ai100': the QAic runtime is installed, but this service serves "
                                 "AI 100 QPCs only through onnxruntime targets; compile with target "
                                 "'onnxruntime' or run the QPC with the SDK's tools",
                                 field="device", value=device)
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
        if num_threads < 0:
            raise InvalidArgument(f"num_threads must be >= 0, got {num_threads}", field="num_threads",
                                  value=num_threads)
        options = self.manifest.options
        self.full_batch_size = int(options["full_batch_size"])
        self.prefill_seq_len = int(options["prefill_seq_len"])
        self.ctx_len = int(options["ctx_len"])
        self.max_prefill_rows = max(1, min(int(options.get("batch_size") or self.full_batch_size),
                                           self.full_batch_size))
        self.layers, self.kv_heads, self.head_dim = graph.layers, graph.num_kv_heads, graph.head_dim
        self.vocab_size = graph.vocab_size
        self.dtype = np.dtype(graph.dtype)
        self.adapter_slots = self.manifest.adapter_slots
        self.max_rank = self.manifest.max_rank

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if num_threads:
            so.intra_op_num_threads = num_threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device == "cuda" \
            else ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(self.artifact_dir / graph.file), so, providers=providers)
        self._ort = ort
        input_names = {i.name for i in self.session.get_inputs()}
        missing = [n for n in (gc.INPUT_IDS, gc.POSITION_IDS, gc.LORA_IDS, gc.BATCH_INDEX) if n not in input_names]
        if missing:
            raise FailedPrecondition(f"artifact graph lacks inputs {missing}", field="artifact_id",
                                     value=self.manifest.artifact_id)

        # KV cache, time-major: [ctx_len, F, H, D] per layer.
        shape = (self.ctx_len, self.full_batch_size, self.kv_heads, self.head_dim)
        self.k_cache = [np.zeros(shape, self.dtype) for _ in range(self.layers)]
        self.v_cache = [np.zeros(shape, self.dtype) for _ in range(self.layers)]

        # Adapter banks; slot 0 (the base model) stays zero.
        n = self.adapter_slots + 1
        self.lora_a: dict[str, np.ndarray] = {}
        self.lora_b: dict[str, np.ndarray] = {}
        for module, spec in graph.lora_modules.items():
            self.lora_a[module] = np.zeros((self.layers, n, spec.in_features, self.max_rank), self.dtype)
            self.lora_b[module] = np.zeros((self.layers, n, self.max_rank, spec.out_features), self.dtype)
        self.slots: list[AdapterSlot | None] = [None] * n
        self._lock = threading.Lock()
        self._clock = 0

        self._binding = self.session.io_binding()
        bank_device = "cuda" if self.device == "cuda" else "cpu"
        self._bank_values: dict[str, object] = {}
        for module in graph.lora_modules:
            for name, bank in ((gc.lora_a(module), self.lora_a[module]), (gc.lora_b(module), self.lora_b[module])):
                value = ort.OrtValue.ortvalue_from_numpy(bank, bank_device, 0)
                self._bank_values[name] = value
                self._binding.bind_ortvalue_input(name, value)
        self._output_names = [gc.LOGITS] + [name for i in range(self.layers)
                                              for name in (gc.present_key(i), gc.present_value(i))]

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

        InvalidArgument / FailedPrecondition when it does not fit the artifact; AlreadyExists-like
        FailedPrecondition when the name is taken; ResourceExhausted when every slot serves a request.
        """
        validate_name("name", name)
        with self._lock:
            if any(s is not None and s.name == name for s in self.slots):
                raise FailedPrecondition(f"adapter {name!r} is already loaded on this model", field="name",
                                         value=name)
            free = [i for i in range(1, len(self.slots)) if self.slots[i] is None]
            if free:
                slot = free[0]
            else:
                idle = [i for i in range(1, len(self.slots)) if self.slots[i].active_requests == 0]
                if not idle:
                    raise ResourceExhausted(f"all {self.adapter_slots} adapter slots serve running requests; "
                                            "retry when one is idle", metadata={"adapter_slots": self.adapter_slots})
                slot = min(idle, key=lambda i: self.slots[i].last_used)
            # Reserve the slot so no request resolves to it while its weights are written.
            previous = self.slots[slot]
            self.slots[slot] = AdapterSlot(name=f"\x00loading:{name}", r=0, source=source)
        try:
            self._fill_slot(slot, name, Path(path), source=source or str(path))
        except BaseException:
            with self._lock:
                self.slots[slot] = previous if previous is not None and previous.active_requests == 0 else None
            raise
        return slot

    def _fill_slot(self, slot: int, name: str, path: Path, *, source: str) -> None:
        from loraflow.lora_bank import BankSpec, read_adapter, slot_tensors

        adapter = read_adapter(name, path)  # InvalidArgument: not a LoRA adapter we can express
        tensors = slot_tensors(adapter, BankSpec.from_manifest(self.manifest))  # FailedPrecondition: no fit
        for module, (a_slot, b_slot) in tensors.items():
            self.lora_a[module][:, slot] = a_slot  # [L, in, R]
            self.lora_b[module][:, slot] = b_slot  # [L, R, out]
        self._sync_banks()
        with self._lock:
            self.slots[slot] = AdapterSlot(name=name, r=adapter.max_module_rank, source=source)

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
                if s is not None and s.name == name:
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
        with self._lock:
            s = self.slots[lora_id]
            if s is not None and s.active_requests > 0:
                s.active_requests -= 1

    def memory_bytes(self) -> int:
        weights = sum(f.size for f in self.manifest.files if f.path.endswith((".onnx", ".data", ".onnx_data")))
        cache = sum(c.nbytes for c in self.k_cache + self.v_cache)
        banks = sum(b.nbytes for b in list(self.lora_a.values()) + list(self.lora_b.values()))
        return int(weights + cache + banks)

    # ---- execution -------------------------------------------------------------------------
    def execute(self, step: SchedulerOutput) -> np.ndarray:
        """Run one step; returns logits [B, V] and stores the new tokens' K/V in the cache."""
        ids, positions = step.padded_inputs(gc.PAD_POSITION)
        input_ids = np.asarray(ids, dtype=np.int64)  # [B, S]
        position_ids = np.asarray(positions, dtype=np.int64)  # [B, S]
        lora_ids = np.asarray([[r.lora_id] for r in step.rows], dtype=np.int64)  # [B, 1]
        batch_index = np.asarray([[r.slot] for r in step.rows], dtype=np.int64)  # [B, 1]
        past = step.past_len
        if past > self.ctx_len:
            raise InvalidArgument(f"step needs {past} past positions but ctx_len is {self.ctx_len}",
                                  field="position_ids", value=past)
        ort = self._ort
        keep = []  # numpy arrays must outlive the call that reads them

        def bind(name: str, array: np.ndarray) -> None:
            keep.append(array)
            self._binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))

        bind(gc.INPUT_IDS, input_ids)
        bind(gc.POSITION_IDS, position_ids)
        bind(gc.LORA_IDS, lora_ids)
        bind(gc.BATCH_INDEX, batch_index)
        for i in range(self.layers):
            bind(gc.past_key(i), self.k_cache[i][:past])  # [P, F, H, D] contiguous view
            bind(gc.past_value(i), self.v_cache[i][:past])
        for name in self._output_names:
            self._binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(self._binding)
        outputs = self._binding.get_outputs()

        logits = outputs[0].numpy()[:, -1, :]  # [B, 1, V] -> [B, V]
        b_idx, s_idx = np.nonzero(position_ids >= 0)
        t_idx = position_ids[b_idx, s_idx]
        slot_idx = batch_index[b_idx, 0]
        for i in range(self.layers):
            present_k = outputs[1 + 2 * i].numpy()  # [S, B, H, D]
            present_v = outputs[2 + 2 * i].numpy()
            self.k_cache[i][t_idx, slot_idx] = present_k[s_idx, b_idx]
            self.v_cache[i][t_idx, slot_idx] = present_v[s_idx, b_idx]
        return logits

    def close(self) -> None:
        self._binding.clear_binding_inputs()
        self._binding.clear_binding_outputs()
        self._bank_values.clear()
        del self.session
