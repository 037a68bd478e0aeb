"""The fused graph (services/compiler/fused) run through the runtime's step driver.

* every fp32 row of a mixed batch gives PEFT's greedy tokens with that adapter alone, for Llama,
  Mistral, Qwen2 (q/k/v biases), a tied head (stored once: FusedMatMul over the embedding) and llama3 RoPE; chunked prefill; one request joining a
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

from loraflow import native as native_lora
from loraflow.artifact import graph_contract as gc
from loraflow.artifact.kv_cache import SharedKvCache
from loraflow.artifact.manifest import file_sha256
from loraflow.artifact.step_driver import FusedStepDriver, Row
from loraflow.errors import InvalidArgument
from services.compiler.fused.builder import FusedGraphOptions
from services.compiler.fused.export import export_fused
from services.compiler.fused.readback import ArtifactWeights
from services.compiler.fused.verify import feed_ranks, flat_bank_views, verify_fused_graph
from services.compiler.modeling.weights import ModuleWeights
from services.compiler.verify import VerificationFailed, decoder_reference, layerwise_reference
from tests.compiler.helpers import decoder_with_adapters, random_prompts
from tests.support.native import require_native

CTX = 48
NEW_TOKENS = 5


def _adapters(adapter_factory, arch: str):
    return [
        ("attn4", adapter_factory(arch, "attn4", r=4, lora_alpha=8,
                                  target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), seed=1)),
        ("mlp8", adapter_factory(arch, "mlp8", r=8, lora_alpha=16, use_rslora=True,
                                 target_modules=("gate_proj", "up_proj", "down_proj", "q_proj"), seed=2)),
    ]


KERNELS = ["onnx", "native"]  # the standard-operator graph and the LoraRows one (loraflow/native)


def _build(tmp_path, decoder, dtype="fp32", slots=3, kernel="onnx", **quant):
    """(graph, session over the graph of ``kernel``, the export)."""
    if kernel == "native":
        require_native()
    opts = FusedGraphOptions(dtype=dtype, ctx_len=CTX, num_slots=slots + 1, max_rank=8,
                             lora_modules=tuple(decoder.lora_modules), **quant)
    exported = export_fused(ModuleWeights(decoder), tmp_path, opts, native=kernel == "native")
    graph = exported.graph
    # The native graph adds nothing to the weights file: it reuses every initializer the first one wrote.
    assert exported.digests == {"model.onnx.data": file_sha256(tmp_path / "model.onnx.data")}
    so = ort.SessionOptions()
    if kernel == "native":
        native_lora.register(so)
    session = ort.InferenceSession(str(tmp_path / (graph.native_file if kernel == "native" else graph.file)), so,
                                   providers=["CPUExecutionProvider"])
    return graph, session, exported


def _readback_reference(tmp_path, exported, decoder, banks):
    """The weights the quantised graph holds, read back from its files, with the float decoder beside them."""
    readback = ArtifactWeights(decoder.cfg, tmp_path / exported.graph.file, exported.written)
    return layerwise_reference(readback, banks, decoder.lora_modules, float_source=ModuleWeights(decoder))


def _driver(graph, session, banks, *, slots: int) -> tuple[SharedKvCache, FusedStepDriver]:
    """A fresh shared KV cache of `slots` rows and the runtime's step driver over it."""
    cache = SharedKvCache(layers=graph.layers, slots=slots, kv_heads=graph.num_kv_heads, ctx_len=CTX,
                          head_dim=graph.head_dim)
    return cache, FusedStepDriver(session, cache, flat_bank_views(banks), vocab_size=graph.vocab_size,
                                  **feed_ranks(banks))


def _peft_tokens(model_dir, adapter_path, prompt):
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = base if adapter_path is None else PeftModel.from_pretrained(base, adapter_path)
    base.generation_config.eos_token_id = None  # random models may emit eos; compare a fixed length
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                    max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "llama3rope", "tied"])
def test_mixed_batch_through_the_step_driver_matches_peft(tmp_path, kind, kernel, parity_model, adapter_factory):
    model_dir = parity_model(kind)
    arch = "llama" if kind in ("llama3rope", "tied") else kind
    adapters = _adapters(adapter_factory, arch)
    decoder, banks, _ = decoder_with_adapters(model_dir, adapters, gc.LORA_TARGET_MODULES, slots=3)
    graph, session, _ = _build(tmp_path, decoder, kernel=kernel)
    prompts = random_prompts(graph.vocab_size, [7, 4, 9], seed=len(kind))
    lora_ids, kv_slots = [1, 0, 2], [3, 0, 1]  # slot 2 stays free: a dummy row in every decode call
    cache, driver = _driver(graph, session, banks, slots=4)
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
    graph, session, exported = _build(tmp_path, decoder, dtype, quant_block_size=32, quant_accuracy_level=0)
    model = onnx.load(str(tmp_path / graph.file), load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 * graph.layers + 1  # q|k|v, o, gate|up, down per layer; the head
    assert all(next(a.i for a in n.attribute if a.name == "bits") == bits for n in nbits)
    report = verify_fused_graph(session, _readback_reference(tmp_path, exported, decoder, banks), graph, banks,
                                ctx_len=CTX, occupied_slots=2, chunk=4, accuracy_level=0, quantized=True)
    assert report.relative_diff < 1e-4 and report.tokens_match
    # Quantisation moves logits against the float model, more at 4 bits than at 8.
    assert report.quant_relative_diff > report.relative_diff
    assert 0.0 <= report.quant_token_agreement <= 1.0


def test_int8_error_against_float_is_below_int4(tmp_path, parity_model, adapter_factory):
    decoder, banks, _ = decoder_with_adapters(parity_model("llama"), _adapters(adapter_factory, "llama"),
                                              gc.LORA_TARGET_MODULES, slots=3)
    errors = {}
    for dtype in ("int8", "int4"):
        graph, session, exported = _build(tmp_path / dtype, decoder, dtype, quant_accuracy_level=0)
        report = verify_fused_graph(session, _readback_reference(tmp_path / dtype, exported, decoder, banks), graph,
                                    banks, ctx_len=CTX, occupied_slots=2, chunk=4, quantized=True)
        errors[dtype] = report.quant_relative_diff
    assert errors["int8"] < errors["int4"], errors


def test_int8_activations_stay_within_their_tolerance(tmp_path, parity_model, adapter_factory):
    """accuracy_level 4 (the default: ONNX Runtime's fast CPU kernels) rounds activations to int8 per block,
    so the graph is no longer exact against its dequantised weights; it is held to TOLERANCE[4]."""
    from services.compiler.fused.verify import TOLERANCE

    decoder, banks, _ = decoder_with_adapters(parity_model("llama"), _adapters(adapter_factory, "llama"),
                                              gc.LORA_TARGET_MODULES, slots=3)
    graph, session, exported = _build(tmp_path, decoder, "int4")
    model = onnx.load(str(tmp_path / graph.file), load_external_data=False)
    levels = {next(a.i for a in n.attribute if a.name == "accuracy_level")
              for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert levels == {4}
    report = verify_fused_graph(session, _readback_reference(tmp_path, exported, decoder, banks), graph, banks,
                                ctx_len=CTX, occupied_slots=2, chunk=4, accuracy_level=4, quantized=True)
    assert 1e-4 < report.relative_diff < report.tolerance == TOLERANCE[4]


def test_the_float_pass_apart_gives_the_one_pass_reference(tmp_path, parity_model, adapter_factory):
    """An int4 compile measures the float model (float64 and float32 over the error rows) in a pass of its own
    beside the export (verify.float_reference); joined to the checked variants' pass it is the one-pass reference,
    value for value, and the checked pass's hook sees only the read-back weights."""
    from services.compiler.verify import float_reference, scenario_rows

    decoder, banks, _ = decoder_with_adapters(parity_model("llama"), _adapters(adapter_factory, "llama"),
                                              gc.LORA_TARGET_MODULES, slots=3)
    graph, _, exported = _build(tmp_path, decoder, "int4", quant_block_size=32)
    readback = ArtifactWeights(decoder.cfg, tmp_path / exported.graph.file, exported.written)
    plain = ModuleWeights(decoder)
    rows = scenario_rows(vocab_size=graph.vocab_size, ctx_len=CTX, occupied_slots=2, chunk=4)
    seen = set()

    def hook(loaded):
        seen.update(loaded)

    one = layerwise_reference(readback, banks, decoder.lora_modules, float_source=plain, activation_block=32,
                              measure_on_error_rows=True)(rows)
    apart = layerwise_reference(readback, banks, decoder.lora_modules, float_source=plain, activation_block=32,
                                measure_on_error_rows=True, on_layer=hook,
                                float_pass=float_reference(plain, banks, decoder.lora_modules))(rows)
    assert seen == {readback}
    assert one.error > 0 and one.rounding_error > 0
    assert (apart.error, apart.rounding_error, apart.max_activation) == (one.error, one.rounding_error,
                                                                         one.max_activation)
    for got, want in zip(apart.logits, one.logits, strict=True):
        np.testing.assert_array_equal(got, want)
    assert [f is None for f in apart.float_logits] == [f is None for f in one.float_logits]
    for got, want in zip(apart.float_logits, one.float_logits, strict=True):
        if want is not None:
            np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="needs float_source"):
        layerwise_reference(readback, banks, decoder.lora_modules, float_pass=float_reference(plain, banks, ()))


def test_verification_fails_with_the_measured_difference(tmp_path, tiny_model_factory, adapter_factory):
    adapters = _adapters(adapter_factory, "llama")[:1]
    decoder, banks, _ = decoder_with_adapters(tiny_model_factory("llama"), adapters, gc.LORA_TARGET_MODULES)
    graph, session, _ = _build(tmp_path, decoder)
    ok = verify_fused_graph(session, decoder_reference(decoder, banks), graph, banks, ctx_len=CTX, occupied_slots=1,
                            chunk=4)
    assert ok.relative_diff < 1e-4 and ok.tokens_match and ok.calls >= 8
    other, _, _ = decoder_with_adapters(tiny_model_factory("llama", seed=1), adapters, gc.LORA_TARGET_MODULES)
    with pytest.raises(VerificationFailed, match=r"max abs diff \d") as err:
        verify_fused_graph(session, decoder_reference(other, banks), graph, banks, ctx_len=CTX, occupied_slots=1,
                           chunk=4)
    assert err.value.max_abs_diff > 1e-2


def test_the_past_is_never_copied(tmp_path, tiny_llama):
    decoder, _, _ = decoder_with_adapters(tiny_llama, [], gc.LORA_TARGET_MODULES)
    graph, _, _ = _build(tmp_path, decoder)
    model = onnx.load(str(tmp_path / graph.file), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GroupQueryAttention") == graph.layers
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * graph.layers
    assert "Transpose" not in ops
    # The only Concat joins a layer's q, k and v LoRA deltas ([B, S, q+2kv]), never the cache.
    assert all("/lora/" in n.name for n in model.graph.node if n.op_type == "Concat")
    for i in range(graph.layers):
        for name in (gc.past_key(i), gc.past_value(i)):
            users = [n.op_type for n in model.graph.node if name in n.input]
            assert users == ["GroupQueryAttention"], (name, users)
    assert [o.name for o in model.graph.output][0] == gc.LOGITS
    assert graph.kv_layout == gc.KV_LAYOUT_SHARED


def test_driver_writes_the_cache_in_place_and_refuses_bad_rows(tmp_path, tiny_llama):
    decoder, banks, _ = decoder_with_adapters(tiny_llama, [], gc.LORA_TARGET_MODULES)
    graph, session, _ = _build(tmp_path, decoder)
    cache, driver = _driver(graph, session, banks, slots=3)
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


def test_prefill_of_adjacent_rows_is_one_call_and_equals_one_row_per_call(tmp_path, tiny_llama, adapter_factory):
    """Chunks of rows in adjacent slots share a call, the shorter right-padded: the logits at each row's last
    real token, the cache up to its real length, and the next decode step equal one call per row."""
    adapters = _adapters(adapter_factory, "llama")
    decoder, banks, _ = decoder_with_adapters(tiny_llama, adapters, gc.LORA_TARGET_MODULES, slots=3)
    graph, session, _ = _build(tmp_path, decoder)
    prompts = random_prompts(graph.vocab_size, [5, 2, 7, 3], seed=3)
    rows = [Row(slot, lora, tuple(p), 0) for slot, lora, p in zip([1, 2, 3, 0], [1, 2, 0, 1], prompts, strict=True)]
    results = {}
    for mode in ("alone", "together"):
        cache, driver = _driver(graph, session, banks, slots=4)
        assert driver.batched_prefill
        if mode == "alone":
            logits = np.stack([driver.prefill(r).copy() for r in rows])  # each a view of one buffer
        else:
            logits = driver.prefill_rows(rows)
        calls = driver.calls
        step = driver.decode([Row(r.slot, r.lora_id, (7,), len(r.token_ids)) for r in rows]).copy()
        results[mode] = (logits, calls, cache, step)
    alone, together = results["alone"], results["together"]
    assert alone[1] == 4 and together[1] == 1  # slots 0..3 are adjacent: one call
    np.testing.assert_allclose(together[0], alone[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(together[3], alone[3], rtol=0, atol=1e-5)  # the padding is never attended
    for r in rows:
        n = len(r.token_ids) + 1  # prompt and the decoded token
        for kind in ("k", "v"):
            np.testing.assert_allclose(getattr(together[2], kind)[:, r.slot, :, :n],
                                       getattr(alone[2], kind)[:, r.slot, :, :n], rtol=0, atol=1e-5)
    assert together[2].lengths.tolist() == alone[2].lengths.tolist() == [4, 6, 3, 8]


def test_prefill_groups_by_call_kind(tmp_path, tiny_llama):
    decoder, banks, _ = decoder_with_adapters(tiny_llama, [], gc.LORA_TARGET_MODULES)
    graph, session, _ = _build(tmp_path, decoder)
    cache, driver = _driver(graph, session, banks, slots=8)
    rows = [Row(4, 0, (1, 2), 0), Row(0, 0, (1, 2, 3), 0), Row(1, 0, (4,) * 2, 0), Row(5, 0, (5,) * 4, 0),
            Row(2, 0, (6,) * 6, 0), Row(3, 0, (7,) * 2, 5)]
    # 0, 1, 2 adjacent first chunks; 3 continues a prompt (ONNX Runtime takes a past only with B = 1) and is
    # alone, so it goes by itself and 4, 5 form their own group.
    assert driver._prefill_groups(rows) == [("padded", [1, 2, 4]), ("one", [5]), ("padded", [0, 3])]
    # Continuing chunks of adjacent rows: as decode calls when at most half as long as the run has rows.
    cont = [Row(s, 0, (1,) * n, 9) for s, n in zip(range(5), [2, 1, 2, 2, 1], strict=True)]
    assert driver._prefill_groups(cont) == [("stepped", [0, 1, 2, 3, 4])]
    assert driver._prefill_groups(cont[:3]) == [("one", [0]), ("one", [1]), ("one", [2])]  # 2 * 2 > 3
    with pytest.raises(InvalidArgument, match="share a KV slot"):
        driver.prefill_rows([Row(1, 0, (1, 2), 0), Row(1, 0, (3, 4), 0)])


def test_continuing_chunks_fed_as_decode_calls_equal_one_call_per_row(tmp_path, tiny_llama, adapter_factory):
    adapters = _adapters(adapter_factory, "llama")
    decoder, banks, _ = decoder_with_adapters(tiny_llama, adapters, gc.LORA_TARGET_MODULES, slots=3)
    graph, session, _ = _build(tmp_path, decoder)
    prompts = random_prompts(graph.vocab_size, [6, 5, 6, 6, 5], seed=4)
    lora = [1, 2, 0, 1, 2]
    results = {}
    for mode in ("alone", "stepped"):
        cache, driver = _driver(graph, session, banks, slots=5)
        driver.prefill_rows([Row(s, lora[s], tuple(p[:4]), 0) for s, p in enumerate(prompts)])
        rest = [Row(s, lora[s], tuple(p[4:]), 4) for s, p in enumerate(prompts)]  # 2, 1, 2, 2, 1 tokens
        calls = driver.calls
        if mode == "alone":
            logits = np.stack([driver.prefill(r).copy() for r in rest])
        else:
            assert driver._prefill_groups(rest) == [("stepped", [0, 1, 2, 3, 4])]
            logits = driver.prefill_rows(rest)
        results[mode] = (logits, driver.calls - calls, cache)
    np.testing.assert_allclose(results["stepped"][0], results["alone"][0], rtol=0, atol=1e-5)
    assert results["alone"][1] == 5 and results["stepped"][1] == 2  # 2 decode calls for 2-token chunks
    for s, p in enumerate(prompts):
        np.testing.assert_allclose(results["stepped"][2].k[:, s, :, :len(p)], results["alone"][2].k[:, s, :, :len(p)],
                                   rtol=0, atol=1e-5)
    assert results["stepped"][2].lengths.tolist() == [len(p) for p in prompts]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("modules,packed", [(("q_proj", "v_proj", "o_proj"), False), (("gate_proj",), True),
                                            (("q_proj", "k_proj", "v_proj"), True)])
def test_qkv_wiring_for_every_target_set(tmp_path, tiny_llama, adapter_factory, modules, packed, kernel):
    """q, k and v all adapted (deltas joined into the packed q|k|v) or none (packed as is): GroupQueryAttention
    takes the packed projection; some adapted: split, each adapted one its own delta. With LoraRows every
    delta goes into its columns of the packed q|k|v, which is always packed. Either way the graph equals the
    PyTorch decoder."""
    adapter = adapter_factory("llama", "sub-" + "-".join(modules), r=4, lora_alpha=8, target_modules=modules, seed=5)
    decoder, banks, _ = decoder_with_adapters(tiny_llama, [("a", adapter)], modules, slots=2)
    graph, session, _ = _build(tmp_path, decoder, slots=2, kernel=kernel)
    packed = packed or kernel == "native"
    model = onnx.load(str(tmp_path / (graph.native_file if kernel == "native" else graph.file)),
                      load_external_data=False)
    lora_rows = [n for n in model.graph.node if n.op_type == "LoraRows"]
    assert len(lora_rows) == (len(modules) * graph.layers if kernel == "native" else 0)
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert all((list(n.input[1:3]) == ["", ""]) == packed for n in gqa)
    assert ("Split" in [n.op_type for n in model.graph.node if "/attn/" in n.name]) == (not packed)
    report = verify_fused_graph(session, decoder_reference(decoder, banks), graph, banks, ctx_len=CTX,
                                occupied_slots=1, chunk=4)
    assert report.relative_diff < 1e-4 and report.tokens_match


def test_the_native_graph_shares_the_weights_file_byte_for_byte(tmp_path, tiny_llama, adapter_factory):
    require_native()
    adapter = adapter_factory("llama", "share", r=4, lora_alpha=8, target_modules=gc.LORA_TARGET_MODULES, seed=7)
    decoder, _, _ = decoder_with_adapters(tiny_llama, [("a", adapter)], gc.LORA_TARGET_MODULES, slots=2)
    opts = FusedGraphOptions(dtype="int4", ctx_len=CTX, num_slots=3, max_rank=8,
                             lora_modules=tuple(decoder.lora_modules))
    alone = export_fused(ModuleWeights(decoder), tmp_path / "alone", opts, native=False)
    both = export_fused(ModuleWeights(decoder), tmp_path / "both", opts, native=True)
    assert not alone.graph.native_file and both.graph.native_file == "model.native.onnx"
    assert both.digests == alone.digests  # the second build quantised and wrote nothing more
    native = onnx.load(str(tmp_path / "both" / both.graph.native_file), load_external_data=False)
    assert not [n for n in native.graph.node if n.op_type == "Gather" and "/lora" in n.name]
