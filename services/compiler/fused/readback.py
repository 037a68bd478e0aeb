"""The weights a written fused graph really multiplies by, read back from the artifact one tensor at a time.

``ArtifactWeights`` is a WeightSource over the graph file (loaded without its data) and the external data
file, guided by the builder's ``written`` map: float initializers are read as stored (our layout), MatMulNBits
blocks are dequantised. The int4/int8 verification reference runs on it, so what is checked is the bytes
that were published, not a copy the builder kept. ``check_blocks`` proves each quantised tensor is the
block quantisation of the checkpoint's tensor (every weight within one quantisation step of it), which
catches a tensor written under the wrong name that a reference built from the artifact would not.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from services.compiler.fused import quantize
from services.compiler.fused.builder import WrittenWeight
from services.compiler.modeling.config import DecoderConfig
from services.compiler.verify import VerificationFailed

# |checkpoint - dequantised| <= SLACK * |scale| per block: rounding gives half a step, the clamp of a value as
# large as the block's largest but of the other sign one step (ORT's symmetric quantiser).
SLACK = 1.0 + 1e-4


class ArtifactWeights:
    """WeightSource over a written fused graph: ``get`` reads one tensor back as float32 [out, in]."""

    def __init__(self, cfg: DecoderConfig, onnx_path: str | Path, written: Mapping[str, WrittenWeight]):
        self.cfg = cfg
        self.onnx_path = Path(onnx_path)
        model = onnx.load(str(self.onnx_path), load_external_data=False)
        self._inits = {t.name: t for t in model.graph.initializer}
        self.written = dict(written)

    def _array(self, name: str) -> np.ndarray:
        t = self._inits[name]
        if t.data_location != TensorProto.EXTERNAL:
            return np.array(numpy_helper.to_array(t))  # a writable copy (torch.from_numpy wants one)
        info = {e.key: e.value for e in t.external_data}
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        count = int(info["length"]) // np.dtype(dtype).itemsize
        data = np.fromfile(self.onnx_path.parent / info["location"], dtype=dtype, count=count,
                           offset=int(info.get("offset", 0)))
        return data.reshape(tuple(t.dims))

    def scales(self, name: str) -> torch.Tensor:
        """[N, k_blocks] block scales of a quantised tensor."""
        w = self.written[name]
        k_blocks = (w.k + w.block_size - 1) // w.block_size
        return torch.from_numpy(self._array(f"{w.initializer}.scales").reshape(w.n, k_blocks))

    def get(self, name: str, buffers=None) -> torch.Tensor:
        # ``buffers`` unused: every tensor here is fresh memory anyway (read with np.fromfile, or dequantised);
        # a pool of the verification pass's would keep a layer of them alive beside the replay's sessions.
        w = self.written[name]
        if w.bits is None:
            return torch.from_numpy(self._array(w.initializer)).float()  # stored in our layout
        zp = f"{w.initializer}.zero_points"
        return quantize.dequantize_nk(self._array(f"{w.initializer}.qweight"), self._array(f"{w.initializer}.scales"),
                                      self._array(zp) if zp in self._inits else None, bits=w.bits,
                                      block_size=w.block_size, k=w.k, n=w.n)


def check_blocks(name: str, checkpoint: torch.Tensor, dequantized: torch.Tensor, scales: torch.Tensor,
                 block_size: int) -> float:
    """Raise VerificationFailed unless ``dequantized`` [N, K] is within one quantisation step of
    ``checkpoint`` in every block; returns the largest error in steps."""
    n, k = checkpoint.shape
    k_blocks = scales.shape[1]
    err = torch.sub(checkpoint, dequantized).abs_()
    if k_blocks * block_size != k:
        err = torch.nn.functional.pad(err, (0, k_blocks * block_size - k))
    worst = err.view(n, k_blocks, block_size).amax(dim=-1)  # [N, k_blocks]
    steps = worst / scales.abs().clamp_min(torch.finfo(torch.float32).tiny)
    bad = float(steps.max())
    if bad > SLACK:
        raise VerificationFailed(f"{name} in the artifact is not the block quantisation of the checkpoint's tensor: "
                                 f"a block differs by {bad:.3g} quantisation steps (at most 1 is rounding)",
                                 float(worst.max()))
    return bad
