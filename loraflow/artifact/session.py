"""ONNX Runtime session options for opening an artifact: the inference runtime and compile-time verification
open artifacts the same way, so verification measures what serving will cost.

Opening costs the artifact's weights plus the KV cache plus a small constant (measured on a Mistral-7B
int4 artifact, docs/internals.md):

* external initializers are memory-mapped by ONNX Runtime (any offset), not read into a buffer; a weight
  only a Gather reads (the embedding table) stays file-backed, and only the rows touched become resident;
* MatMul / MatMulNBits weights are pre-packed into the kernels' layout (an anonymous copy the size of the
  weight) and the mapping is released: each weight is resident once. Pre-packing stays on: without it
  an fp32 decode MatMul ran ~3x slower;
* initializers are allocated outside the arena (``session.use_device_allocator_for_initializers``), so no
  arena chunk rounds them up, and the arena itself only holds activations.
"""

from __future__ import annotations


def session_options(ort, *, num_threads: int = 0, allow_spinning: bool = False):
    """SessionOptions for an artifact graph: ``num_threads`` intra-op threads (0 = ONNX Runtime's default),
    one inter-op thread, idle threads sleeping unless ``allow_spinning``."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if num_threads:
        so.intra_op_num_threads = num_threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    so.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
    return so
