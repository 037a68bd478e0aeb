"""Cloud AI 100 execution of an ai100 artifact's QPC through the platform runtime (``qaicrt``).

``QaicSession`` drives qaicrt the way QEfficient's QAICInferenceSession does: one Context / Queue /
Program / ExecObj, a QBuffer per binding kept between calls (``set_buffers`` replaces some, a
zero-size buffer skips one), and the IO descriptor's bindings for dtypes. The KV cache is retained
state: its inputs (past_*) and outputs (*_RetainedState) are skipped, so it never leaves the card.

``Ai100Stepper`` turns a scheduler step into the QPC's two specializations: prefill runs
``batch_size`` rows of ``prefill_seq_len`` tokens, decode runs every cache row with one token; rows
the step does not use are idle (position -1 writes and reads nothing). With continuous batching a
row names its KV slot in ``batch_index``; without it row b is slot b.

``Ai100Runtime`` is the runtime interface the engine steps (adapter slots, execute, reset_slot, ...) over a
stepper, with the same AdapterSlots table as OrtRuntime: the adapter banks are QPC inputs, set once and set again whenever a slot changes, so a
hot-added adapter serves from the next step. No torch here: the inference image runs this.
"""

from __future__ import annotations

import platform
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from loraflow import graph_contract as gc
from loraflow.errors import FailedPrecondition, InvalidArgument, LoraflowError
from loraflow.manifest import Manifest
from services.inference.adapter_slots import AdapterSlot, AdapterSlots
from services.inference.scheduler import SchedulerOutput

SDK_PYTHON_DIRS = (f"/opt/qti-aic/dev/lib/{platform.machine()}", "/opt/qti-aic/dev/python")
QPC_DIR = "qpc"


def import_qaic():
    """(qaicrt, QAicApi_pb2) from the platform SDK, where QEfficient looks for them; ImportError if absent."""
    try:
        import QAicApi_pb2  # its IO descriptor protobuf
        import qaicrt  # the Cloud AI 100 platform runtime
    except ImportError:
        for d in SDK_PYTHON_DIRS:
            if d not in sys.path and Path(d).is_dir():
                sys.path.append(d)
        import QAicApi_pb2
        import qaicrt
    return qaicrt, QAicApi_pb2


class RetainedStateSession(Protocol):
    """What the stepper needs: QAICInferenceSession's calls (QaicSession, or ONNX Runtime in verification)."""

    input_names: list[str]
    output_names: list[str]

    def set_buffers(self, buffers: Mapping[str, np.ndarray]) -> None: ...

    def skip_buffers(self, names: Sequence[str]) -> None: ...

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


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


@dataclass(frozen=True)
class Ai100Layout:
    """The QPC's static shapes (from the resolved compile options)."""

    batch_size: int
    full_batch_size: int
    prefill_seq_len: int
    ctx_len: int
    continuous_batching: bool

    @property
    def cache_rows(self) -> int:
        return self.full_batch_size if self.continuous_batching else self.batch_size

    @classmethod
    def from_options(cls, options: Mapping[str, object]) -> Ai100Layout:
        bs, fbs = int(options["batch_size"]), int(options["full_batch_size"])
        return cls(batch_size=bs, full_batch_size=fbs, prefill_seq_len=int(options["prefill_seq_len"]),
                   ctx_len=int(options["ctx_len"]), continuous_batching=fbs > bs)


class Ai100Stepper:
    """Runs scheduler steps on a retained-state session in the QPC's two specializations."""

    def __init__(self, session: RetainedStateSession, layout: Ai100Layout, num_layers: int, vocab_size: int):
        self.session = session
        self.layout = layout
        self.vocab_size = vocab_size
        self._logits_rows = 0  # rows of the logits buffer currently set
        missing = [n for n in (gc.INPUT_IDS, gc.POSITION_IDS, gc.LORA_IDS) if n not in session.input_names]
        if layout.continuous_batching and gc.BATCH_INDEX not in session.input_names:
            missing.append(gc.BATCH_INDEX)
        if missing:
            raise FailedPrecondition(f"the AI 100 program lacks inputs {missing}", field="artifact_id",
                                     value=str(missing))
        # The KV cache never leaves the device: skip past_* in and *_RetainedState out.
        kv = [n for i in range(num_layers) for n in (gc.past_key(i), gc.past_value(i))]
        session.skip_buffers(kv + [f"{n}_RetainedState" for n in kv])

    def feeds(self, step: SchedulerOutput) -> tuple[dict[str, np.ndarray], list[int]]:
        """(inputs for the matching specialization, index of each step row in them)."""
        lay = self.layout
        prefill = step.kind == "prefill"
        rows = lay.batch_size if prefill else lay.cache_rows
        seq = lay.prefill_seq_len if prefill else 1
        if step.seq_len > seq:
            raise InvalidArgument(f"a {step.kind} step of {step.seq_len} tokens exceeds the QPC's {seq}",
                                  field="seq_len", value=step.seq_len)
        if step.num_rows > rows:
            raise InvalidArgument(f"a {step.kind} step of {step.num_rows} rows exceeds the QPC's {rows}",
                                  field="rows", value=step.num_rows)
        ids = np.zeros((rows, seq), np.int64)
        pos = np.full((rows, seq), gc.PAD_POSITION, np.int64)  # idle rows: nothing written, nothing read
        lora = np.zeros((rows, 1), np.int64)
        slot = np.zeros((rows, 1), np.int64)
        if not prefill:
            slot[:, 0] = np.arange(rows)  # decode: row r is slot r
        where = []
        for k, row in enumerate(step.rows):
            if not 0 <= row.slot < lay.cache_rows:
                raise InvalidArgument(f"KV slot {row.slot} is outside 0..{lay.cache_rows - 1}", field="slot",
                                      value=row.slot)
            # Without batch_index a row's cache row is its index, so the row goes where its slot is.
            r = k if (prefill and lay.continuous_batching) else row.slot
            if prefill and r >= rows:
                raise InvalidArgument(f"KV slot {row.slot} cannot prefill in a {rows}-row QPC", field="slot",
                                      value=row.slot)
            n = len(row.token_ids)
            ids[r, :n] = row.token_ids
            pos[r, :n] = np.arange(row.start_position, row.start_position + n)
            lora[r, 0] = row.lora_id
            slot[r, 0] = row.slot
            where.append(r)
        if (pos.max(initial=-1)) >= lay.ctx_len:
            raise InvalidArgument(f"position {int(pos.max())} is outside ctx_len {lay.ctx_len}",
                                  field="position_ids", value=int(pos.max()))
        inputs = {gc.INPUT_IDS: ids, gc.POSITION_IDS: pos, gc.LORA_IDS: lora}
        if lay.continuous_batching:
            inputs[gc.BATCH_INDEX] = slot
        return inputs, where

    def execute(self, step: SchedulerOutput) -> np.ndarray:
        """Logits [B, V] float32 for the step's rows, in order."""
        inputs, where = self.feeds(step)
        rows = inputs[gc.INPUT_IDS].shape[0]
        if rows != self._logits_rows:
            # As QEfficient does: an output buffer of this specialization's shape before the run.
            self.session.set_buffers({gc.LOGITS: np.zeros((rows, 1, self.vocab_size), np.float32)})
            self._logits_rows = rows
        logits = self.session.run(inputs)[gc.LOGITS]  # [rows, 1, V]
        return np.asarray(logits[where, -1, :], np.float32)


class Ai100Runtime:
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

    # ---- adapters (the slot table: services/inference/adapter_slots.py) ----------------------
    @property
    def slots(self) -> list[AdapterSlot | None]:
        return self.adapters.slots

    def adapter_names(self) -> dict[str, int]:
        return self.adapters.names()

    def free_adapter_slots(self) -> int:
        return self.adapters.free()

    def load_adapter(self, name: str, path: str | Path, *, source: str = "") -> int:
        return self.adapters.load(name, path, source=source)

    def acquire_adapter(self, name: str) -> int:
        return self.adapters.acquire(name)

    def release_adapter(self, lora_id: int) -> None:
        self.adapters.release(lora_id)

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
