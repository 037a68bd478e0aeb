"""loraflow/native's SwiGlu kernel: silu(gate) * up over a packed gate|up, against float64 arithmetic, and
its place in the compiled native graph."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from loraflow import native as native_lora
from tests.support.native import native_session, require_native


def _session(last_dim, spinning: bool, dims=("B", "S")) -> ort.InferenceSession:
    """One SwiGlu node over x [*dims, last_dim]; its output y is declared without a shape (shape inference
    gives it one where it can)."""
    nodes = [helper.make_node("SwiGlu", ["x"], ["y"], domain=native_lora.DOMAIN)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                           [*dims, last_dim])], outputs)
    return native_session(graph, spinning)


def _reference(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    gate, up = x[..., :half].astype(np.float64), x[..., half:].astype(np.float64)
    return gate * up / (1.0 + np.exp(-gate))


# A decode step (S=1, inline), a prefill chunk split over the pool's threads (8 x 64 tokens of 1536 is past
# both thresholds), and a width that is not a multiple of the vector length (the loop's scalar tail).
@pytest.mark.parametrize("shape", [(8, 1, 2 * 1536), (8, 64, 2 * 1536), (3, 5, 2 * 13)])
@pytest.mark.parametrize("spinning", [False, True])
def test_swiglu_equals_silu_gate_times_up(shape, spinning):
    require_native()
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 6).astype(np.float32)
    x[0, 0, :4] = [-120.0, 95.0, -87.5, 0.0]  # gates past the exp clamp either way, and zero
    (out,) = _session(shape[-1], spinning).run(None, {"x": x})
    want = _reference(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == np.float32
    assert np.isfinite(out).all()
    # float32 rounding of a few operations (the exp approximation is within 2e-7 of exp): relative 1e-6, and
    # an absolute floor for outputs near zero (silu of a very negative gate is ~1e-36 either way).
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-30)
    assert out[0, 0, 1] == pytest.approx(95.0 * x[0, 0, shape[-1] // 2 + 1], rel=1e-6)


def test_swiglu_keeps_denormal_products_and_the_callers_floating_point_mode():
    """The loop is written on vectors (a per-float loop that g++ vectorised itself computed the clamp's far side,
    a denormal, in every lane: a microcode assist per vector), not by flushing denormals: a product that is a
    denormal comes out as one, and the calling thread (a decode step runs inline on it) keeps producing them."""
    require_native()
    x = np.full((1, 1, 2 * 64), 3.0, np.float32)
    x[0, 0, 64:66] = [1e-39, 2.0]  # an up value that is itself a denormal
    (out,) = _session(x.shape[-1], spinning=False).run(None, {"x": x})
    silu = 3.0 / (1.0 + np.exp(-3.0))
    assert out[0, 0, 0] == pytest.approx(1e-39 * silu, rel=1e-3) and out[0, 0, 0] != 0.0
    assert out[0, 0, 1] == pytest.approx(2.0 * silu, rel=1e-6)
    tiny = np.float32(1e-38) * np.float32(0.1)  # a denormal on this thread, after the kernel ran on it
    assert tiny != 0.0 and tiny == pytest.approx(1e-39, rel=1e-3)


def test_swiglu_refuses_an_odd_packed_width():
    require_native()
    session = _session("W", spinning=False)
    with pytest.raises(Exception, match=r"SwiGlu: gate_up \[2, 1, 7\] needs an even last dimension"):
        session.run(None, {"x": np.zeros((2, 1, 7), np.float32)})


@pytest.mark.parametrize("dims", [["B", "S"], [3, 2]])
def test_swiglu_declares_its_output_shape_to_the_graph(dims):
    """Shape inference hands the nodes behind SwiGlu its input's dimensions (named symbols kept as they are)
    with the width halved: the graph's output, declared without a shape, gets it from the node."""
    require_native()
    session = _session(2 * 24, spinning=False, dims=dims)
    assert session.get_outputs()[0].shape == [*dims, 24]
    (out,) = session.run(None, {"x": np.ones((3, 2, 48), np.float32)})
    assert out.shape == (3, 2, 24)


def test_swiglu_leaves_an_unnamed_unknown_dimension_unknown():
    """An input dimension without a number or a name is not written back as a fixed -1."""
    require_native()
    session = _session(2 * 24, spinning=False, dims=[None, "S"])
    assert session.get_outputs()[0].shape in (None, [])
    (out,) = session.run(None, {"x": np.ones((3, 2, 48), np.float32)})
    assert out.shape == (3, 2, 24)


def test_the_native_graph_runs_the_mlp_activation_as_one_swiglu_node(tiny_artifact):
    """model.native.onnx: one SwiGlu per layer and no gate|up Split; model.onnx keeps standard operators."""
    require_native()
    artifact_dir, manifest = tiny_artifact
    graph = manifest.graph
    native = onnx.load(str(artifact_dir / graph.native_file), load_external_data=False)
    standard = onnx.load(str(artifact_dir / graph.file), load_external_data=False)
    ops = [(n.op_type, n.domain) for n in native.graph.node]
    assert ops.count(("SwiGlu", native_lora.DOMAIN)) == graph.layers
    assert not [n.name for n in native.graph.node if n.name.endswith("/mlp/split")]
    assert len([n for n in standard.graph.node if n.name.endswith("/mlp/split")]) == graph.layers
    assert not [n for n in standard.graph.node if n.domain == native_lora.DOMAIN]
