"""ONNX Runtime session options for opening an artifact: the inference runtime and compile-time verification
open artifacts the same way, so verification measures what serving will cost.

What opening an artifact costs (ONNX Runtime 1.32, measured; docs/internals.md has the numbers):

* external initializers are memory-mapped (at any offset), never read into a buffer: a table only a
  Gather reads (the embedding) stays file-backed, and only the rows looked up become resident;
* FusedMatMul / MatMulNBits weights are pre-packed into the kernel's layout, an anonymous copy (fp32: the
  weight's size; int4 at accuracy level 4: 1.2x, the block sums the int8-activation kernel keeps), and the
  mapped pages they came from are clean page cache the kernel reclaims under pressure. Pre-packing stays
  on: without it an fp32 B=8 MatMul ran 3x slower, and MatMulNBits falls back to slow paths. The packing
  runs on the intra-op threads (``session.prepack.enable_parallel``, off by default): opening the 1B fp32
  artifact took 2.2-3.3 s instead of 3.8-11.3 s on 2 cores, the 1B int4 one 0.5-0.6 s instead of 1.0-1.2 s.
  The price: every weight is mapped in before the packing ends, so the open peaks at the data file's size over
  what the session keeps (1B fp32: peak RSS 8.1 GiB, 4.4 GiB after; serially 4.4 GiB throughout); those pages are
  clean page cache, dropped after the open. The runtime packs in parallel only where the memory budget has that
  room (services/inference/runtime.py);
* so a session costs its weights in kernel layout plus a constant (the runtime and the arena of one
  call's activations); ``session.use_device_allocator_for_initializers`` changes nothing here (the
  initializers are mapped, not allocated) and is not set.
"""

from __future__ import annotations


def session_options(ort, *, num_threads: int = 0, allow_spinning: bool = False, stop_spinning_after_run: bool = False,
                    parallel_prepack: bool = True):
    """SessionOptions for an artifact graph: ``num_threads`` intra-op threads (0 = ONNX Runtime's default),
    one inter-op thread, idle threads sleeping unless ``allow_spinning``; ``stop_spinning_after_run``: spinning
    threads stop as the last concurrent Run returns and spin again at the next (they burn no core between
    calls, while the caller samples or waits for requests); ``parallel_prepack``: the weights are packed on the
    intra-op threads, which maps every one of them at once for a moment (see above)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if num_threads:
        so.intra_op_num_threads = num_threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    so.add_session_config_entry("session.prepack.enable_parallel", "1" if parallel_prepack else "0")
    if allow_spinning and stop_spinning_after_run:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    return so
