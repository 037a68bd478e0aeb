"""Block-wise weight-only quantisation for ONNX Runtime's com.microsoft ``MatMulNBits``.

The packing is ONNX Runtime's own: the numbers come from the C++ quantiser the onnxruntime wheel binds
(``quantize_matmul_4bits`` / ``quantize_matmul_8bits``, the same kernels ``MatMulNBitsQuantizer`` and
onnxruntime-genai's builder use), so our MatMulNBits initialisers are bit-identical to theirs.
``dequantize`` is the numpy reference of what the operator computes from them.

Layout (``MatMulNBits`` in ONNX Runtime's docs/ContribOperators.md), for y = x @ W with W [K, N]:

* ``packed``  uint8 [N, k_blocks, block_size * bits / 8]: column n of W, block b, quantised values in
  K order; for 4 bits two per byte, the even k in the low nibble.
* ``scales``  float32 [N * k_blocks], n-major (scale of column n, block b at n * k_blocks + b).
* ``zero_points`` uint8 [N * ceil(k_blocks * bits / 8)]: per column n, one byte per block (8 bits) or two
  blocks per byte, even block in the low nibble, each column padded to whole bytes (4 bits). ``None``
  for symmetric weights: the operator then uses 2^(bits-1) (8 for 4-bit, 128 for 8-bit).
* K is padded with zeros to k_blocks * block_size; the operator reads only the first K.

Dequantised value: w[k, n] = (q[n, k] - zp[n, k // block]) * scale[n, k // block].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import NodeProto, TensorProto, helper, numpy_helper

from loraflow.errors import InvalidArgument

BITS = (4, 8)
MIN_BLOCK = 16
MAX_BLOCK = 256
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations
DEFAULT_BLOCK_SIZE = 32
# onnxruntime-genai's builder quantises symmetrically by default (extra option is_symmetric=true).
DEFAULT_SYMMETRIC = True
# A [K, N] weight beyond this many elements is not a layer of any model we compile.
MAX_ELEMENTS = 1 << 32


def _blocks(k: int, block_size: int) -> int:
    return (k + block_size - 1) // block_size


def _zero_point_bytes_per_column(k_blocks: int, bits: int) -> int:
    return (k_blocks * bits + 7) // 8


@dataclass(frozen=True, eq=False)  # eq=False: numpy fields have no scalar ==
class QuantizedWeight:
    """One [K, N] weight in MatMulNBits form (see the module docstring for the layout)."""

    packed: np.ndarray  # uint8 [N, k_blocks, block_size * bits / 8]
    scales: np.ndarray  # float32 [N * k_blocks]
    zero_points: np.ndarray | None  # uint8 [N * ceil(k_blocks * bits / 8)], None when symmetric
    bits: int
    block_size: int
    k: int
    n: int

    def __post_init__(self):
        _check_bits(self.bits)
        _check_block_size(self.block_size)
        k_blocks = _blocks(self.k, self.block_size)
        want = (self.n, k_blocks, self.block_size * self.bits // 8)
        if self.packed.dtype != np.uint8 or self.packed.shape != want:
            raise InvalidArgument(f"packed must be uint8 {list(want)}, got {self.packed.dtype} "
                                  f"{list(self.packed.shape)}", field="packed", value=list(self.packed.shape))
        if self.scales.dtype != np.float32 or self.scales.shape != (self.n * k_blocks,):
            raise InvalidArgument(f"scales must be float32 [{self.n * k_blocks}], got {self.scales.dtype} "
                                  f"{list(self.scales.shape)}", field="scales", value=list(self.scales.shape))
        if self.zero_points is not None:
            zp_len = self.n * _zero_point_bytes_per_column(k_blocks, self.bits)
            if self.zero_points.dtype != np.uint8 or self.zero_points.shape != (zp_len,):
                raise InvalidArgument(f"zero_points must be uint8 [{zp_len}], got {self.zero_points.dtype} "
                                      f"{list(self.zero_points.shape)}", field="zero_points",
                                      value=list(self.zero_points.shape))

    @property
    def k_blocks(self) -> int:
        return _blocks(self.k, self.block_size)

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    @property
    def nbytes(self) -> int:
        zp = 0 if self.zero_points is None else self.zero_points.nbytes
        return self.packed.nbytes + self.scales.nbytes + zp


def _check_bits(bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in BITS:
        raise InvalidArgument(f"bits={bits!r} is invalid: must be one of {list(BITS)}", field="bits", value=bits)


def _check_block_size(block_size) -> None:
    ok = (not isinstance(block_size, bool) and isinstance(block_size, (int, np.integer))
          and MIN_BLOCK <= int(block_size) <= MAX_BLOCK and int(block_size) & (int(block_size) - 1) == 0)
    if not ok:
        raise InvalidArgument(f"block_size={block_size!r} is invalid: must be a power of two in "
                              f"{MIN_BLOCK}..{MAX_BLOCK}", field="block_size", value=block_size)


def _check_accuracy_level(level) -> None:
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or int(level) not in ACCURACY_LEVELS:
        raise InvalidArgument(f"accuracy_level={level!r} is invalid: must be one of {list(ACCURACY_LEVELS)}",
                              field="accuracy_level", value=level)


def _check_weight(weight) -> np.ndarray:
    if not isinstance(weight, np.ndarray):
        raise InvalidArgument(f"weight must be a numpy array, got {type(weight).__name__}", field="weight",
                              value=type(weight).__name__)
    if weight.ndim != 2:
        raise InvalidArgument(f"weight must be 2-D [K, N], got shape {list(weight.shape)}", field="weight.shape",
                              value=list(weight.shape))
    if weight.shape[0] < 1 or weight.shape[1] < 1 or weight.size > MAX_ELEMENTS:
        raise InvalidArgument(f"weight shape {list(weight.shape)} is invalid: both dims must be >= 1 and at most "
                              f"{MAX_ELEMENTS} elements", field="weight.shape", value=list(weight.shape))
    if not np.issubdtype(weight.dtype, np.floating):
        raise InvalidArgument(f"weight must be a float array, got {weight.dtype}", field="weight.dtype",
                              value=str(weight.dtype))
    w = np.ascontiguousarray(weight, dtype=np.float32)
    if not np.isfinite(w).all():
        bad = int(np.count_nonzero(~np.isfinite(w)))
        raise InvalidArgument(f"weight has {bad} non-finite values (NaN/inf, after casting to float32)",
                              field="weight", value=f"{bad} non-finite")
    return w


def quantize_blockwise(weight: np.ndarray, bits: int, block_size: int = DEFAULT_BLOCK_SIZE, *,
                       symmetric: bool = DEFAULT_SYMMETRIC) -> QuantizedWeight:
    """Quantise ``weight`` [K, N] (y = x @ W) block-wise along K with ONNX Runtime's own C++ quantiser.

    Symmetric: scale = the block's largest-magnitude value / -2^(bits-1) (ORT keeps its sign), zero point
    2^(bits-1) implied. Asymmetric: the block's [min, max] widened to include 0, mapped onto 0..2^bits-1.
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    _check_bits(bits)
    _check_block_size(block_size)
    if not isinstance(symmetric, bool):
        raise InvalidArgument(f"symmetric={symmetric!r} must be a bool", field="symmetric", value=symmetric)
    bits, block_size = int(bits), int(block_size)
    w = _check_weight(weight)
    k, n = w.shape
    k_blocks = _blocks(k, block_size)
    if k_blocks * block_size != k:  # the padded rows quantise to the zero point (value 0)
        w = np.pad(w, ((0, k_blocks * block_size - k), (0, 0)))  # [K, N] -> [k_blocks * block, N]
    packed = np.zeros((n, k_blocks, block_size * bits // 8), dtype=np.uint8)
    scales = np.zeros((n, k_blocks), dtype=np.float32)
    zero_points = np.zeros((n, _zero_point_bytes_per_column(k_blocks, bits)), dtype=np.uint8)
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    # Arguments as ORT's MatMulNBitsQuantizer passes them: (dst, src [K, N], scales, zp, block, N, K, sym).
    quantize(packed, w, scales, zero_points, block_size, n, k, symmetric)
    return QuantizedWeight(
        packed=packed,
        scales=scales.reshape(-1),  # [N, k_blocks] -> [N * k_blocks]
        zero_points=None if symmetric else zero_points.reshape(-1),  # [N, bytes] -> [N * bytes]
        bits=bits, block_size=block_size, k=k, n=n)


def quantize_linear(weight_nk, bits: int, block_size: int = DEFAULT_BLOCK_SIZE, *, threads: int | None = None
                    ) -> QuantizedWeight:
    """``quantize_blockwise`` of a torch float32 linear weight [N, K] (nn.Linear layout), symmetric, on
    ``threads`` threads (default: torch's): its rows are cut into that many slices, each transposed to the
    [K, n] ORT's quantiser takes and quantised at once (the binding releases the GIL), and the blocks joined
    along N. Bit-identical to one call over the whole weight, since every column is quantised alone."""
    import torch

    if weight_nk.ndim != 2 or weight_nk.dtype != torch.float32:
        raise InvalidArgument(f"weight must be a float32 [N, K] tensor, got {weight_nk.dtype} {list(weight_nk.shape)}",
                              field="weight", value=list(weight_nk.shape))
    n = weight_nk.shape[0]
    parts = max(1, min(threads or torch.get_num_threads(), n))
    bounds = [n * i // parts for i in range(parts + 1)]
    slices = [weight_nk[lo:hi].t().contiguous().numpy() for lo, hi in zip(bounds, bounds[1:], strict=False)]
    if parts == 1:
        return quantize_blockwise(slices[0], bits, block_size)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(parts) as pool:
        done = list(pool.map(lambda w: quantize_blockwise(w, bits, block_size), slices))
    return QuantizedWeight(packed=np.concatenate([q.packed for q in done]),  # [N, k_blocks, blob]
                           scales=np.concatenate([q.scales for q in done]),  # n-major: slices join in order
                           zero_points=None, bits=done[0].bits, block_size=done[0].block_size, k=done[0].k, n=n)


def dequantize_nk(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, *, bits: int,
                  block_size: int, k: int, n: int):
    """The float32 torch tensor [N, K] (nn.Linear layout) MatMulNBits multiplies by, from its raw
    initializers (layout in the module docstring), computed in place on torch's threads."""
    import torch

    k_blocks = _blocks(k, block_size)
    p = torch.from_numpy(np.ascontiguousarray(packed).reshape(n, k_blocks, -1))  # [N, k_blocks, blob]
    per_byte = 8 // bits
    out = torch.empty(n, k_blocks, p.shape[-1], per_byte)  # [N, k_blocks, blob, 1 or 2 values]
    if bits == 4:
        out[..., 0].copy_(p & 0x0F)  # low nibble first
        out[..., 1].copy_(p >> 4)
    else:
        out[..., 0].copy_(p)
    out = out.view(n, k_blocks, block_size)
    if zero_points is None:
        out.sub_(float(1 << (bits - 1)))
    else:
        per_col = torch.from_numpy(np.ascontiguousarray(zero_points).reshape(n, -1))  # [N, bytes]
        if bits == 4:
            per_col = torch.stack([per_col & 0x0F, per_col >> 4], dim=-1).reshape(n, -1)  # [N, 2 * bytes]
        out.sub_(per_col[:, :k_blocks].float().unsqueeze(-1))  # [N, k_blocks, 1] (the pad nibble dropped)
    out.mul_(torch.from_numpy(np.ascontiguousarray(scales).reshape(n, k_blocks, 1)))
    out = out.view(n, k_blocks * block_size)
    return out if k_blocks * block_size == k else out[:, :k].contiguous()  # [N, Kpad] -> [N, K]


def dequantize(q: QuantizedWeight) -> np.ndarray:
    """The float32 [K, N] weight MatMulNBits multiplies by (reference of the operator)."""
    w_nk = dequantize_nk(q.packed, q.scales, q.zero_points, bits=q.bits, block_size=q.block_size, k=q.k, n=q.n)
    return np.ascontiguousarray(w_nk.numpy().T)  # [N, K] -> [K, N]


def matmul_nbits(name: str, x: str, out: str, initializers: list[str], *, k: int, n: int, bits: int,
                 block_size: int, accuracy_level: int) -> NodeProto:
    """The com.microsoft MatMulNBits node ``out = x @ W`` over ``initializers`` (qweight, scales[, zero_points])."""
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"name={name!r} must be a non-empty string", field="name", value=name)
    _check_bits(bits)
    _check_block_size(block_size)
    _check_accuracy_level(accuracy_level)
    return helper.make_node("MatMulNBits", [x, *initializers], [out], name=name, domain="com.microsoft", K=k, N=n,
                            bits=bits, block_size=block_size, accuracy_level=int(accuracy_level))


def matmul_nbits_node(name: str, x: str, out: str, q: QuantizedWeight, *,
                      accuracy_level: int) -> tuple[NodeProto, list[TensorProto]]:
    """The com.microsoft MatMulNBits node computing ``out = x @ dequantize(q)`` and its initialisers.

    Initialisers are named ``{name}.qweight``, ``{name}.scales`` and (asymmetric only) ``{name}.zero_points``.
    ``accuracy_level`` 4 quantises the activations to int8 per block inside the kernel (faster on CPU, but
    the result then differs from x @ dequantize(q) by that activation rounding too).
    """
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"name={name!r} must be a non-empty string", field="name", value=name)
    _check_accuracy_level(accuracy_level)
    initializers = [numpy_helper.from_array(q.packed, f"{name}.qweight"),
                    numpy_helper.from_array(q.scales, f"{name}.scales")]
    if q.zero_points is not None:
        initializers.append(numpy_helper.from_array(q.zero_points, f"{name}.zero_points"))
    node = matmul_nbits(name, x, out, [t.name for t in initializers], k=q.k, n=q.n, bits=q.bits,
                        block_size=q.block_size, accuracy_level=accuracy_level)
    return node, initializers
