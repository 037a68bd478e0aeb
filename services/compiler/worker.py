"""The compile job handler: plan, build (stages reported as events), publish, register.

The artifact key is its content address, so a redelivered job (worker crash) finds the published
directory and registers it instead of compiling and uploading again.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from loraflow.jobs.queue import JobContext
from loraflow.jobs.registry import ArtifactAdapterRecord, ArtifactRecord, Registry
from loraflow.storage.store import ObjectStore, artifact_key
from services.compiler import metrics
from services.compiler.artifact import build_artifact
from services.compiler.inputs import CompileInputs, ResolvedInputs
from services.compiler.options import CompileOptions

log = logging.getLogger(__name__)

# Share of the job's progress bar that building takes; uploading is the rest.
BUILD_SHARE = 0.9


class CompileHandler:
    def __init__(self, store: ObjectStore, registry: Registry, inputs: CompileInputs, cache_dir: str | Path):
        self.store = store
        self.registry = registry
        self.inputs = inputs
        self.cache_dir = Path(cache_dir)

    def __call__(self, ctx: JobContext) -> dict:
        try:
            result = self._run(ctx)
        except Exception:
            metrics.JOBS.labels(outcome="error").inc()
            raise
        metrics.JOBS.labels(outcome="cache_hit" if result["cache_hit"] else "compiled").inc()
        return result

    def _run(self, ctx: JobContext) -> dict:
        payload = ctx.payload
        ctx.report(0.0, f"load: attempt {ctx.attempt}, resolving base model and adapters")
        resolved = self.inputs.plan(payload["base_model"], list(payload["adapters"]),
                                    CompileOptions.from_dict(payload["options"]))
        plan = resolved.plan
        key = artifact_key(plan.artifact_id)
        uri = self.store.uri(key)
        record = self.registry.find_artifact(plan.artifact_id)
        if record is not None and self.store.dir_exists(key):
            ctx.report(1.0, f"cache hit: artifact {plan.artifact_id} already exists")
            return {"artifact_id": plan.artifact_id, "artifact_uri": record.uri, "cache_hit": True}
        if self.store.dir_exists(key):
            # Published by an earlier attempt that died before registering: register, do not rebuild.
            ctx.report(BUILD_SHARE, f"upload: artifact {plan.artifact_id} was published by an earlier attempt")
            size = sum(int(info["size"]) for info in self.store.read_manifest(key)["files"].values())
        else:
            size = self._build_and_publish(ctx, resolved, key)
        record = ArtifactRecord(
            artifact_id=plan.artifact_id, uri=uri, base_model=payload["base_model"],
            adapters=tuple(ArtifactAdapterRecord(slot=i, name=a.name, digest=a.digest, r=a.r)
                           for i, a in enumerate(plan.adapters, start=1)),
            options=plan.options.to_dict(), size_bytes=size, architecture=plan.config.architecture)
        result = {"artifact_id": plan.artifact_id, "artifact_uri": uri, "cache_hit": False}
        ctx.succeed(result, commit=lambda pipe: self.registry.put_artifact(record, pipe=pipe),
                    message=f"artifact {plan.artifact_id} published")
        return result

    def _build_and_publish(self, ctx: JobContext, resolved: ResolvedInputs, key: str) -> int:
        plan = resolved.plan
        out = self.cache_dir / "builds" / f"{ctx.job_id}-a{ctx.attempt}"
        shutil.rmtree(out, ignore_errors=True)
        try:
            def progress(stage: str, fraction: float, message: str) -> None:
                ctx.report(BUILD_SHARE * fraction, f"{stage}: {message}")

            base_dir = resolved.base_dir or self.inputs.fetch_base(ctx.payload["base_model"], plan)
            ctx.check()
            manifest = build_artifact(base_dir, [(a.name, a.path) for a in resolved.adapters], plan.options, out,
                                      progress=progress, check=ctx.check, base_source=ctx.payload["base_model"],
                                      plan=plan)
            for stage, seconds in manifest.extra.get("timings", {}).items():
                metrics.STAGE_SECONDS.labels(stage=stage).observe(seconds)
            ctx.check()  # fenced: a cancelled or taken-over attempt uploads nothing
            size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
            ctx.report(BUILD_SHARE, f"upload: {size / 1e6:.1f} MB to {self.store.uri(key)}")
            self.store.publish_dir(key, out)
            return size
        finally:
            shutil.rmtree(out, ignore_errors=True)
