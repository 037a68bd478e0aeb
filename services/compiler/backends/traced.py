"""Backend "traced": the torch.onnx trace of the decoder (fp16 for GPUs, and models the fused builder cannot
express), optimised by ONNX Runtime and verified against the layer-by-layer reference. The only backend that
still materialises the decoder."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from services.compiler.artifact_plan import ArtifactPlan
from services.compiler.backends.fused import uses_fused_graph
from services.compiler.backends.shared import Backend, BuildJob, Exported, Stages, verify_dict
from services.compiler.options import CompileOptions


def accepts(plan: ArtifactPlan) -> bool:
    return plan.options.target == "onnxruntime" and not uses_fused_graph(plan)


def export(job: BuildJob, stages: Stages) -> Exported:
    from services.compiler.export import export_onnxruntime
    from services.compiler.modeling.decoder import load_decoder

    opts = job.options
    decoder = load_decoder(job.base_model_dir, job.lora_modules, weights=job.weights)  # the trace needs the module
    decoder.set_banks(job.banks_a, job.banks_b)
    graph, export_times = export_onnxruntime(decoder, job.out_dir, banks=job.banks, dtype=opts.dtype)
    del decoder
    stages.took("export", 0.5, f"ONNX {opts.dtype} exported",
                export_times["export"] + export_times.get("quantize", 0.0))
    stages.took("optimize", 0.6, "ONNX Runtime graph optimisation", export_times["optimize"])
    return Exported(graph=graph)


def verify(job: BuildJob, exported: Exported, stages: Stages) -> dict[str, Any]:
    from services.compiler.verify import layerwise_reference

    t0 = time.perf_counter()
    verify_report = _verify_ort(job.out_dir / exported.graph.file,
                                layerwise_reference(job.weights, job.feeds, job.lora_modules), exported.graph,
                                job.feeds, job.options, job.occupied)
    stages.done("verify", 0.85, f"ONNX Runtime matches PyTorch: max abs diff {verify_report.max_abs_diff:.3g}", t0)
    return verify_dict(verify_report)


def _verify_ort(onnx_path: Path, reference, graph, feeds, opts: CompileOptions, occupied: int):
    import onnxruntime as ort

    from loraflow.artifact.session import session_options
    from services.compiler.verify import verify_graph

    session = ort.InferenceSession(str(onnx_path), session_options(ort), providers=["CPUExecutionProvider"])
    chunk = max(1, min(int(opts.prefill_seq_len), 4))
    try:
        return verify_graph(session, reference, graph, feeds, dtype=opts.dtype, occupied_slots=occupied, chunk=chunk,
                            ctx_len=min(int(opts.ctx_len), 64))
    finally:
        del session


BACKEND = Backend(name="traced", accepts=accepts, export=export, verify=verify)
