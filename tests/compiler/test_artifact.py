"""build_artifact end to end on a tiny model; the artifact runs in a bare onnxruntime session."""

from __future__ import annotations

import json
import threading

import onnx
import onnxruntime as ort
import pytest

from loraflow.artifact import graph_contract as gc
from loraflow.artifact import lora_bank
from loraflow.artifact.manifest import Manifest, file_sha256
from services.compiler.artifact import STAGES, base_fingerprint, build_artifact, plan_artifact
from services.compiler.fused.verify import verify_fused_graph
from services.compiler.modeling import load_decoder
from services.compiler.options import CompileOptions
from services.compiler.verify import decoder_reference


@pytest.fixture(scope="module")
def two_adapters(adapter_factory):
    return [("attn", adapter_factory("llama", "attn4", r=4, lora_alpha=8,
                                     target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), seed=1)),
            ("mlp", adapter_factory("llama", "mlp8", r=8, lora_alpha=16, use_rslora=True,
                                    target_modules=("gate_proj", "up_proj", "down_proj", "q_proj"), seed=2))]


def test_build_artifact_runs_in_bare_onnxruntime(tmp_path, tiny_llama, two_adapters):
    events = []
    out = tmp_path / "art"
    manifest = build_artifact(tiny_llama, two_adapters, CompileOptions(prefill_seq_len=8, ctx_len=64), out,
                              progress=lambda stage, frac, msg: events.append((stage, frac, msg)))
    assert [e[0] for e in events if e[0] != "load" or e[1] > 0] == list(STAGES)
    assert [e[1] for e in events] == sorted(e[1] for e in events) and events[-1][1] == 1.0
    assert Manifest.load(out) == manifest
    assert manifest.options["adapter_slots"] == 4 and manifest.options["max_rank"] == 8
    assert [(a.slot, a.name, a.r) for a in manifest.adapters] == [(1, "attn", 4), (2, "mlp", 8)]
    assert set(manifest.graph.lora_modules) == set(gc.LORA_TARGET_MODULES)  # union of both adapters' targets
    assert manifest.generation_config["eos_token_ids"] == [2] and "im_start" in manifest.chat_template
    verify = manifest.extra["verify"]
    assert verify["max_abs_diff"] < 1e-4
    assert verify["seconds"]["reference_ahead"] > 0  # fp32: the reference ran beside the export
    if manifest.graph.native_file:  # the second graph: the scenario's first part, held to the first range by range
        assert 0 < verify["native"]["calls"] < verify["calls"]
        assert verify["native"]["range_relative_diff"] <= verify["tolerance"]
    for f in manifest.files:
        assert file_sha256(out / f.path) == f.sha256 and (out / f.path).stat().st_size == f.size
    assert {"model.onnx", "model.onnx.data", "tokenizer/tokenizer.json", "generation_config.json",
            "adapters/mlp/adapter_model.safetensors"} <= {f.path for f in manifest.files}

    # The runtime's view: bare session, banks rebuilt from the artifact's own adapter dirs.
    session = ort.InferenceSession(str(out / manifest.graph.file), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [t.name for t in manifest.graph.inputs]
    assert [o.name for o in session.get_outputs()] == [t.name for t in manifest.graph.outputs]
    spec = lora_bank.BankSpec.from_manifest(manifest)
    banks_a, banks_b = lora_bank.empty_banks(spec)
    for entry in manifest.adapters:
        adapter = lora_bank.read_adapter(entry.name, out / entry.path)
        assert adapter.digest == entry.digest
        lora_bank.write_slot(banks_a, banks_b, entry.slot, adapter, spec)
    feeds = {**{gc.lora_a(m): banks_a[m] for m in spec.modules}, **{gc.lora_b(m): banks_b[m] for m in spec.modules}}
    decoder = load_decoder(tiny_llama, tuple(spec.modules))
    decoder.set_banks(banks_a, banks_b)
    assert manifest.graph.kv_layout == gc.KV_LAYOUT_SHARED
    # The step driver the runtime uses, on the bare session, against the PyTorch decoder.
    report = verify_fused_graph(session, decoder_reference(decoder, feeds), manifest.graph, feeds, ctx_len=64,
                                occupied_slots=2, chunk=4, decode_steps=4, seed=3)
    assert report.relative_diff < 1e-4 and report.tokens_match and report.calls >= 10


@pytest.mark.parametrize("dtype,bits", [("int8", 8), ("int4", 4)])
def test_quantized_dtypes_quantize_base_weights_only(tmp_path, tiny_llama, two_adapters, dtype, bits):
    out = tmp_path / dtype
    manifest = build_artifact(tiny_llama, two_adapters[:1], CompileOptions(dtype=dtype, prefill_seq_len=8,
                                                                           ctx_len=64, quant_block_size=16), out)
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    # Per layer: q|k|v, o, gate|up, down; plus the lm_head.
    assert len(nbits) == 4 * manifest.graph.layers + 1
    for node in nbits:
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs["bits"] == bits and attrs["block_size"] == 16 and attrs["accuracy_level"] == 4
    # No float base weight is left in a MatMul: only the per-row LoRA products (activation x gathered bank).
    inits = {i.name for i in model.graph.initializer}
    assert not [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]
    bank_inputs = [i for i in model.graph.input if i.name.startswith(("lora_a.", "lora_b."))]
    assert bank_inputs and all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in bank_inputs)
    verify = manifest.extra["verify"]
    # The wiring is checked against the dequantised weights (int8 activations: within 0.1); the error
    # against the float model is measured and recorded.
    assert manifest.graph.dtype == "float32" and verify["relative_diff"] < verify["tolerance"] == 0.1
    assert 0 < verify["quant_relative_diff_vs_float"] and 0 <= verify["quant_token_agreement_vs_float"] <= 1
    assert verify["seconds"]["reference_ahead"] > 0  # the float model's variants ran beside the export
    assert manifest.options["quant_block_size"] == 16 and manifest.options["quant_accuracy_level"] == 4


def test_cancel_between_stages_leaves_no_manifest(tmp_path, tiny_llama, two_adapters):
    seen = []

    class Cancelled(Exception):
        pass

    def progress(stage, fraction, message):
        seen.append(stage)

    def check():
        if "export" in seen:
            raise Cancelled

    with pytest.raises(Cancelled):
        build_artifact(tiny_llama, two_adapters, CompileOptions(ctx_len=64), tmp_path / "c", progress=progress, check=check)
    assert "verify" not in seen and not (tmp_path / "c" / "manifest.json").exists()
    # The reference started beside the export was stopped with it.
    assert not [t for t in threading.enumerate() if t.name == "reference-ahead"]


def test_plan_is_deterministic_and_rejects_bad_sets(tmp_path, tiny_llama, two_adapters):
    from loraflow.errors import FailedPrecondition, InvalidArgument

    a = plan_artifact(tiny_llama, two_adapters, CompileOptions(ctx_len=64))
    assert plan_artifact(tiny_llama, two_adapters, CompileOptions(ctx_len=64)).artifact_id == a.artifact_id
    assert a.base_fingerprint == base_fingerprint(tiny_llama)
    assert plan_artifact(tiny_llama, two_adapters[::-1], CompileOptions(ctx_len=64)).artifact_id != a.artifact_id
    assert plan_artifact(tiny_llama, two_adapters, CompileOptions(ctx_len=128)).artifact_id != a.artifact_id
    with pytest.raises(FailedPrecondition, match="adapter 'mlp': r=8 exceeds the artifact's max_rank=4"):
        plan_artifact(tiny_llama, two_adapters, CompileOptions(max_rank=4, ctx_len=64))
    with pytest.raises(FailedPrecondition, match=r"adapter 'attn': target_modules \['k_proj', 'v_proj', 'o_proj'\]"):
        plan_artifact(tiny_llama, two_adapters, CompileOptions(target_modules=("q_proj",), ctx_len=64))
    with pytest.raises(InvalidArgument, match="listed twice"):
        plan_artifact(tiny_llama, [two_adapters[0], two_adapters[0]], CompileOptions(ctx_len=64))
    with pytest.raises(InvalidArgument, match="max_position_embeddings=256"):
        plan_artifact(tiny_llama, [], CompileOptions(ctx_len=1024))
    cfg = json.loads((tiny_llama / "config.json").read_text())
    assert cfg["model_type"] == "llama"


def test_verification_fails_with_the_measured_difference(tmp_path, tiny_model_factory, two_adapters):
    from services.compiler.export import BankShape, export_onnxruntime
    from services.compiler.verify import VerificationFailed, verify_graph
    from tests.compiler.helpers import decoder_with_adapters

    modules = ("q_proj", "k_proj", "v_proj", "o_proj")
    decoder, banks, _ = decoder_with_adapters(tiny_model_factory("llama"), two_adapters[:1], modules)
    graph, _ = export_onnxruntime(decoder, tmp_path, banks=BankShape(3, 8))
    session = ort.InferenceSession(str(tmp_path / graph.file), providers=["CPUExecutionProvider"])
    ok = verify_graph(session, decoder_reference(decoder, banks), graph, banks, dtype="fp32", occupied_slots=1,
                      chunk=4, ctx_len=32)
    assert ok.max_abs_diff < 1e-4 and ok.tokens_match
    other, _, _ = decoder_with_adapters(tiny_model_factory("llama", seed=1), two_adapters[:1], modules)
    with pytest.raises(VerificationFailed, match=r"max abs diff \d") as err:
        verify_graph(session, decoder_reference(other, banks), graph, banks, dtype="fp32", occupied_slots=1, chunk=4,
                     ctx_len=32)
    assert err.value.max_abs_diff > 1e-2 and err.value.metadata["max_abs_diff"]


def test_decode_graph_is_lean(tmp_path, tiny_llama):
    """The cache is only touched by one row gather per tensor (no copy of all F slots), and shape
    plumbing does not grow per layer."""
    from services.compiler.export import BankShape, export_onnxruntime

    decoder = load_decoder(tiny_llama, gc.LORA_TARGET_MODULES)
    graph, _ = export_onnxruntime(decoder, tmp_path, banks=BankShape(3, 8))
    model = onnx.load(str(tmp_path / graph.file), load_external_data=False)
    for i in range(graph.layers):
        for name in (gc.past_key(i), gc.past_value(i)):
            users = [n for n in model.graph.node if name in n.input and n.op_type != "Shape"]  # Shape is O(1)
            assert [n.op_type for n in users] == ["Gather"], (name, [n.op_type for n in users])
            assert next(a.i for a in users[0].attribute if a.name == "axis") == 1
    shape_ops = sum(n.op_type == "Shape" for n in model.graph.node)
    assert shape_ops <= 3 + graph.layers, shape_ops
    # Banks are read through one gather per module and layer: O(rows), never the whole bank.
    for m in gc.LORA_TARGET_MODULES:
        users = [n.op_type for n in model.graph.node if gc.lora_a(m) in n.input]
        assert users == ["Reshape"], users


def test_fp16_artifact_has_half_inputs_and_verifies(tmp_path, tiny_llama, two_adapters):
    manifest = build_artifact(tiny_llama, two_adapters[:1], CompileOptions(dtype="fp16", prefill_seq_len=8,
                                                                           ctx_len=64), tmp_path / "fp16")
    assert manifest.graph.dtype == "float16"
    assert {t.dtype for t in manifest.graph.inputs if t.name.startswith(("past_", "lora_a.", "lora_b."))} == {
        "float16"}
    session = ort.InferenceSession(str(tmp_path / "fp16" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert {i.type for i in session.get_inputs() if i.name.startswith("past_")} == {"tensor(float16)"}
    assert manifest.extra["verify"]["relative_diff"] < 3e-2
