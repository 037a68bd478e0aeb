"""Small helpers shared by the compiler tests (not fixtures)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loraflow.artifact import graph_contract as gc
from loraflow.artifact import lora_bank
from loraflow.artifact.manifest import GraphSpec, LoraModuleSpec
from services.compiler.export import BankShape, contract_io
from services.compiler.modeling import load_decoder

# A family that stores q|k|v and gate|up packed (Phi-3) is adapted on the packed modules instead.
PACKED_AS = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
             "up_proj": "gate_up_proj"}


def family_modules(arch: str, modules) -> tuple[str, ...]:
    """``modules`` (separate projection names) as family ``arch`` names them: packed ones for Phi-3."""
    from services.compiler.families import FAMILIES

    if not FAMILIES[arch].block.packed_projections:
        return tuple(modules)
    return tuple(dict.fromkeys(PACKED_AS.get(m, m) for m in modules))


def decoder_with_adapters(model_dir: Path, adapters: list[tuple[str, Path]], modules, *, max_rank=8, slots=3):
    """(decoder with banks installed, bank feeds by graph input name, GraphSpec of the contract); ``modules``
    in separate-projection names are mapped to the family's (family_modules)."""
    from services.compiler.modeling import DecoderConfig

    decoder = load_decoder(model_dir, family_modules(DecoderConfig.from_model_dir(model_dir).architecture, modules))
    cfg = decoder.cfg
    spec = lora_bank.BankSpec(num_layers=cfg.num_layers, max_rank=max_rank, adapter_slots=slots,
                              modules={m: cfg.lora_module_shapes()[m] for m in decoder.lora_modules})
    banks_a, banks_b = lora_bank.empty_banks(spec)
    for slot, (name, path) in enumerate(adapters, start=1):
        lora_bank.write_slot(banks_a, banks_b, slot, lora_bank.read_adapter(name, path), spec)
    decoder.set_banks(banks_a, banks_b)
    feeds = {}
    for m in decoder.lora_modules:
        feeds[gc.lora_a(m)] = banks_a[m]
        feeds[gc.lora_b(m)] = banks_b[m]
    inputs, outputs = contract_io(decoder, BankShape(slots, max_rank), "float32")
    graph = GraphSpec(file="model.onnx", target="onnxruntime", dtype="float32", layers=cfg.num_layers,
                      num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, vocab_size=cfg.vocab_size,
                      inputs=inputs, outputs=outputs,
                      lora_modules={m: LoraModuleSpec(*cfg.lora_module_shapes()[m]) for m in decoder.lora_modules})
    return decoder, feeds, graph


def random_prompts(vocab: int, lengths, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    # Skip the 3 special tokens so HF generate never meets an eos in the prompt.
    return [rng.integers(3, vocab, n).tolist() for n in lengths]
