"""Our multi-LoRA decoder vs transformers + PEFT, one adapter at a time, on tiny random models.

Tolerance: logits within 1e-4 (fp32); greedy tokens identical. Rows of one batch use different
adapters (base, rank 4 attention-only, rank 8 rsLoRA with MLP targets, rank/alpha patterns).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loraflow.artifact.graph_contract import LORA_TARGET_MODULES
from tests.compiler.helpers import decoder_with_adapters, random_prompts
from tests.support.chunked_reference import drive_decoder

LOGIT_TOL = 1e-4
NEW_TOKENS = 5


def _adapters(adapter_factory, arch: str):
    adapters = [
        ("attn4", adapter_factory(arch, "attn4", r=4, lora_alpha=8,
                                  target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), seed=1)),
        ("mlp8", adapter_factory(arch, "mlp8", r=8, lora_alpha=16, use_rslora=True,
                                 target_modules=("gate_proj", "up_proj", "down_proj", "q_proj"), seed=2)),
    ]
    if arch == "llama":
        adapters.append(("pattern", adapter_factory(arch, "pattern", r=4, lora_alpha=8,
                                                    target_modules=("q_proj", "v_proj"), seed=3,
                                                    rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 32})))
    return adapters


def _reference(model_dir, adapter_path):
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = base if adapter_path is None else PeftModel.from_pretrained(base, adapter_path)
    model.eval()
    base.generation_config.eos_token_id = None  # random models may emit eos; compare a fixed length
    return model


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "llama3rope"])
def test_mixed_adapter_batch_matches_peft(kind, parity_model, adapter_factory):
    model_dir = parity_model(kind)
    arch = "llama" if kind == "llama3rope" else kind
    # Adapter weights only need the right shapes, so the factory's adapters fit the variant bases too.
    adapters = _adapters(adapter_factory, arch)
    decoder, banks, graph = decoder_with_adapters(model_dir, adapters, LORA_TARGET_MODULES, slots=len(adapters) + 1)
    lora_ids = list(range(len(adapters) + 1))  # row 0 is the base model
    prompts = random_prompts(graph.vocab_size, [7, 4, 9, 5][: len(lora_ids)], seed=len(kind))
    # Our decoder: one mixed batch, chunked prefill (3 tokens per call), then greedy decode steps.
    _, ours, _ = drive_decoder(decoder, graph, banks, prompts, lora_ids, chunk=3, decode_steps=NEW_TOKENS,
                               ctx_len=32, full_batch=len(lora_ids) + 1, kv_slots=list(reversed(range(len(lora_ids)))))
    for row, slot in enumerate(lora_ids):
        ref = _reference(model_dir, None if slot == 0 else adapters[slot - 1][1])
        ids = torch.tensor([prompts[row]])
        with torch.no_grad():
            out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                               do_sample=False)
            ref_logits = ref(input_ids=ids).logits[0].numpy()
        assert out[0, ids.shape[1]:].tolist() == ours[row], f"row {row} (slot {slot}) greedy tokens differ"
        # Full-sequence logits of the same row through our module (all positions).
        seq = torch.tensor([prompts[row]])
        with torch.no_grad():
            pk, pv = decoder.empty_cache(1)
            our_logits, _, _ = decoder(seq, torch.arange(seq.shape[1]).view(1, -1), torch.tensor([[slot]]),
                                       torch.tensor([[0]]), pk, pv, all_logits=True)
        diff = np.abs(our_logits[0].numpy() - ref_logits).max()
        assert diff < LOGIT_TOL, f"row {row} (slot {slot}) logits differ by {diff}"


def test_chunked_prefill_and_decode_equal_one_full_forward(parity_model, adapter_factory):
    model_dir = parity_model("llama")
    adapters = _adapters(adapter_factory, "llama")[:2]
    decoder, banks, graph = decoder_with_adapters(model_dir, adapters, LORA_TARGET_MODULES)
    prompts = random_prompts(graph.vocab_size, [11, 6, 1], seed=7)
    lora_ids = [2, 0, 1]
    for chunk in (1, 4, 16):
        final, _, _ = drive_decoder(decoder, graph, banks, prompts, lora_ids, chunk=chunk, decode_steps=0,
                                    ctx_len=32, full_batch=4, kv_slots=[3, 0, 2])
        for row, prompt in enumerate(prompts):
            seq = torch.tensor([prompt])
            with torch.no_grad():
                pk, pv = decoder.empty_cache(1)
                full, _, _ = decoder(seq, torch.arange(len(prompt)).view(1, -1), torch.tensor([[lora_ids[row]]]),
                                     torch.tensor([[0]]), pk, pv)
            np.testing.assert_allclose(final[row], full[0, 0].numpy(), atol=1e-5,
                                       err_msg=f"chunk={chunk} row={row}")


def test_idle_and_padding_rows_stay_finite_and_do_not_disturb_others(parity_model):
    decoder, banks, graph = decoder_with_adapters(parity_model("llama"), [], ("q_proj",))
    ids = torch.tensor([[5, 6, 7], [9, 0, 0], [0, 0, 0]])
    pos = torch.tensor([[4, 5, 6], [2, -1, -1], [-1, -1, -1]])  # full row, padded row, idle row
    pk, pv = decoder.empty_cache(3, past_len=7)
    pk = [torch.randn_like(k) for k in pk]
    pv = [torch.randn_like(v) for v in pv]
    with torch.no_grad():
        logits, k, _ = decoder(ids, pos, torch.zeros(3, 1, dtype=torch.long), torch.tensor([[0], [1], [2]]), pk, pv)
        alone, _, _ = decoder(ids[:1], pos[:1], torch.zeros(1, 1, dtype=torch.long), torch.tensor([[0]]), pk, pv)
    assert torch.isfinite(logits).all() and all(torch.isfinite(t).all() for t in k)
    torch.testing.assert_close(logits[:1], alone, atol=1e-5, rtol=0)
    assert logits.shape == (3, 1, graph.vocab_size)
    assert k[0].shape == (3, 3, decoder.cfg.num_kv_heads, decoder.cfg.head_dim)


def test_unsupported_architecture_lists_supported_ones(tmp_path):
    import json

    from loraflow.errors import InvalidArgument
    from services.compiler.modeling import DecoderConfig

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "hidden_size": 8}))
    with pytest.raises(InvalidArgument) as err:
        DecoderConfig.from_model_dir(tmp_path)
    assert "'gpt2'" in str(err.value)
    for arch in ("llama", "mistral", "qwen2"):
        assert arch in str(err.value)
    assert err.value.field == "base_model.model_type"
