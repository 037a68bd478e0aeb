"""Cloud AI 100 execution of an ai100 artifact's QPC through the platform runtime (``qaicrt``).

``QaicSession`` drives qaicrt the way QEfficient's QAICInferenceSession does: one Context / Queue /
Program / ExecObj, a QBuffer per binding kept between calls (``set_buffers`` replaces some, a
zero-size buffer skips one), and the IO descriptor's bindings for dtypes. The KV cache is retained
state: its inputs (past_*) and outputs (*_RetainedState) are skipped, so it never leaves the card.

``Ai100Stepper`` (loraflow/artifact/ai100_stepper.py) turns a scheduler step into the QPC's two
specializations; the compiler's verification drives it the same way.

``Ai100Runtime`` is the runtime interface the engine steps (adapter slots, execute, reset_slot, ...) over a
stepper, with the same AdapterSlots table as OrtRuntime: the adapter banks are QPC inputs, set once and set again whenever a slot changes, so a
hot-added adapter serves from the next step. No torch here: the inference image runs this.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from loraflow.artifact import graph_contract as gc
from loraflow.artifact.ai100_stepper import Ai100Layout, Ai100Stepper, RetainedStateSession
from loraflow.artifact.manifest import Manifest
from loraflow.artifact.scheduler import SchedulerOutput
from loraflow.errors import FailedPrecondition, InvalidArgument, LoraflowError
from services.inference.adapter_slots import AdapterSlots, ServesAdapterSlots
from services.inference.qaic_sdk import import_qaic

QPC_DIR = "qpc"


class QaicSession:
    """A loaded, activated QPC on the devices ``device_ids`` (None: the runtime's default device)."""

    def __init__(self, qpc_path: str | Path, device_ids: Sequence[int] | None = None):
        qaicrt, aicapi = import_qaic()
        self._rt = qaicrt
        ok = qaicrt.QStatus.QS_SUCCESS
        self._dtypes = {aicapi.FLOAT_TYPE: np.dtype(np.float32), aicapi.FLOAT_16_TYPE: np.dtype(np.float16),
                        aicapi.INT8_Q_TYPE: np.dtype(np.int8), aicapi.UINT8_Q_TYPE: np.dtype(np.uint8),
                        aicapi.INT16_Q_TYPE: np.dtype(np.int16), aicapi.INT32_Q_TYPE: np.dtype(np.int32),
                        aicapi.INT32_I_TYPE: np.dtype(np.int32), aicapi.INT64_I_TYPE: np.dtype(np.int64),
                        aicapi.INT8_TYPE: np.dtype(np.int8)}
        if device_ids:
            self.context = qaicrt.Context(qaicrt.QIDList(list(device_ids)))
            self.queue = qaicrt.Queue(self.context, device_ids[0])
        else:
            self.context = qaicrt.Context()
            self.queue = qaicrt.Queue(self.context, 0)
        qpc = qaicrt.Qpc(str(qpc_path))
        status, iodesc_bytes = qpc.getIoDescriptor()
        if status != ok:
            raise LoraflowError(f"qaicrt could not read the IO descriptor of {qpc_path}", reason="AI100_RUNTIME")
        iodesc = aicapi.IoDesc()
        iodesc.ParseFromString(bytes(iodesc_bytes))
        self.bindings = list(iodesc.selected_set.bindings)
        self.binding_index = {b.name: b.index for b in self.bindings}
        self.input_names = [b.name for b in self.bindings if b.dir == aicapi.BUFFER_IO_TYPE_INPUT]
        self.output_names = [b.name for b in self.bindings if b.dir == aicapi.BUFFER_IO_TYPE_OUTPUT]
        props = qaicrt.QAicProgramProperties()
        props.dataPathTimeoutMs = 60_000
        single = None
        if device_ids and len(device_ids) == 1:
            single = device_ids[0]
        elif device_ids:
            props.devMapping = ":".join(map(str, device_ids))
        self.program = qaicrt.Program(self.context, single, qpc, props)
        if self.program.load() != ok:
            raise LoraflowError(f"qaicrt could not load the program of {qpc_path}", reason="AI100_RUNTIME")
        if self.program.activate() != ok:
            raise LoraflowError(f"qaicrt could not activate the program of {qpc_path}", reason="AI100_RUNTIME")
        self.exec_obj = qaicrt.ExecObj(self.context, self.program)
        self.qbuffers = [qaicrt.QBuffer(bytes(b.size)) for b in self.bindings]
        self.buf_dims = qaicrt.BufferDimensionsVecRef(
            [(self._dtypes[b.type].itemsize, list(b.dims)) for b in self.bindings])

    def dtype_of(self, name: str) -> np.dtype:
        return self._dtypes[self.bindings[self.binding_index[name]].type]

    def set_buffers(self, buffers: Mapping[str, np.ndarray]) -> None:
        for name, buffer in buffers.items():
            if name not in self.binding_index:
                raise InvalidArgument(f"the QPC has no binding {name!r}", field="buffer", value=name)
            i = self.binding_index[name]
            buffer = np.ascontiguousarray(buffer)
            self.qbuffers[i] = self._rt.QBuffer(buffer.tobytes())
            self.buf_dims[i] = (buffer.itemsize, list(buffer.shape) if buffer.shape else [1])

    def skip_buffers(self, names: Sequence[str]) -> None:
        """A zero-size buffer: the binding is neither copied in nor out (retained state stays on the card)."""
        self.set_buffers({n: np.array([], np.float32) for n in names})

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = self._rt.QStatus.QS_SUCCESS
        self.set_buffers(inputs)
        if self.exec_obj.setData(self.qbuffers, self.buf_dims) != ok:
            raise LoraflowError("qaicrt setData failed", reason="AI100_RUNTIME")
        if self.queue.enqueue(self.exec_obj) != ok:
            raise LoraflowError("qaicrt enqueue failed", reason="AI100_RUNTIME")
        if self.exec_obj.waitForCompletion() != ok:
            shapes = {b.name: list(self.buf_dims[b.index][1]) for b in self.bindings}
            raise LoraflowError(f"qaicrt run failed (no specialization matches the shapes {shapes}?)",
                                reason="AI100_RUNTIME")
        status, out = self.exec_obj.getData()
        if status != ok:
            raise LoraflowError("qaicrt getData failed", reason="AI100_RUNTIME")
        outputs = {}
        for name in self.output_names:
            i = self.binding_index[name]
            if self.qbuffers[i].size == 0 or out[i].size == 0:
                continue  # skipped
            outputs[name] = np.frombuffer(bytes(out[i]), self.dtype_of(name)).reshape(self.buf_dims[i][1])
        return outputs

    def close(self) -> None:
        del self.exec_obj
        self.program.deactivate()


class Ai100Runtime(ServesAdapterSlots):
    """The runtime interface the engine steps (adapter slots, execute, reset_slot, ...) on Cloud AI 100 (or
    any retained-state session given): the slot table is AdapterSlots, the steps are Ai100Stepper's."""

    def __init__(self, artifact_dir: str | Path, manifest: Manifest | None = None, *, device: str = "ai100",
                 device_ids: Sequence[int] | None = None, session: RetainedStateSession | None = None):
        self.artifact_dir = Path(artifact_dir)
        self.manifest = manifest or Manifest.load(self.artifact_dir)
        self.device = device
        graph = self.manifest.graph
        if graph.target != "ai100":
            raise FailedPrecondition(f"artifact target is {graph.target!r}; device 'ai100' serves only 'ai100' "
                                     "artifacts", field="artifact_id", value=self.manifest.artifact_id)
        info = dict(self.manifest.extra.get("ai100") or {})
        qpc = self.artifact_dir / str(self.manifest.extra.get("qpc_dir") or QPC_DIR)
        if session is None:
            if not self.manifest.extra.get("qpc_dir") or not qpc.is_dir():
                raise FailedPrecondition(
                    f"artifact {self.manifest.artifact_id} has no QPC (compiled with ai100_stage="
                    f"{self.manifest.options.get('ai100_stage')!r}); compile it with the SDK first",
                    field="artifact_id", value=self.manifest.artifact_id)
            session = QaicSession(qpc, device_ids)
        self.layout = Ai100Layout.from_options(self.manifest.options)
        if "continuous_batching" in info and bool(info["continuous_batching"]) != self.layout.continuous_batching:
            raise FailedPrecondition("the artifact's continuous_batching does not match its options",
                                     field="artifact_id", value=self.manifest.artifact_id)
        self.full_batch_size = self.layout.cache_rows
        self.prefill_seq_len = self.layout.prefill_seq_len
        self.ctx_len = self.layout.ctx_len
        # QEfficient's meaning: the prefill specialisation runs batch_size rows.
        self.max_prefill_rows = self.layout.batch_size
        self.idle_prefill_seq_len = self.prefill_seq_len  # the QPC's specializations fix the chunk length
        self.prefill_token_budget = None  # batch_size rows of prefill_seq_len per call, as QEfficient's runs
        self.compacts_kv_slots = False  # the card retains the cache: rows stay in their slots
        self.layers, self.kv_heads, self.head_dim = graph.layers, graph.num_kv_heads, graph.head_dim
        self.vocab_size = graph.vocab_size
        self.adapter_slots = self.manifest.adapter_slots
        self.max_rank = self.manifest.max_rank
        self.session = session
        self.stepper = Ai100Stepper(session, self.layout, self.layers, self.vocab_size)
        self._bank_lock = threading.Lock()
        # Banks are fp32 inputs (-convert-to-fp16 converts them on the card); slot 0 (the base) stays zero.
        self.adapters = AdapterSlots(self.manifest, np.dtype(np.float32), sync=self._sync_banks)
        self.lora_a, self.lora_b = self.adapters.lora_a, self.adapters.lora_b
        self._sync_banks()
        for entry in self.manifest.adapters:
            self.adapters.fill(entry.slot, entry.name, self.artifact_dir / entry.path, source=f"artifact:{entry.path}")

    def _sync_banks(self) -> None:
        # The session copies a buffer when it is set, so every bank change is set again.
        with self._bank_lock:
            self.session.set_buffers({**{gc.lora_a(m): a for m, a in self.lora_a.items()},
                                      **{gc.lora_b(m): b for m, b in self.lora_b.items()}})

    # ---- execution -------------------------------------------------------------------------
    def execute(self, step: SchedulerOutput) -> np.ndarray:
        if step.past_len > self.ctx_len:
            raise InvalidArgument(f"step needs {step.past_len} past positions but ctx_len is {self.ctx_len}",
                                  field="position_ids", value=step.past_len)
        with self._bank_lock:
            return self.stepper.execute(step)

    def reset_slot(self, slot: int) -> None:
        """Validates the slot. There is nothing to zero: the graph reads a slot only at positions up to the
        row's own largest one, all written by the request itself (earlier calls, or this one before the
        read), and reads past them return zero, so a previous request's values (NaN included) are never read."""
        if not 0 <= slot < self.full_batch_size:
            raise InvalidArgument(f"slot {slot} is outside 0..{self.full_batch_size - 1}", field="slot", value=slot)

    def memory_bytes(self) -> int:
        kv_bytes = 1 if self.manifest.extra.get("ai100", {}).get("kv_precision") == "mxint8" else 2
        cache = 2 * self.layers * self.full_batch_size * self.kv_heads * self.ctx_len * self.head_dim * kv_bytes
        return int(cache + self.adapters.nbytes)

    def close(self) -> None:
        self.session.close()
