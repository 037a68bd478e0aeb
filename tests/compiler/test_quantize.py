"""MatMulNBits quantisation: ONNX Runtime's kernel on our initialisers equals x @ dequantize(q).

Every case builds a one-node com.microsoft MatMulNBits graph and runs it in ONNX Runtime, so the packing
(nibble order, zero-point packing, scale layout, K padding) is checked against the real operator.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from loraflow.errors import InvalidArgument
from services.compiler.fused.quantize import (
    QuantizedWeight,
    dequantize,
    dequantize_nk,
    matmul_nbits_node,
    quantize_blockwise,
    quantize_linear,
)

ROWS = 3
N = 24


def run_node(q: QuantizedWeight, x: np.ndarray, accuracy_level: int) -> np.ndarray:
    node, inits = matmul_nbits_node("layer.mm", "x", "y", q, accuracy_level=accuracy_level)
    graph = helper.make_graph(
        [node], "one_matmul_nbits",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, q.k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [ROWS, q.n])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def per_element_scale(q: QuantizedWeight) -> np.ndarray:
    """|scale| of each weight element's block, [K, N]."""
    scales = np.abs(q.scales.reshape(q.n, q.k_blocks))  # [N * k_blocks] -> [N, k_blocks]
    return np.repeat(scales, q.block_size, axis=1)[:, :q.k].T  # [N, k_blocks * block] -> [K, N]


def quantised_codes(q: QuantizedWeight) -> np.ndarray:
    """The stored integer code of each weight element, [K, N]."""
    if q.bits == 8:
        codes = q.packed
    else:
        codes = np.stack([q.packed & 0x0F, q.packed >> 4], axis=-1)  # [N, kb, bytes, 2]
    return codes.reshape(q.n, -1)[:, :q.k].T  # [N, kb * block] -> [K, N]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [64, 80, 7])  # whole blocks, a partial last block, less than one block
def test_matmul_nbits_equals_dequantized_matmul(bits, symmetric, k):
    rng = np.random.default_rng(1000 * bits + k + symmetric)
    weight = rng.standard_normal((k, N)).astype(np.float32)
    q = quantize_blockwise(weight, bits, 32, symmetric=symmetric)
    assert q.packed.shape == (N, (k + 31) // 32, 32 * bits // 8)
    assert (q.zero_points is None) == symmetric
    deq = dequantize(q)
    assert deq.shape == (k, N)

    x = rng.standard_normal((ROWS, k)).astype(np.float32)
    y = run_node(q, x, accuracy_level=0)
    ref = x.astype(np.float64) @ deq.astype(np.float64)
    # accuracy_level 0 computes in fp32: only summation-order rounding separates the two.
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-4 * max(1.0, np.abs(ref).max()))
    # ... and the quantisation really happened: the result is not the unquantised product.
    assert np.abs(y - x @ weight).max() > 1e-3


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_accuracy_level_4_error_is_the_int8_activation_rounding(bits, symmetric):
    """Level 4 quantises x per block to int8 (scale max|x_block| / 127): a rigorous bound on the output
    error is sum over blocks of max|x_block| / 254 * sum |dequantized w| in that block."""
    rng = np.random.default_rng(7 + bits + symmetric)
    k, block = 80, 32
    weight = rng.standard_normal((k, N)).astype(np.float32)
    q = quantize_blockwise(weight, bits, block, symmetric=symmetric)
    deq = dequantize(q).astype(np.float64)
    x = rng.standard_normal((ROWS, k)).astype(np.float32)
    y = run_node(q, x, accuracy_level=4)
    ref = x.astype(np.float64) @ deq

    bound = np.zeros((ROWS, N))
    for b0 in range(0, k, block):
        amax = np.abs(x[:, b0:b0 + block]).max(axis=1, keepdims=True)  # [ROWS, 1]
        bound += amax / 254.0 * np.abs(deq[b0:b0 + block]).sum(axis=0, keepdims=True)  # [ROWS, N]
    err = np.abs(y - ref)
    assert (err <= bound * 1.01 + 1e-5).all(), float((err / bound).max())
    # The stated error: about 0.5% of the largest output for unit-normal inputs, and not zero.
    assert 0 < err.max() < 0.02 * np.abs(ref).max()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_dequantize_error_bounded_by_half_a_step(bits, symmetric, block_size):
    rng = np.random.default_rng(bits * block_size + symmetric)
    weight = (rng.standard_normal((200, 17)) * rng.uniform(0.01, 3.0, (1, 17))).astype(np.float32)
    q = quantize_blockwise(weight, bits, block_size, symmetric=symmetric)
    err = np.abs(dequantize(q) - weight)
    half_step = per_element_scale(q) / 2
    tol = 1e-6 * np.abs(weight).max()
    if symmetric:
        # ORT's symmetric scale is max-magnitude / -2^(bits-1): the value of opposite sign and the same
        # magnitude would need code 2^bits and is clipped to 2^bits - 1, one step off. Every other code
        # rounds to nearest.
        clipped = quantised_codes(q) == (1 << bits) - 1
        assert (err[~clipped] <= half_step[~clipped] + tol).all()
        assert (err[clipped] <= 2 * half_step[clipped] + tol).all()
    else:
        assert (err <= half_step + tol).all(), float((err / half_step).max())


def test_zero_weight_and_padding_dequantize_to_zero():
    q = quantize_blockwise(np.zeros((40, 3), np.float32), 4, 32, symmetric=False)
    assert np.array_equal(dequantize(q), np.zeros((40, 3), np.float32))


def test_symmetric_zero_point_is_implied_and_asymmetric_zero_points_are_packed_per_column():
    rng = np.random.default_rng(3)
    weight = np.abs(rng.standard_normal((96, 5))).astype(np.float32)  # all >= 0: zero points at 0
    q4 = quantize_blockwise(weight, 4, 32, symmetric=False)
    assert q4.zero_points.shape == (5 * 2,)  # 3 blocks -> 2 bytes per column (one padding nibble)
    per_col = q4.zero_points.reshape(5, 2)  # [N * 2] -> [N, 2]
    # blocks 0, 1 in byte 0 (low nibble first), block 2 in byte 1's low nibble; ORT fills the unused high
    # nibble with the default zero point 8, which the operator never reads.
    assert (per_col[:, 0] == 0).all() and (per_col[:, 1] == 0x80).all()
    q8 = quantize_blockwise(-weight, 8, 32, symmetric=False)
    assert q8.zero_points.shape == (5 * 3,)
    assert (q8.zero_points == 255).all()  # all <= 0: zero point at the top of the range
    node, inits = matmul_nbits_node("m", "a", "b", quantize_blockwise(weight, 4, 32), accuracy_level=0)
    assert [t.name for t in inits] == ["m.qweight", "m.scales"] and list(node.input) == ["a", "m.qweight",
                                                                                       "m.scales"]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert node.domain == "com.microsoft" and node.op_type == "MatMulNBits"
    assert attrs == {"K": 96, "N": 5, "bits": 4, "block_size": 32, "accuracy_level": 0}


@pytest.mark.parametrize("kwargs,field", [
    ({"bits": 3}, "bits"),
    ({"bits": True}, "bits"),
    ({"block_size": 48}, "block_size"),
    ({"block_size": 8}, "block_size"),
    ({"block_size": 512}, "block_size"),
    ({"weight": np.ones((4,), np.float32)}, "weight.shape"),
    ({"weight": np.ones((0, 3), np.float32)}, "weight.shape"),
    ({"weight": np.ones((4, 3), np.int32)}, "weight.dtype"),
    ({"weight": np.array([[1.0, np.nan]], np.float32)}, "weight"),
    ({"weight": np.array([[1.0, np.inf]], np.float64)}, "weight"),
    ({"weight": [[1.0, 2.0]]}, "weight"),
    ({"symmetric": 1}, "symmetric"),
])
def test_bad_arguments_raise_invalid_argument(kwargs, field):
    args = {"weight": np.ones((32, 2), np.float32), "bits": 4, "block_size": 32, "symmetric": True} | kwargs
    with pytest.raises(InvalidArgument) as info:
        quantize_blockwise(args["weight"], args["bits"], args["block_size"], symmetric=args["symmetric"])
    assert info.value.field == field
    assert info.value.metadata["field"] == field


@pytest.mark.parametrize("level", [-1, 5, 2.0])
def test_bad_accuracy_level_raises(level):
    q = quantize_blockwise(np.ones((32, 2), np.float32), 8, 32)
    with pytest.raises(InvalidArgument) as info:
        matmul_nbits_node("m", "x", "y", q, accuracy_level=level)
    assert info.value.field == "accuracy_level" and str(level) in str(info.value)


def test_quantized_weight_rejects_inconsistent_arrays():
    q = quantize_blockwise(np.ones((64, 2), np.float32), 4, 32)
    with pytest.raises(InvalidArgument) as info:
        QuantizedWeight(packed=q.packed[:, :1], scales=q.scales, zero_points=None, bits=4, block_size=32,
                        k=64, n=2)
    assert info.value.field == "packed"
    with pytest.raises(InvalidArgument) as info:
        QuantizedWeight(packed=q.packed, scales=q.scales.astype(np.float64), zero_points=None, bits=4,
                        block_size=32, k=64, n=2)
    assert info.value.field == "scales"


@pytest.mark.parametrize("bits", [4, 8])
def test_linear_weights_quantised_in_slices_equal_one_call(bits):
    """quantize_linear cuts [N, K] into row slices quantised on separate threads: every column is quantised
    alone, so the joined blocks equal ORT's quantiser over the whole transposed weight, byte for byte."""
    import torch

    w = torch.from_numpy(np.random.default_rng(3).standard_normal((67, 96), dtype=np.float32))
    whole = quantize_blockwise(w.t().contiguous().numpy(), bits, 32)
    for threads in (1, 2, 5):
        sliced = quantize_linear(w, bits, 32, threads=threads)
        np.testing.assert_array_equal(sliced.packed, whole.packed)
        np.testing.assert_array_equal(sliced.scales, whole.scales)
    np.testing.assert_allclose(dequantize_nk(whole.packed, whole.scales, None, bits=bits, block_size=32, k=96,
                                                      n=67).numpy(), dequantize(whole).T, rtol=0, atol=0)


def test_the_reference_rounds_activations_as_accuracy_level_4_does():
    """At accuracy level 4 MatMulNBits rounds its input to int8 per block; the verification reference does the
    same (layerwise.round_activations) and then equals the kernel to float32 rounding, where the unrounded
    product is off by the rounding itself."""
    import torch

    from services.compiler.modeling.layerwise import round_activations

    rng = np.random.default_rng(4)
    w = rng.standard_normal((512, N), dtype=np.float32) * 0.05
    q = quantize_blockwise(w, 4, 32)
    x = rng.standard_normal((ROWS, 512), dtype=np.float32)
    got = run_node(q, x, accuracy_level=4)
    plain = x @ dequantize(q)
    rounded = round_activations(torch.from_numpy(x), 32).numpy() @ dequantize(q)
    scale = np.abs(plain).max()
    assert np.abs(got - rounded).max() / scale < 1e-5
    assert np.abs(got - plain).max() / scale > 1e-3
