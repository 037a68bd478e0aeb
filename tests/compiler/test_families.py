"""The compiler's model-family registry: one module per family, the library's list equal to it."""

from __future__ import annotations

import pytest

from loraflow.artifact.model_families import SUPPORTED_MODEL_FAMILIES, check_model_family
from loraflow.errors import InvalidArgument
from services.compiler.families import FAMILIES, family
from services.compiler.modeling.config import SUPPORTED_ARCHITECTURES


def test_the_library_list_is_the_compiler_registry():
    """The trainer checks against loraflow.artifact.model_families without importing the compiler: the two lists
    must be the same families in the same order."""
    assert tuple(FAMILIES) == SUPPORTED_MODEL_FAMILIES == SUPPORTED_ARCHITECTURES
    for name, spec in FAMILIES.items():
        assert spec.model_type == name and family(name) is spec


@pytest.mark.parametrize("model_type", ["gpt2", "", None, 7, "x" * 100])
def test_an_unknown_family_is_refused_naming_it_and_the_list(model_type):
    with pytest.raises(InvalidArgument) as err:
        check_model_family(model_type, field="base_model")
    assert err.value.field == "base_model"
    assert str(list(SUPPORTED_MODEL_FAMILIES)) in str(err.value)
    if isinstance(model_type, str) and len(model_type) <= 64:
        assert repr(model_type) in str(err.value)
    with pytest.raises(InvalidArgument) as err:
        family(model_type)
    assert err.value.field == "base_model.model_type"


FAMILY_KINDS = list(FAMILIES)


@pytest.mark.parametrize("arch", FAMILY_KINDS)
def test_both_targets_compile_and_verify_every_family(monkeypatch, tmp_path, arch, parity_model, adapter_factory):
    """build_artifact end to end (plan, export, the verification stage) for each family: the fused
    onnxruntime graph and the AI 100 bundle's export stage, with a rank-4 attention adapter and a rank-8 one
    on every linear (MLP included; Phi-3's packed modules)."""
    from services.compiler import ai100
    from services.compiler.artifact import build_artifact
    from services.compiler.options import CompileOptions

    every = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    adapters = [("a", adapter_factory(arch, "a4", r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"), seed=1)),
                ("b", adapter_factory(arch, "b8", r=8, lora_alpha=16, target_modules=every, seed=2))]
    model_dir = parity_model(arch)
    fused = build_artifact(model_dir, adapters, CompileOptions(prefill_seq_len=8, ctx_len=32), tmp_path / "ort")
    assert fused.base_model.architecture == arch
    assert fused.extra["verify"]["tokens_match"] and fused.extra["verify"]["max_abs_diff"] < 1e-4

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no qaic-exec: the export stage only
    monkeypatch.setattr(ai100, "SDK_EXEC_DIR", tmp_path / "nowhere")
    opts = CompileOptions(target="ai100", batch_size=1, full_batch_size=3, prefill_seq_len=4, ctx_len=32,
                          ai100_stage="export")
    bundle = build_artifact(model_dir, adapters, opts, tmp_path / "ai100")
    verify = bundle.extra["verify"]
    assert verify["tokens_match"] and [r["precision"] for r in verify["runs"]] == ["fp32", "fp16"]
    assert set(bundle.graph.lora_modules) == set(fused.graph.lora_modules)


def test_a_module_the_family_lacks_is_refused_at_plan(tmp_path, parity_model, adapter_factory):
    """Phi-3 has no separate q_proj: asking for it is INVALID_ARGUMENT naming the option, before any build."""
    from services.compiler.artifact import plan_artifact
    from services.compiler.options import CompileOptions

    with pytest.raises(InvalidArgument) as err:
        plan_artifact(parity_model("phi3"), [], CompileOptions(target_modules=("q_proj", "o_proj")))
    assert err.value.field == "options.target_modules" and "q_proj" in str(err.value)
    assert "qkv_proj" in str(err.value)


def test_family_config_rules_name_the_field():
    """Each family's own config.json rules: a malformed value is INVALID_ARGUMENT naming base_model.<key>."""
    from services.compiler.modeling.config import DecoderConfig
    from tests.support.tiny_models import tiny_config

    gemma2 = tiny_config("gemma2", vocab_size=300).to_dict()
    cfg = DecoderConfig.from_hf_dict(gemma2)
    assert (cfg.attn_logit_softcap, cfg.final_logit_softcap, cfg.attention_scale) == (1.5, 4.0, 24 ** -0.5)
    for key, value in (("attn_logit_softcapping", "big"), ("final_logit_softcapping", -1.0),
                       ("query_pre_attn_scalar", float("inf")), ("hidden_activation", "relu")):
        with pytest.raises(InvalidArgument) as err:
            DecoderConfig.from_hf_dict({**gemma2, key: value})
        assert err.value.field == f"base_model.{key}"

    gemma3 = tiny_config("gemma3_text", vocab_size=300, num_hidden_layers=7).to_dict()
    assert DecoderConfig.from_hf_dict(gemma3).local_rope_layers == (0, 2, 4, 6)
    older = {k: v for k, v in gemma3.items() if k != "layer_types"}  # every 6th layer global, as transformers
    assert DecoderConfig.from_hf_dict(older).local_rope_layers == (0, 1, 2, 3, 4, 6)
    for key, value in (("layer_types", ["sliding_attention"] * 3), ("use_bidirectional_attention", True)):
        with pytest.raises(InvalidArgument) as err:
            DecoderConfig.from_hf_dict({**gemma3, key: value})
        assert err.value.field == f"base_model.{key}"
    local = {**gemma3["rope_parameters"], "sliding_attention": {"rope_type": "linear", "factor": 2.0}}
    with pytest.raises(InvalidArgument) as err:
        DecoderConfig.from_hf_dict({**gemma3, "rope_parameters": local})
    assert err.value.field == "base_model.rope_parameters.sliding_attention.rope_type"
