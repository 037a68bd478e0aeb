"""The fused graph (services/compiler/fused) run through the runtime's step driver.

* every fp32 row of a mixed batch gives PEFT's greedy tokens with that adapter alone, for Llama,
  Mistral, Qwen2 (q/k/v biases, tied head) and llama3 RoPE; chunked prefill; one request joining a
  running batch; a dummy row inside the decode slot range;
* int4/int8: MatMulNBits for every base projection, the wiring exact against the dequantised weights;
* verification fails, with the measured difference, on a graph that does not match its reference;
* the graph holds no copy of the past: each layer's cache goes into GroupQueryAttention only.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loraflow import graph_contract as gc
from loraflow.artifact.kv_cache import SharedKvCache
from loraflow.artifact.step_driver import FusedStepDriver, Row
from loraflow.errors import InvalidArgument
from loraflow.manifest import file_sha256
from services.compiler.fused.builder import FusedGraphOptions, dequantized_decoder
from services.compiler.fused.export import export_fused
from services.compiler.fused.verify import flat_bank_views, verify_fused_graph
from services.compiler.verify import VerificationFailed
from tests.compiler.helpers import decoder_with_adapters, random_prompts

CTX = 48
NEW_TOKENS = 5


def _adapters(adapter_factory, arch: str):
    return [
        ("attn4", adapter_factory(arch, "attn4", r=4, lora_alpha=8,
                                  target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), seed=1)),
        ("mlp8", adapter_factory(arch, "mlp8", r=8, lora_alpha=16, use_rslora=True,
                                 target_modules=("gate_proj", "up_proj", "down_proj", "q_proj"), seed=2)),
    ]


def _build(tmp_path, decoder, dtype="fp32", slots=3, **quant):
    opts = FusedGraphOptions(dtype=dtype, ctx_len=CTX, num_slots=slots + 1, max_rank=8,
                             lora_modules=tuple(decoder.lora_modules), **quant)
    exported = export_fused(decoder, tmp_path, opts)
    graph, dequantized = exported.graph, exported.dequantized
    assert exported.digests == {"model.onnx.data": file_sha256(tmp_path / "model.onnx.data")}
    session = ort.InferenceSession(str(tmp_path / graph.file), providers=["CPUExecutionProvider"])
    return graph, session, dequantized


def _peft_tokens(model_dir, adapter_path, prompt):
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = base if adapter_path is None else PeftModel.from_pretrained(base, adapter_path)
    base.generation_config.eos_token_id = None  # random models may emit eos; compare a fixed length
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "llama3rope"])
def test_mixed_batch_through_the_step_driver_matches_peft(tmp_path, kind, parity_model, adapter_factory):
    model_dir = parity_model(kind)
    arch = "llama" if kind == "llama3rope" else kind
    adapters = _adapters(adapter_factory, arch)
    decoder, banks, _ = decoder_with_adapters(model_dir, adapters, gc.LORA_TARGET_MODULES, slots=3)
    graph, session, _ = _build(tmp_path, decoder)
    prompts = random_prompts(graph.vocab_size, [7, 4, 9], seed=len(kind))
    lora_ids, kv_slots = [1, 0, 2], [3, 0, 1]  # slot 2 stays free: a dummy row in every decode call
    cache = SharedKvCache(layers=graph.layers, slots=4, kv_heads=graph.num_kv_heads, ctx_len=CTX,
                          head_dim=graph.head_dim)
    driver = FusedStepDriver(session, cache, flat_bank_views(banks), vocab_size=graph.vocab_size)
    tokens: list[list[int]] = [[], [], []]
    lengths = [0, 0, 0]

    def prefill(b):
        for start in range(0, len(prompts[b]), 3):  # chunks of 3 tokens
            logits = driver.prefill(Row(kv_slots[b], lora_ids[b], tuple(prompts[b][start:start + 3]), start))
        lengths[b] = len(prompts[b])
        tokens[b].append(int(np.argmax(logits)))

    def decode(rows):
        step = [Row(kv_slots[b], lora_ids[b], (tokens[b][-1],), lengths[b]) for b in rows]
        logits = driver.decode(step)
        for j, b in enumerate(rows):
            lengths[b] += 1
            tokens[b].append(int(np.argmax(logits[j])))

    prefill(0)
    prefill(1)
    decode([0, 1])
    decode([0, 1])
    prefill(2)  # joins the running batch after two decode steps
    while any(len(t) < NEW_TOKENS for t in tokens):
        decode([b for b in range(3) if len(tokens[b]) < NEW_TOKENS])
    for b in range(3):
        adapter = None if lora_ids[b] == 0 else adapters[lora_ids[b] - 1][1]
        assert tokens[b] == _peft_tokens(model_dir, adapter, prompts[b]), f"row {b} (slot {lora_ids[b]})"


@pytest.mark.parametrize("dtype,bits", [("int4", 4), ("int8", 8)])
def test_quantized_graph_is_exact_against_its_dequantized_weights(tmp_path, dtype, bits, parity_model,
                                                                 adapter_factory):
    decoder, banks, _ = decoder_with_adapters(parity_model("qwen2"), _adapters(adapter_factory, "qwen2"),
                                              gc.LORA_TARGET_MODULES, slots=3)
    graph, session, dequantized = _build(tmp_path, decoder, dtype, quant_block_size=32, quant_accuracy_level=0)
    model = onnx.load(str(tmp_path / graph.file), load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 * graph.layers + 1  # q|k|v, o, gate|up, down per layer; the (tied) head
    assert all(next(a.i for a in n.attribute if a.name == "bits") == bits for n in nbits)
    reference = dequantized_decoder(decoder, dequantized)
    report = verify_fused_graph(session, reference, graph, banks, ctx_len=CTX, occupied_slots=2, chunk=4,
                                accuracy_level=0, float_decoder=decoder)
    assert report.relative_diff < 1e-4 and report.tokens_match
    # Quantisation moves logits against the float model, more at 4 bits than at 8.
    assert report.quant_relative_diff > report.relative_diff
    assert 0.0 <= report.quant_token_agreement <= 1.0


def test_int8_error_against_float_is_below_int4(tmp_path, parity_model, adapter_factory):
    decoder, banks, _ = decoder_with_adapters(parity_model("llama"), _adapters(adapter_factory, "llama"),
                                              gc.LORA_TARGET_MODULES, slots=3)
    errors = {}
    for dtype in ("int8", "int4"):
        graph, session, dequantized = _build(tmp_path / dtype, decoder, dtype, quant_accuracy_level=0)
        report = verify_fused_graph(session, dequantized_decoder(decoder, dequantized), graph, banks, ctx_len=CTX,
                                    occupied_slots=2, chunk=4, float_decoder=decoder)
        errors[dtype] = report.quant_relative_diff
    assert errors["int8"] < errors["int4"], errors


def test_int8_activations_stay_within_their_tolerance(tmp_path, parity_model, adapter_factory):
    """accuracy_level 4 (the default: ONNX Runtime's fast CPU kernels) rounds activations to int8 per block,
    so the graph is no longer exact against its dequantised weights; it is held to TOLERANCE[4]."""
    from services.compiler.fused.verify import TOLERANCE

    decoder, banks, _ = decoder_with_adapters(parity_model("llama"), _adapters(adapter_factory, "llama"),
                                              gc.LORA_TARGET_MODULES, slots=3)
    graph, session, dequantized = _build(tmp_path, decoder, "int4")
    model = onnx.load(str(tmp_path / graph.file), load_external_data=False)
    levels = {next(a.i for a in n.attribute if a.name == "accuracy_level")
              for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert levels == {4}
    report = verify_fused_graph(session, dequantized_decoder(decoder, dequantized), graph, banks, ctx_len=CTX,
                                occupied_slots=2, chunk=4, accuracy_level=4, float_decoder=decoder)
    assert 1e-4 < report.relative_diff < report.tolerance == TOLERANCE[4]


def test_verification_fails_with_the_measured_difference(tmp_path, tiny_model_factory, adapter_factory):
    adapters = _adapters(adapter_factory, "llama")[:1]
    decoder, banks, _ = decoder_with_adapters(tiny_model_factory("llama"), adapters, gc.LORA_TARGET_MODULES)
    graph, session, _ = _build(tmp_path, decoder)
    ok = verify_fused_graph(session, decoder, graph, banks, ctx_len=CTX, occupied_slots=1, chunk=4)
    assert ok.relative_diff < 1e-4 and ok.tokens_match and ok.calls >= 8
    other, _, _ = decoder_with_adapters(tiny_model_factory("llama", seed=1), adapters, gc.LORA_TARGET_MODULES)
    with pytest.raises(VerificationFailed, match=r"max abs diff \d") as err:
        verify_fused_graph(session, other, graph, banks, ctx_len=CTX, occupied_slots=1, chunk=4)
    assert err.value.max_abs_diff > 1e-2


def test_the_past_is_never_copied(tmp_path, tiny_llama):
    decoder, _, _ = decoder_with_adapters(tiny_llama, [], gc.LORA_TARGET_MODULES)
    graph, _, _ = _build(tmp_path, decoder)
    model = onnx.load(str(tmp_path / graph.file), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GroupQueryAttention") == graph.layers
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * graph.layers
    assert "Concat" not in ops and "Transpose" not in ops
    for i in range(graph.layers):
        for name in (gc.past_key(i), gc.past_value(i)):
            users = [n.op_type for n in model.graph.node if name in n.input]
            assert users == ["GroupQueryAttention"], (name, users)
    assert [o.name for o in model.graph.output][0] == gc.LOGITS
    assert graph.kv_layout == gc.KV_LAYOUT_SHARED


def test_driver_writes_the_cache_in_place_and_refuses_bad_rows(tmp_path, tiny_llama):
    decoder, banks, _ = decoder_with_adapters(tiny_llama, [], gc.LORA_TARGET_MODULES)
    graph, session, _ = _build(tmp_path, decoder)
    cache = SharedKvCache(layers=graph.layers, slots=3, kv_heads=graph.num_kv_heads, ctx_len=CTX,
                          head_dim=graph.head_dim)
    driver = FusedStepDriver(session, cache, flat_bank_views(banks), vocab_size=graph.vocab_size)
    driver.prefill(Row(1, 0, (5, 6, 7), 0))
    assert np.abs(cache.k[:, 1, :, :3]).min(initial=1.0) >= 0 and np.abs(cache.k[:, 1, :, :3]).max() > 0
    assert not cache.k[:, 0].any() and not cache.k[:, 2].any() and not cache.k[:, 1, :, 3:].any()
    assert cache.lengths.tolist() == [0, 3, 0]
    with pytest.raises(InvalidArgument, match="share a KV slot"):
        driver.decode([Row(1, 0, (1,), 3), Row(1, 0, (2,), 3)])
    with pytest.raises(InvalidArgument, match="do not fit ctx_len"):
        driver.prefill(Row(0, 0, tuple(range(CTX + 1)), 0))
    with pytest.raises(InvalidArgument, match="outside"):
        driver.decode([Row(3, 0, (1,), 0)])
    cache.reset(1)
    assert not cache.k[:, 1].any() and cache.lengths[1] == 0
