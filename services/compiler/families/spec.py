"""What a model family declares, once, for every consumer: the reference decoder (modeling/), the fused
ONNX Runtime graph (fused/builder.py) and the AI 100 graph (ai100_writer.py).

* ``read_config``: the family's own config.json rules beyond the sizes every family shares
  (loraflow.options.hf_config reads those strictly): biases, sliding window, soft-capping, ...;
* ``hf_names``: our tensor name -> the Hugging Face tensors that make it up (concatenated along dim 0);
* ``block``: how one decoder block computes, as data the consumers branch on (never on the family's name).

A family is one module in this package exposing ``FAMILY``; services/compiler/families/__init__.py lists
them, and loraflow/artifact/model_families.py holds their names for the parts that must not import the compiler.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from loraflow.errors import InvalidArgument

ACTIVATIONS = ("silu", "gelu_tanh")  # gelu_tanh: GELU's tanh approximation (HF gelu_pytorch_tanh)


@dataclass(frozen=True)
class BlockStructure:
    """How a decoder block computes. The shared skeleton is Llama's: pre-norm RMSNorm, GQA attention with
    half-split rotary, a gated MLP; each field is a departure from it a family may declare."""

    activation: str = "silu"  # the MLP gate's activation: one of ACTIVATIONS
    qk_norm: bool = False  # RMSNorm over head_dim on each query and key head before rotary (Qwen3)
    # The checkpoint and the adapters hold q|k|v and gate|up packed (qkv_proj, gate_up_proj: Phi-3); else
    # separate q/k/v_proj and gate/up_proj, which we pack on reading.
    packed_projections: bool = False
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + weight): 1.0 for Gemma's zero-centred weights
    # Gemma 2/3: the attention output and the MLP output are RMSNorm'd before their residual add
    # (post_attention_layernorm, post_feedforward_layernorm) and the MLP input by pre_feedforward_layernorm;
    # otherwise (Llama) post_attention_layernorm is the MLP's input norm.
    sandwich_norms: bool = False
    embedding_scale: bool = False  # embeddings times sqrt(hidden_size), rounded to the embedding's dtype (Gemma)
    # Gemma 3: rope_parameters per layer type; the sliding-window layers rotate with their own (local) base.
    local_rope: bool = False

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not one of {ACTIVATIONS}")


@dataclass(frozen=True)
class FamilyFields:
    """The DecoderConfig fields a family reads from config.json beyond the shared sizes."""

    attention_bias: bool = False  # q/k/v biases
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # attention window (None = full attention)
    attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap) before the mask (Gemma 2)
    final_logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    query_pre_attn_scalar: float | None = None  # attention scale query_pre_attn_scalar**-0.5 (Gemma), else head_dim
    local_rope_layers: tuple[int, ...] = ()  # layers rotating with the local rope (Gemma 3's sliding layers)


def llama_hf_names(name: str) -> tuple[str, ...]:
    """Llama's Hugging Face naming: ``model.`` + ours, q/k/v and gate/up as separate tensors."""
    if name in ("embed_tokens.weight", "norm.weight"):
        return (f"model.{name}",)
    if name == "lm_head.weight":
        return (name,)
    _, i, rest = name.split(".", 2)
    p = f"model.layers.{i}."
    kind = rest.rsplit(".", 1)[1]  # weight | bias
    if rest.startswith("self_attn.qkv_proj."):
        return tuple(f"{p}self_attn.{m}.{kind}" for m in ("q_proj", "k_proj", "v_proj"))
    if rest.startswith("mlp.gate_up_proj."):
        return (f"{p}mlp.gate_proj.{kind}", f"{p}mlp.up_proj.{kind}")
    return (p + rest,)


@dataclass(frozen=True)
class FamilySpec:
    model_type: str  # config.json's model_type
    read_config: Callable[[Mapping[str, Any]], FamilyFields]
    block: BlockStructure = BlockStructure()
    hidden_acts: tuple[str, ...] = ("silu",)  # config.json activation values the block computes
    activation_key: str = "hidden_act"  # where config.json names the activation (Gemma: hidden_activation)
    hf_names: Callable[[str], tuple[str, ...]] = llama_hf_names


def flag(hf: Mapping[str, Any], key: str) -> bool:
    """config.json boolean ``key`` (absent or null: false); InvalidArgument naming it otherwise."""
    value = hf.get(key, False)
    if not isinstance(value, bool | None):
        raise InvalidArgument(f"base_model.{key} must be true or false, got a JSON {type(value).__name__}",
                              field=f"base_model.{key}", value=type(value).__name__)
    return bool(value)


def positive_number(hf: Mapping[str, Any], key: str) -> float | None:
    """config.json ``key``: null/absent, or a finite number > 0; InvalidArgument naming it otherwise."""
    value = hf.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
        shown = value if isinstance(value, int | float) else type(value).__name__
        raise InvalidArgument(f"base_model.{key} must be null or a finite number > 0, got {shown!r}",
                              field=f"base_model.{key}", value=shown)
    return float(value)


def window(hf: Mapping[str, Any]) -> int | None:
    """config.json ``sliding_window`` (hf_config checked it: null or an integer in range)."""
    value = hf.get("sliding_window")
    return int(value) if value else None
