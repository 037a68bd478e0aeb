"""Fixtures for the compiler suite: PEFT adapters saved from tiny models, and the PEFT reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def save_peft_adapter(model_dir: Path, out_dir: Path, *, r: int = 4, lora_alpha: float = 8,
                      target_modules=("q_proj", "v_proj"), use_rslora: bool = False, seed: int = 1,
                      **extra) -> Path:
    """A PEFT LoRA adapter on the tiny model with random non-zero A and B (init_lora_weights=False)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(target_modules), use_rslora=use_rslora,
                     init_lora_weights=False, task_type="CAUSAL_LM", **extra)
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        # Large enough to change greedy tokens, small enough to keep logits well separated.
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.15)
    model.save_pretrained(out_dir)
    return Path(out_dir)


@pytest.fixture(scope="session")
def adapter_factory(tmp_path_factory, tiny_model_factory):
    """adapter_factory(arch, name, **lora_kwargs) -> saved adapter dir (cached per arguments)."""
    cache: dict[tuple, Path] = {}

    def make(arch: str = "llama", name: str = "a", **kwargs) -> Path:
        key = (arch, name, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        if key not in cache:
            from tests.compiler.helpers import family_modules

            out = tmp_path_factory.mktemp(f"adapter-{arch}-{name}")
            if "target_modules" in kwargs:  # as the family names its modules (Phi-3: packed qkv_proj, gate_up_proj)
                kwargs = {**kwargs, "target_modules": family_modules(arch, kwargs["target_modules"])}
            cache[key] = save_peft_adapter(tiny_model_factory(arch), out, **kwargs)
        return cache[key]

    return make


# kind -> (parameter-name suffixes to randomise, their mean, std): Qwen2's q/k/v biases, Qwen3's q/k norms,
# Gemma's zero-centred norm weights (all of them, the sandwich norms included).
PERTURBED = {"qwen2": (("bias",), 0.0, 0.3), "qwen3": (("q_norm.weight", "k_norm.weight"), 1.0, 0.3),
             "gemma2": (("norm.weight",), 0.0, 0.3), "gemma3_text": (("norm.weight",), 0.0, 0.3)}


def _perturbed(src: Path, path: Path, suffixes: tuple[str, ...], mean: float, std: float) -> Path:
    """A copy of checkpoint ``src`` with the parameters ending in ``suffixes`` drawn from N(mean, std)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(suffixes):
                p.normal_(mean, std)
    model.save_pretrained(path)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "generation_config")):
            (path / f.name).write_bytes(f.read_bytes())
    return path


@pytest.fixture(scope="session")
def parity_model(tmp_path_factory, tiny_model_factory):
    """parity_model(kind) -> checkpoint dir; kind is an architecture, "llama3rope", or "tied" (a Llama whose
    head is its embedding table).

    Parameters the tiny factory leaves at their neutral init (zero biases, unit norms) are randomised where a
    family has its own (PERTURBED), so their wiring is tested.
    """
    from tests.support.tiny_models import make_tiny_model_dir

    cache: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind in cache:
            return cache[kind]
        if kind == "tied":
            path = make_tiny_model_dir(tmp_path_factory.mktemp("tiny-tied"), "llama", tie_word_embeddings=True)
        elif kind == "llama3rope":
            rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
            path = make_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama3rope"), "llama", rope_parameters=rope)
        elif kind in PERTURBED:
            path = _perturbed(tiny_model_factory(kind), tmp_path_factory.mktemp(f"tiny-{kind}-perturbed"),
                              *PERTURBED[kind])
        else:
            path = tiny_model_factory(kind)
        cache[kind] = Path(path)
        return cache[kind]

    return make
