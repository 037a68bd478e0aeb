"""Backend "ai100": the graph QEfficient hands to qaic-exec, written node by node
(``services/compiler/ai100_writer.py``), its bundle (``services/compiler/ai100.py``), verified by driving
ONNX Runtime as the card (``services/compiler/ai100_verify.py``), then compiled to a QPC where the SDK is."""

from __future__ import annotations

import time
from typing import Any

from services.compiler.artifact_plan import ArtifactPlan
from services.compiler.backends.shared import Backend, BuildJob, Exported, Stages


def accepts(plan: ArtifactPlan) -> bool:
    return plan.options.target == "ai100"


def export(job: BuildJob, stages: Stages) -> Exported:
    from services.compiler import ai100
    from services.compiler.ai100_writer import export_ai100

    opts = job.options
    t0 = time.perf_counter()
    cb = ai100.continuous_batching(opts)
    exported = export_ai100(job.weights, job.out_dir, lora_modules=job.lora_modules, num_slots=job.banks.num_slots,
                            max_rank=job.banks.max_rank, cb=cb, dtype=opts.dtype)
    exe = ai100.require_sdk() if opts.ai100_stage == "compile" else None
    bundle = ai100.write_bundle(job.out_dir, opts, job.plan.config.num_layers, qaic_exec=exe)
    stages.done("export", 0.4, f"AI 100 {opts.dtype} bundle written ({'continuous batching' if cb else 'static batch'})",
                t0)
    return Exported(graph=exported.graph, digests=exported.digests, specializations=bundle.specializations,
                    extra={"ai100": bundle.to_dict(), "qaic_exec": list(bundle.command)}, written=bundle)


def verify(job: BuildJob, exported: Exported, stages: Stages) -> dict[str, Any]:
    from services.compiler import ai100_verify
    from services.compiler.verify import layerwise_reference

    t0 = time.perf_counter()
    verify_report = ai100_verify.verify_bundle(job.out_dir, exported.graph,
                                               layerwise_reference(job.weights, job.feeds, job.lora_modules),
                                               job.feeds, job.options, occupied_slots=job.occupied)
    stages.done("verify", 0.5, "ONNX Runtime, driven as the card, matches PyTorch: max abs diff "
                + ", ".join(f"{r.precision} {r.max_abs_diff:.3g}" for r in verify_report.runs), t0)
    return verify_report.to_dict()


def finish(job: BuildJob, exported: Exported, stages: Stages) -> dict[str, Any]:
    """With ai100_stage "compile", qaic-exec compiles the verified bundle to a QPC."""
    from services.compiler import ai100

    if job.options.ai100_stage != "compile":
        return {}
    t0 = time.perf_counter()
    qpc = ai100.compile_qpc(job.out_dir, exported.written)
    stages.done("optimize", 0.8, "qaic-exec compiled the QPC", t0)
    return {"qpc_dir": qpc.name}


BACKEND = Backend(name="ai100", accepts=accepts, export=export, verify=verify, finish=finish)
