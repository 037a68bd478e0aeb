"""Phi-3: Llama's block with q|k|v and gate|up stored packed (``qkv_proj``, ``gate_up_proj``) in the checkpoint
and targeted packed by PEFT adapters; no biases; the window (``sliding_window``) on every layer when set."""

from services.compiler.families.spec import BlockStructure, FamilyFields, FamilySpec, window


def read_config(hf) -> FamilyFields:
    return FamilyFields(sliding_window=window(hf))


def hf_names(name: str) -> tuple[str, ...]:
    """Our names are Phi-3's own (already packed), under ``model.`` except the head."""
    return (name,) if name == "lm_head.weight" else (f"model.{name}",)


FAMILY = FamilySpec(model_type="phi3", read_config=read_config, block=BlockStructure(packed_projections=True),
                    hf_names=hf_names)
