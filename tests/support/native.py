"""Tests that need loraflow/native's library: skipped where it is not built (no C++ compiler), failed
instead when LORAFLOW_REQUIRE_NATIVE=1 (CI builds it, so there a missing library is a bug)."""

from __future__ import annotations

import os

import pytest

from loraflow import native as native_lora


def require_native() -> None:
    """Return if the library is built; else skip, or fail under LORAFLOW_REQUIRE_NATIVE=1."""
    if native_lora.library_path() is not None:
        return
    if os.environ.get("LORAFLOW_REQUIRE_NATIVE") == "1":
        pytest.fail(f"LORAFLOW_REQUIRE_NATIVE=1 but {native_lora.LIBRARY_NAME} is not built (make native)")
    pytest.skip(f"{native_lora.LIBRARY_NAME} is not built here (make native)")


def native_session(graph, spinning: bool = False):
    """An onnxruntime session over ``graph`` (an onnx GraphProto using ai.loraflow ops) with the library
    registered: 2 intra-op threads, spinning as asked (the kernels' thresholds follow it)."""
    import onnxruntime as ort
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(native_lora.DOMAIN, native_lora.OPSET)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    native_lora.register(so)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
