"""Qwen3: Llama's block with an RMSNorm per query and key head before rotary (``q_norm``/``k_norm``, weights
[head_dim]); biases only with ``attention_bias`` (q/k/v and o together, default none); the window only with
``use_sliding_window``."""

from services.compiler.families.spec import BlockStructure, FamilyFields, FamilySpec, flag, window


def read_config(hf) -> FamilyFields:
    bias = flag(hf, "attention_bias")
    return FamilyFields(attention_bias=bias, o_bias=bias, mlp_bias=False,
                        sliding_window=window(hf) if flag(hf, "use_sliding_window") else None)


FAMILY = FamilySpec(model_type="qwen3", read_config=read_config, block=BlockStructure(qk_norm=True))
