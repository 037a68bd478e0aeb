"""Backend "fused": the fused ONNX Runtime graph (fp32/int8/int4) written one tensor at a time by
``services/compiler/fused/`` and verified through the runtime's own step driver (and the native LoRA kernel
where the host has it)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from services.compiler.artifact_plan import ArtifactPlan
from services.compiler.backends.shared import Backend, BuildJob, Exported, Stages, verify_dict
from services.compiler.modeling.weights import CheckpointWeights


def uses_fused_graph(plan: ArtifactPlan) -> bool:
    """fp32/int8/int4 get the fused graph where it can express the model; fp16 (GPU) keeps the trace."""
    from services.compiler.fused.builder import WEIGHT_BITS, fused_graph_supported

    return plan.options.dtype in WEIGHT_BITS and fused_graph_supported(plan.config) is None


def accepts(plan: ArtifactPlan) -> bool:
    return plan.options.target == "onnxruntime" and uses_fused_graph(plan)


def _graph_options(job: BuildJob):
    from services.compiler.fused.builder import FusedGraphOptions

    opts = job.options
    return FusedGraphOptions(dtype=opts.dtype, ctx_len=int(opts.ctx_len), num_slots=job.banks.num_slots,
                             max_rank=job.banks.max_rank, lora_modules=job.lora_modules,
                             quant_block_size=int(opts.quant_block_size or 32),
                             quant_accuracy_level=int(opts.quant_accuracy_level or 0))


def export(job: BuildJob, stages: Stages) -> Exported:
    from services.compiler.fused.export import export_fused

    exported = export_fused(job.weights, job.out_dir, _graph_options(job))
    stages.took("export", 0.5, f"fused ONNX {job.options.dtype} graph written", exported.timings["export"])
    stages.took("optimize", 0.6, "graph saved", exported.timings["save"])
    return Exported(graph=exported.graph, digests=exported.digests, written=exported)


def verify(job: BuildJob, exported: Exported, stages: Stages) -> dict[str, Any]:
    from services.compiler.fused.verify import verify_fused_artifact

    opts = job.options
    t0 = time.perf_counter()
    quantized = opts.dtype != "fp32"
    reference = _fused_reference(job.out_dir, exported.written, job.weights, job.feeds, job.lora_modules,
                                 _graph_options(job))
    verify_report, native_report, ran = verify_fused_artifact(
        job.out_dir, exported.graph, reference, job.feeds, ctx_len=int(opts.ctx_len), occupied_slots=job.occupied,
        chunk=max(1, min(int(opts.prefill_seq_len), 4)), accuracy_level=opts.quant_accuracy_level,
        quantized=quantized)
    report = verify_dict(verify_report)
    report["layer_ranges"] = [list(r) for r in ran.ranges]
    report["sessions"] = ran.sessions
    report["seconds"] = ran.seconds
    if verify_report.quant_relative_diff is not None:
        report["quant_relative_diff_vs_float"] = verify_report.quant_relative_diff
        report["quant_token_agreement_vs_float"] = verify_report.quant_token_agreement
    if native_report is not None:
        report["native"] = {"max_abs_diff": native_report.max_abs_diff,
                            "relative_diff": native_report.relative_diff,
                            "tokens_match": native_report.tokens_match, "calls": native_report.calls}
    native_note = (f", native LoRA kernel {native_report.max_abs_diff:.3g}" if native_report is not None
                   else "")
    stages.done("verify", 0.85, f"the runtime's step driver matches PyTorch ({len(ran.ranges)} layer ranges): max "
                f"abs diff {verify_report.max_abs_diff:.3g}{native_note}", t0)
    return report


def _fused_reference(out_dir: Path, exported, weights: CheckpointWeights, feeds, lora_modules, fused):
    """The fused graph's reference: the checkpoint itself (fp32), or the quantised weights read back from
    the artifact, each proved to be the block quantisation of the checkpoint's tensor, with the checkpoint
    measured beside them (int4/int8); at accuracy level 4 the reference rounds the MatMulNBits inputs to int8
    as the kernel does."""
    from services.compiler.fused.readback import ArtifactWeights, check_blocks
    from services.compiler.verify import layerwise_reference

    if fused.bits is None:
        return layerwise_reference(weights, feeds, lora_modules, measure_on_error_rows=True)
    readback = ArtifactWeights(weights.cfg, out_dir / exported.graph.file, exported.written)

    def check_quantised(loaded) -> None:
        for name, got in loaded[readback].items():
            written = readback.written[name]
            if written.bits is not None:
                check_blocks(name, loaded[weights][name], got, readback.scales(name), written.block_size)

    return layerwise_reference(readback, feeds, lora_modules, float_source=weights, on_layer=check_quantised,
                               activation_block=fused.quant_block_size if fused.quant_accuracy_level == 4 else None,
                               measure_on_error_rows=True)


BACKEND = Backend(name="fused", accepts=accepts, export=export, verify=verify)
