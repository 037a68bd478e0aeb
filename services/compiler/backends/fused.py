"""Backend "fused": the fused ONNX Runtime graph (fp32/int8/int4) written one tensor at a time by
``services/compiler/fused/`` and verified through the runtime's own step driver (and the native LoRA kernel
where the host has it)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.compiler.artifact_plan import ArtifactPlan
from services.compiler.backends.shared import Backend, BuildJob, Exported, Stages, verify_dict
from services.compiler.modeling.weights import CheckpointWeights

if TYPE_CHECKING:
    from services.compiler.fused.export import FusedExport
    from services.compiler.fused.reference_ahead import ReferenceAhead


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


def _chunk(job: BuildJob) -> int:
    """The verification scenario's prefill chunk."""
    return max(1, min(int(job.options.prefill_seq_len), 4))


@dataclass(frozen=True)
class _Written:
    export: FusedExport
    # The pass started beside the export: fp32's whole reference; int4/int8: the float model's variants.
    reference: ReferenceAhead


def export(job: BuildJob, stages: Stages) -> Exported:
    from services.compiler.fused.export import export_fused

    ahead = _reference_ahead(job)
    try:
        exported = export_fused(job.weights, job.out_dir, _graph_options(job))
        stages.took("export", 0.5, f"fused ONNX {job.options.dtype} graph written", exported.timings["export"])
        stages.took("optimize", 0.6, "graph saved", exported.timings["save"])
    except BaseException:
        ahead.cancel()
        raise
    return Exported(graph=exported.graph, digests=exported.digests, written=_Written(exported, ahead))


def _reference_ahead(job: BuildJob) -> ReferenceAhead:
    """What of the reference reads only the checkpoint, started now on the rows the scenario will ask for, so it
    runs while the export writes: fp32's whole reference (the checkpoint is what the graph holds); int4/int8's
    float-model variants (their checked variants read the weights back from the written artifact, in verify)."""
    from services.compiler.fused.reference_ahead import ReferenceAhead
    from services.compiler.verify import float_reference, layerwise_reference, scenario_rows

    rows = scenario_rows(vocab_size=job.weights.cfg.vocab_size, ctx_len=int(job.options.ctx_len),
                         occupied_slots=job.occupied, chunk=_chunk(job))
    if _graph_options(job).bits is not None:
        return ReferenceAhead(lambda hook: float_reference(job.weights, job.feeds, job.lora_modules, on_layer=hook),
                              rows)
    return ReferenceAhead(lambda hook: layerwise_reference(job.weights, job.feeds, job.lora_modules, on_layer=hook,
                                                           measure_on_error_rows=True), rows)


def verify(job: BuildJob, exported: Exported, stages: Stages) -> dict[str, Any]:
    from services.compiler.fused.verify import verify_fused_artifact

    opts = job.options
    t0 = time.perf_counter()
    quantized = opts.dtype != "fp32"
    written: _Written = exported.written
    try:
        reference = (_quantized_reference(job.out_dir, written.export, job.weights, job.feeds, job.lora_modules,
                                          _graph_options(job), float_pass=written.reference) if quantized
                     else written.reference)
        verify_report, native_report, ran = verify_fused_artifact(
            job.out_dir, exported.graph, reference, job.feeds, ctx_len=int(opts.ctx_len),
            occupied_slots=job.occupied, chunk=_chunk(job), accuracy_level=opts.quant_accuracy_level,
            quantized=quantized)
    finally:
        written.reference.cancel()  # returns at once when the pass finished; stops it when verification failed
    report = verify_dict(verify_report)
    report["layer_ranges"] = [list(r) for r in ran.ranges]
    report["sessions"] = ran.sessions
    report["seconds"] = ran.seconds
    # The ahead pass's own time, from the export's start: the wait for it is in ran.seconds.
    report["seconds"]["reference_ahead"] = round(written.reference.seconds, 3)
    if verify_report.quant_relative_diff is not None:
        report["quant_relative_diff_vs_float"] = verify_report.quant_relative_diff
        report["quant_token_agreement_vs_float"] = verify_report.quant_token_agreement
    if native_report is not None:
        report["native"] = {"max_abs_diff": native_report.max_abs_diff,
                            "relative_diff": native_report.relative_diff,
                            "tokens_match": native_report.tokens_match, "calls": native_report.calls,
                            "range_relative_diff": ran.range_diff}  # against model.onnx, range by range
    native_note = (f", native LoRA kernel {native_report.max_abs_diff:.3g}" if native_report is not None
                   else "")
    stages.done("verify", 0.85, f"the runtime's step driver matches PyTorch ({len(ran.ranges)} layer ranges): max "
                f"abs diff {verify_report.max_abs_diff:.3g}{native_note}", t0)
    return report


# Rows of a quantised weight checked against the checkpoint at a time (1B: 4096 x 2048 float32 = 32 MiB).
CHECK_ROWS = 4096


def _quantized_reference(out_dir: Path, exported, weights: CheckpointWeights, feeds, lora_modules, fused, *,
                         float_pass):
    """An int4/int8 graph's reference: the quantised weights read back from the artifact, each proved to be the
    block quantisation of the checkpoint's tensor (read again here, a tensor at a time), with the checkpoint
    measured by ``float_pass`` (verify.float_reference, started beside the export); at accuracy level 4 the
    reference rounds the MatMulNBits inputs to int8 as the kernel does."""
    from services.compiler.fused.readback import ArtifactWeights, check_blocks
    from services.compiler.verify import layerwise_reference

    readback = ArtifactWeights(weights.cfg, out_dir / exported.graph.file, exported.written)

    def check_quantised(loaded) -> None:
        for name, got in loaded[readback].items():
            written = readback.written[name]
            if written.bits is None:
                continue
            scales = readback.scales(name)
            # A block of rows at a time: the checkpoint's float32 copy and the difference stay small even for the
            # embedding and the head, which verification reads at its start and end beside the replay's sessions.
            for start in range(0, got.shape[0], CHECK_ROWS):
                stop = min(start + CHECK_ROWS, got.shape[0])
                check_blocks(name, weights.get_rows(name, start, stop), got[start:stop], scales[start:stop],
                             written.block_size)

    return layerwise_reference(readback, feeds, lora_modules, float_source=weights, on_layer=check_quantised,
                               activation_block=fused.quant_block_size if fused.quant_accuracy_level == 4 else None,
                               measure_on_error_rows=True, float_pass=float_pass)


BACKEND = Backend(name="fused", accepts=accepts, export=export, verify=verify)
