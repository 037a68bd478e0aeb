"""Tiny random Llama-family checkpoints with a real (byte-level BPE) tokenizer.

Nothing comes from a hub: the model is random from a config and the tokenizer is trained on
a few lines of text, so every suite can build the same checkpoint in a second.
"""

from __future__ import annotations

import json
from pathlib import Path

# A ChatML template (what SmolLM2 and Qwen2 use), so chat paths are exercised on tiny models.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "reverse the word: hello -> olleh",
    "add 2 and 3 -> 5",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ? ! . , : ; ' \" ( ) [ ] { }",
    "héllo wörld — ünïcode ✓ 日本語",
]

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer with <|im_start|>, <|im_end|> and <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str = "llama", *, vocab_size: int, seed: int = 0, **overrides):
    """A 2-layer config with GQA (4 query heads, 2 KV heads) for `arch`."""
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        eos_token_id=None,
        pad_token_id=None,
        bos_token_id=None,
    )
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if arch == "qwen2":
        return Qwen2Config(use_sliding_window=False, **common)
    if arch == "qwen3":  # head_dim is its own field (default 128): hidden / heads as the others
        return Qwen3Config(use_sliding_window=False, **{"head_dim": 16, **common})
    if arch == "phi3":  # q|k|v and gate|up packed (qkv_proj, gate_up_proj)
        return Phi3Config(sliding_window=None, **common)
    if arch == "gemma2":
        # Caps small enough to bind on a tiny random model, a scale unlike head_dim, a window over ctx_len.
        # Tied, as Gemma ships (unless overridden).
        return Gemma2Config(**{"head_dim": 16, "query_pre_attn_scalar": 24, "attn_logit_softcapping": 1.5,
                               "final_logit_softcapping": 4.0, "sliding_window": 128, **common,
                               "tie_word_embeddings": overrides.get("tie_word_embeddings", True)})
    if arch == "gemma3_text":
        # One sliding layer (local rope base 10k) and one global (base 1M, linear scaling as the 4B+ models).
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}
        return Gemma3TextConfig(**{"head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 128,
                                   "rope_parameters": rope,
                                   "layer_types": ["full_attention" if i % 2 else "sliding_attention"
                                                   for i in range(common["num_hidden_layers"])],
                                   **common, "tie_word_embeddings": overrides.get("tie_word_embeddings", True)})
    raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {ARCHITECTURES}")


def make_tiny_model_dir(path: str | Path, arch: str = "llama", *, seed: int = 0, **overrides) -> Path:
    """Save a random tiny `arch` checkpoint plus tokenizer under `path`; returns the path."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = tiny_config(arch, vocab_size=len(tokenizer), **overrides)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config.eos_token_id = eos
    config.pad_token_id = pad
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Larger-than-default init so random models do not emit near-uniform logits (ties in argmax).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_random_checkpoint(path: str | Path, arch: str = "llama", *, seed: int = 0, dtype: str = "BF16",
                            std: float = 0.08, **overrides) -> Path:
    """A random ``arch`` checkpoint written tensor by tensor (one tensor in memory at a time, whatever the
    size), with the tiny tokenizer; ``overrides`` set config fields (e.g. hidden_size, num_hidden_layers)."""
    import torch

    from services.compiler.modeling.checkpoint import write_safetensors
    from services.compiler.modeling.config import DecoderConfig
    from services.compiler.modeling.weights import hf_tensor_shapes

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = tiny_config(arch, vocab_size=len(tokenizer), **overrides)
    config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    hf = config.to_dict()
    torch_dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[dtype]
    gen = torch.Generator().manual_seed(seed)

    def make(name: str, shape: tuple[int, ...]) -> bytes:
        t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=gen) * std
        return t.to(torch_dtype).contiguous().view(torch.uint8).numpy().tobytes()

    write_safetensors(path / "model.safetensors", hf_tensor_shapes(DecoderConfig.from_hf_dict(hf)), make,
                      dtype=dtype)
    tokenizer.save_pretrained(path)
    (path / "config.json").write_text(json.dumps(hf, indent=1))
    return path
