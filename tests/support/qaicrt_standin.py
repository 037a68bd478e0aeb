"""A stand-in for the Cloud AI 100 platform runtime (``qaicrt`` + ``QAicApi_pb2``), tests only.

It has the calls loraflow's QaicSession makes (Context, Queue, Qpc.getIoDescriptor, Program,
ExecObj.setData/getData, QBuffer, BufferDimensionsVecRef, QStatus, the IoDesc protobuf's fields),
and "runs a QPC" by executing the bundle the QPC was compiled from — ``<qpc>/../model.onnx`` with
its specializations.json and custom_io.yaml — on ONNX Runtime, keeping retained state on its side
between runs as the card does. ``install()`` puts both modules into sys.modules.
"""

from __future__ import annotations

import enum
import json
import sys
import types
from pathlib import Path

import numpy as np

FLOAT_TYPE, FLOAT_16_TYPE, INT8_Q_TYPE, UINT8_Q_TYPE, INT16_Q_TYPE, INT32_Q_TYPE = 1, 2, 3, 4, 5, 6
INT32_I_TYPE, INT64_I_TYPE, INT8_TYPE = 7, 8, 9
BUFFER_IO_TYPE_INPUT, BUFFER_IO_TYPE_OUTPUT = 0, 1
_NP = {FLOAT_TYPE: np.float32, FLOAT_16_TYPE: np.float16, INT64_I_TYPE: np.int64}
_TYPE = {"tensor(float)": FLOAT_TYPE, "tensor(float16)": FLOAT_16_TYPE, "tensor(int64)": INT64_I_TYPE}


class QStatus(enum.Enum):
    QS_SUCCESS = 0
    QS_ERROR = 1


class QBuffer:
    def __init__(self, data: bytes):
        self.data = bytes(data)
        self.size = len(self.data)

    def __bytes__(self) -> bytes:
        return self.data


class BufferDimensionsVecRef(list):
    pass


class QIDList(list):
    pass


class Context:
    def __init__(self, devices: QIDList | None = None):
        self.devices = list(devices) if devices else [0]


class Queue:
    def __init__(self, context: Context, device: int):
        self.device = device

    def enqueue(self, exec_obj: ExecObj) -> QStatus:
        return exec_obj._execute()


class _Binding:
    def __init__(self, name, index, direction, type_, dims):
        self.name, self.index, self.dir, self.type, self.dims = name, index, direction, type_, list(dims)
        self.size = int(np.prod(dims)) * np.dtype(_NP[type_]).itemsize


class IoDesc:
    """The QAicApi_pb2.IoDesc fields QaicSession reads; 'serialized' as JSON by the stand-in Qpc."""

    def __init__(self):
        self.selected_set = types.SimpleNamespace(bindings=[])

    def ParseFromString(self, data: bytes) -> None:  # noqa: N802 (protobuf's name)
        self.selected_set.bindings = [_Binding(**b) for b in json.loads(data)]


def _read_custom_io(path: Path) -> dict[str, str]:
    io, name = {}, None
    for line in path.read_text().splitlines():
        line = line.strip().removeprefix("- ").strip()
        if line.startswith("IOName:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("Precision:"):
            io[name] = line.split(":", 1)[1].strip()
    return io


class Qpc:
    def __init__(self, path: str):
        self.path = Path(path)
        bundle = self.path.parent
        if not (self.path / "programqpc.bin").is_file():
            raise RuntimeError(f"{path} is not a QPC")
        import onnx

        self.model = onnx.load(str(bundle / "model.onnx"))
        self.specs = [{k: int(v) for k, v in s.items()}
                      for s in json.loads((bundle / "specializations.json").read_text())["specializations"]]
        self.custom_io = _read_custom_io(bundle / "custom_io.yaml")

    def getIoDescriptor(self):  # noqa: N802
        import onnxruntime as ort

        sess = ort.InferenceSession(self.model.SerializeToString(), providers=["CPUExecutionProvider"])
        first = self.specs[0]
        bindings = []
        for direction, values in ((BUFFER_IO_TYPE_INPUT, sess.get_inputs()), (BUFFER_IO_TYPE_OUTPUT, sess.get_outputs())):
            for v in values:
                type_ = FLOAT_16_TYPE if self.custom_io.get(v.name) == "float16" else _TYPE[v.type]
                dims = [first[d] if isinstance(d, str) else d for d in v.shape]
                bindings.append({"name": v.name, "index": len(bindings), "direction": direction, "type_": type_,
                                 "dims": dims})
        return QStatus.QS_SUCCESS, json.dumps(bindings).encode()


class QAicProgramProperties:
    def __init__(self):
        self.dataPathTimeoutMs = 0
        self.devMapping = ""


class Program:
    activated: list[Program] = []  # what a test can inspect: programs loaded onto "devices"

    def __init__(self, context: Context, device, qpc: Qpc, props: QAicProgramProperties):
        self.context, self.device, self.qpc, self.props = context, device, qpc, props
        self.active = False

    def load(self) -> QStatus:
        return QStatus.QS_SUCCESS

    def activate(self) -> QStatus:
        from services.compiler.ai100_verify import OrtRetainedStateSession, to_fp16

        kv = "float16" if any(p == "float16" for p in self.qpc.custom_io.values()) else "float32"
        keep = [i.name for i in [*self.qpc.model.graph.input, *self.qpc.model.graph.output]
                if i.name not in self.qpc.custom_io]
        # -convert-to-fp16: fp16 compute; the custom-IO KV buffers are fp16 on the interface.
        self.device_session = OrtRetainedStateSession(to_fp16(self.qpc.model, keep), self.qpc.specs, kv)
        self.active = True
        Program.activated.append(self)
        return QStatus.QS_SUCCESS

    def deactivate(self) -> QStatus:
        self.active = False
        Program.activated.remove(self)
        return QStatus.QS_SUCCESS


class ExecObj:
    def __init__(self, context: Context, program: Program):
        self.program = program
        self.bindings = [_Binding(**b) for b in json.loads(program.qpc.getIoDescriptor()[1])]
        self._data = None
        self._out = None
        self.runs = 0

    def setData(self, qbuffers, buf_dims) -> QStatus:  # noqa: N802
        self._data = (list(qbuffers), [tuple(d) for d in buf_dims])
        return QStatus.QS_SUCCESS

    def _execute(self) -> QStatus:
        sess = self.program.device_session
        qbuffers, dims = self._data
        inputs, skipped = {}, []
        for b in self.bindings:
            buf, (_, shape) = qbuffers[b.index], dims[b.index]
            if buf.size == 0:
                skipped.append(b.name)
            elif b.dir == BUFFER_IO_TYPE_INPUT:
                inputs[b.name] = np.frombuffer(buf.data, _NP[b.type]).reshape(shape)
        sess.skip_buffers([n for n in skipped if n.startswith("past_")])
        try:
            outs = sess.run(inputs)
        except Exception:  # noqa: BLE001 (the card answers a status, not an exception)
            self._out = None
            self.status = QStatus.QS_ERROR
            return QStatus.QS_SUCCESS
        self.status = QStatus.QS_SUCCESS
        self.runs += 1
        self._out = [QBuffer(b"") if b.dir == BUFFER_IO_TYPE_INPUT or b.name not in outs or b.name in skipped
                     else QBuffer(np.ascontiguousarray(outs[b.name], _NP[b.type]).tobytes()) for b in self.bindings]
        return QStatus.QS_SUCCESS

    def waitForCompletion(self) -> QStatus:  # noqa: N802
        return self.status

    def getData(self):  # noqa: N802
        return QStatus.QS_SUCCESS, self._out


def install(monkeypatch) -> types.ModuleType:
    """Make ``import qaicrt`` / ``import QAicApi_pb2`` find the stand-in for one test."""
    me = sys.modules[__name__]
    api = types.ModuleType("QAicApi_pb2")
    for name in ("FLOAT_TYPE", "FLOAT_16_TYPE", "INT8_Q_TYPE", "UINT8_Q_TYPE", "INT16_Q_TYPE", "INT32_Q_TYPE",
                 "INT32_I_TYPE", "INT64_I_TYPE", "INT8_TYPE", "BUFFER_IO_TYPE_INPUT", "BUFFER_IO_TYPE_OUTPUT",
                 "IoDesc"):
        setattr(api, name, getattr(me, name))
    monkeypatch.setitem(sys.modules, "qaicrt", me)
    monkeypatch.setitem(sys.modules, "QAicApi_pb2", api)
    return me
