"""Gemma 3 text (model_type "gemma3_text", Gemma3ForCausalLM): Gemma 2's block with an RMSNorm per query and key
head before rotary, no soft-capping by default, and rope per layer type: the sliding-window layers
(``layer_types``) rotate with the local base (``rope_parameters.sliding_attention``), the global ones with
``rope_parameters.full_attention``. The window bounds ctx_len, so every layer attends its whole context."""

from dataclasses import replace

from loraflow.errors import InvalidArgument
from services.compiler.families.gemma2 import GEMMA_BLOCK
from services.compiler.families.gemma2 import read_config as gemma2_config
from services.compiler.families.spec import FamilyFields, FamilySpec, flag


def read_config(hf) -> FamilyFields:
    if flag(hf, "use_bidirectional_attention"):
        raise InvalidArgument("use_bidirectional_attention=true is not a causal decoder",
                              field="base_model.use_bidirectional_attention", value=True)
    layer_types = hf.get("layer_types")
    layers = hf.get("num_hidden_layers")
    pattern = hf.get("sliding_window_pattern", 6)
    if layer_types is None and isinstance(layers, int) and isinstance(pattern, int) and pattern > 0:
        # An older config.json: every pattern-th layer global, as transformers derives it.
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    if not isinstance(layer_types, list) or len(layer_types) != layers or any(
            t not in ("sliding_attention", "full_attention") for t in layer_types):
        shown = layer_types if isinstance(layer_types, list) and len(layer_types) <= 8 else type(layer_types).__name__
        raise InvalidArgument(f"base_model.layer_types must list 'sliding_attention' or 'full_attention' for each "
                              f"of the {layers} layers", field="base_model.layer_types", value=str(shown))
    local = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
    return replace(gemma2_config(hf), local_rope_layers=local)


FAMILY = FamilySpec(model_type="gemma3_text", read_config=read_config,
                    block=replace(GEMMA_BLOCK, qk_norm=True, local_rope=True),
                    hidden_acts=("gelu_pytorch_tanh",), activation_key="hidden_activation")
