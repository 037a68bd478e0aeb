"""Gemma 2: zero-centred RMSNorm weights ((1 + w)), embeddings times sqrt(hidden_size), norms around both the
attention and the MLP (pre and post), GELU (tanh approximation), attention scale query_pre_attn_scalar**-0.5,
attention and final logit soft-capping, and sliding-window layers alternating with global ones (the window
bounds ctx_len, so every layer attends its whole context)."""

from services.compiler.families.spec import (
    BlockStructure,
    FamilyFields,
    FamilySpec,
    flag,
    positive_number,
    window,
)

GEMMA_BLOCK = BlockStructure(activation="gelu_tanh", norm_offset=1.0, sandwich_norms=True, embedding_scale=True)


def read_config(hf) -> FamilyFields:
    bias = flag(hf, "attention_bias")
    return FamilyFields(attention_bias=bias, o_bias=bias, sliding_window=window(hf),
                        attn_logit_softcap=positive_number(hf, "attn_logit_softcapping"),
                        final_logit_softcap=positive_number(hf, "final_logit_softcapping"),
                        query_pre_attn_scalar=positive_number(hf, "query_pre_attn_scalar"))


FAMILY = FamilySpec(model_type="gemma2", read_config=read_config, block=GEMMA_BLOCK,
                    hidden_acts=("gelu_pytorch_tanh",), activation_key="hidden_activation")
