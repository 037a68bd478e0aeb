"""Compile backends, one module per target, each a ``shared.Backend``: ``fused`` (the fused ONNX Runtime
graph, fp32/int8/int4), ``traced`` (the torch trace: fp16, and models the fused builder refuses), ``ai100``
(the AI 100 bundle). ``build_artifact`` picks one, exports, verifies, and writes the manifest."""

from __future__ import annotations

from loraflow.errors import InvalidArgument
from services.compiler.artifact_plan import ArtifactPlan
from services.compiler.backends import ai100, fused, traced
from services.compiler.backends.shared import Backend

BACKENDS: tuple[Backend, ...] = (fused.BACKEND, traced.BACKEND, ai100.BACKEND)


def pick_backend(plan: ArtifactPlan) -> Backend:
    """The one backend that accepts the plan's resolved target and dtype."""
    for backend in BACKENDS:
        if backend.accepts(plan):
            return backend
    raise InvalidArgument(f"no compile backend takes options.target={plan.options.target!r} "
                          f"with dtype={plan.options.dtype!r}", field="options.target", value=plan.options.target)
