"""float16 -> float32 through ONNX Runtime's Cast: the same values as numpy's for every finite half."""

from __future__ import annotations

import numpy as np

from loraflow.artifact import half_cast


def test_every_finite_half_converts_as_numpy_converts_it():
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)  # [65536] every bit pattern
    halves = halves[np.isfinite(halves)]  # zeros of both signs, subnormals, normals
    assert half_cast._cast_session() is not None  # the test environment has onnxruntime: the fast path runs
    got = half_cast.half_to_float32(halves.reshape(-1, 8))
    assert got.dtype == np.float32 and got.shape == (halves.size // 8, 8)
    assert got.reshape(-1).view(np.uint32).tobytes() == halves.astype(np.float32).view(np.uint32).tobytes()
    small = halves[:100]  # below MIN_ORT_VALUES: numpy's own loop
    assert half_cast.half_to_float32(small).tobytes() == small.astype(np.float32).tobytes()
    strided = halves[: 2 * half_cast.MIN_ORT_VALUES : 2]  # not contiguous
    assert half_cast.half_to_float32(strided).tobytes() == strided.astype(np.float32).tobytes()


def test_the_embedded_model_is_the_one_onnx_builds():
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)], "half_to_float",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    assert model.SerializeToString() == half_cast.CAST_MODEL
