"""Mistral: Llama's block, with an attention window (``sliding_window``, null = full attention)."""

from services.compiler.families.spec import FamilyFields, FamilySpec, flag, window


def read_config(hf) -> FamilyFields:
    bias = flag(hf, "attention_bias")
    return FamilyFields(attention_bias=bias, o_bias=bias, mlp_bias=flag(hf, "mlp_bias"), sliding_window=window(hf))


FAMILY = FamilySpec(model_type="mistral", read_config=read_config)
