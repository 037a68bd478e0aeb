"""Llama (and everything saved as model_type "llama", e.g. SmolLM2): the shared skeleton itself."""

from services.compiler.families.spec import FamilyFields, FamilySpec, flag


def read_config(hf) -> FamilyFields:
    bias = flag(hf, "attention_bias")  # q/k/v and o together
    return FamilyFields(attention_bias=bias, o_bias=bias, mlp_bias=flag(hf, "mlp_bias"))


FAMILY = FamilySpec(model_type="llama", read_config=read_config)
