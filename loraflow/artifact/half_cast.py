"""float16 -> float32 for adapter weights, through ONNX Runtime's vectorised Cast when it is installed.

numpy converts half floats one element at a time (about 2 ns each here: 10 ms for the 4.9 M of an all-linear
rank-16 SmolLM2-135M adapter, most of a first-use load's CPU); ONNX Runtime's Cast uses the CPU's conversion
instructions (0.6 ms for the same). Values are identical (tests/compiler/test_half_cast.py checks every finite
half). Without onnxruntime (a trainer-only install), numpy converts.
"""

from __future__ import annotations

import threading

import numpy as np

# A one-node ONNX model, y = Cast(x: float16[n], to=float), opset 13, IR 7: what onnx.helper builds (the test
# rebuilds it and compares), kept as bytes so reading an adapter needs no onnx package.
CAST_MODEL = (b'\x08\x07:L\n\x17\n\x01x\x12\x01y"\x04Cast*\t\n\x02to\x18\x01\xa0\x01\x02\x12\rhalf_to_floatZ\x10\n'
              b'\x01x\x12\x0b\n\t\x08\n\x12\x05\n\x03\x12\x01nb\x10\n\x01y\x12\x0b\n\t\x08\x01\x12\x05\n\x03\x12\x01nB'
              b'\x04\n\x00\x10\r')
# Below this many values the session call costs more than numpy's loop.
MIN_ORT_VALUES = 4096

_session = None
_session_lock = threading.Lock()


def _cast_session():
    """The Cast session (one per process, on the calling thread), or None without onnxruntime."""
    global _session
    with _session_lock:
        if _session is None:
            try:
                import onnxruntime as ort
            except ImportError:
                _session = False
            else:
                options = ort.SessionOptions()
                options.intra_op_num_threads = 1  # runs on the caller's thread: no pool beside the serving one
                options.inter_op_num_threads = 1
                _session = ort.InferenceSession(CAST_MODEL, options, providers=["CPUExecutionProvider"])
        return _session or None


def half_to_float32(values: np.ndarray) -> np.ndarray:
    """A new float32 array of ``values`` (float16, any shape), converted exactly."""
    flat = np.ascontiguousarray(values, np.float16).reshape(-1)  # [n]
    session = _cast_session() if flat.size >= MIN_ORT_VALUES else None
    if session is None:
        return values.astype(np.float32)
    return session.run(None, {"x": flat})[0].reshape(values.shape)
