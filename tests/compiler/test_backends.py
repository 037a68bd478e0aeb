"""Backend selection: every plan is taken by exactly one compile backend, the one its target and dtype name."""

from __future__ import annotations

from dataclasses import replace

import pytest

from services.compiler import ai100
from services.compiler.artifact import plan_artifact
from services.compiler.backends import BACKENDS, pick_backend
from services.compiler.fused.builder import ROTARY_HEAD_MULTIPLE
from services.compiler.options import CompileOptions


def _taken_by(plan) -> str:
    takers = [b.name for b in BACKENDS if b.accepts(plan)]
    assert len(takers) == 1, takers
    assert pick_backend(plan).name == takers[0]
    return takers[0]


@pytest.mark.parametrize(("options", "backend"), [
    (CompileOptions(), "fused"),
    (CompileOptions(dtype="int8"), "fused"),
    (CompileOptions(dtype="int4"), "fused"),
    (CompileOptions(dtype="fp16"), "traced"),
])
def test_onnxruntime_plans_pick_by_dtype(tiny_llama, options, backend):
    assert _taken_by(plan_artifact(tiny_llama, [], options)) == backend


def test_a_model_the_fused_builder_refuses_goes_to_the_trace(tiny_llama):
    plan = plan_artifact(tiny_llama, [], CompileOptions())
    odd = replace(plan, config=replace(plan.config, head_dim=ROTARY_HEAD_MULTIPLE + 2))
    assert _taken_by(odd) == "traced"


def test_ai100_plans_pick_the_ai100_backend(monkeypatch, tmp_path, tiny_llama):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no qaic-exec: the export stage only
    monkeypatch.setattr(ai100, "SDK_EXEC_DIR", tmp_path / "nowhere")
    plan = plan_artifact(tiny_llama, [], CompileOptions(target="ai100", ai100_stage="export"))
    assert _taken_by(plan) == "ai100"
