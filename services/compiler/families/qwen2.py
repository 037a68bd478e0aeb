"""Qwen2: Llama's block with q/k/v biases always (no o bias); the window only with ``use_sliding_window``."""

from services.compiler.families.spec import FamilyFields, FamilySpec, flag, window


def read_config(hf) -> FamilyFields:
    return FamilyFields(attention_bias=True, o_bias=False, mlp_bias=flag(hf, "mlp_bias"),
                        sliding_window=window(hf) if flag(hf, "use_sliding_window") else None)


FAMILY = FamilySpec(model_type="qwen2", read_config=read_config)
