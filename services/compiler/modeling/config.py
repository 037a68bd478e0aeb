"""DecoderConfig: the few numbers our static-shape decoder needs, read from an HF config.json."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loraflow.errors import InvalidArgument
from loraflow.options.hf_config import HfModelConfig, read_config_file
from services.compiler.families import FAMILIES, BlockStructure, FamilySpec, family

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(FAMILIES)  # model_type strings, one family module each
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3")


@dataclass(frozen=True)
class DecoderConfig:
    architecture: str  # the model family (config.json model_type): services/compiler/families
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v biases (each family's read_config decides; Qwen2 always has them)
    o_bias: bool
    mlp_bias: bool
    rope_scaling: Mapping[str, Any] = field(default_factory=lambda: {"rope_type": "default"})
    sliding_window: int | None = None  # Mistral/Qwen2: attention window (None = full attention)
    attn_logit_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap) before the mask
    final_logit_softcap: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)
    query_pre_attn_scalar: float | None = None  # Gemma: attention scale query_pre_attn_scalar**-0.5
    # Gemma 3: these layers (its sliding ones) rotate with a default rope of base local_rope_theta.
    local_rope_layers: tuple[int, ...] = ()
    local_rope_theta: float | None = None

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def embedding_scale(self) -> float | None:
        """Gemma's sqrt(hidden_size) as HF holds it (a float32 tensor; the fp32 model multiplies by that)."""
        import numpy as np

        return float(np.float32(self.hidden_size ** 0.5)) if self.block.embedding_scale else None

    @property
    def family(self) -> FamilySpec:
        return family(self.architecture)

    @property
    def block(self) -> BlockStructure:
        """How this family's decoder block computes (what the reference and both graph writers follow)."""
        return self.family.block

    @property
    def num_query_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def rope_type(self) -> str:
        return str(self.rope_scaling.get("rope_type", "default"))

    def lora_module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of every linear a LoRA adapter may target in this family, in canonical
        (graph_contract.ALL_LORA_MODULES) order."""
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        if self.block.packed_projections:
            return {"qkv_proj": (self.hidden_size, q_out + 2 * kv_out), "o_proj": (q_out, self.hidden_size),
                    "gate_up_proj": (self.hidden_size, 2 * self.intermediate_size),
                    "down_proj": (self.intermediate_size, self.hidden_size)}
        return {
            "q_proj": (self.hidden_size, q_out),
            "k_proj": (self.hidden_size, kv_out),
            "v_proj": (self.hidden_size, kv_out),
            "o_proj": (q_out, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rope_scaling"] = dict(self.rope_scaling)
        d["local_rope_layers"] = list(self.local_rope_layers)  # as JSON reads it back
        return d

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any]) -> DecoderConfig:
        """From a config.json object, read strictly (loraflow.options.hf_config): a size that is not an integer in range,
        or a malformed rope setting, is INVALID_ARGUMENT naming ``base_model.<key>``."""
        arch = hf.get("model_type") if isinstance(hf, Mapping) else None
        spec = family(arch)  # INVALID_ARGUMENT base_model.model_type naming the supported families
        act = hf.get(spec.activation_key, spec.hidden_acts[0])
        if act not in spec.hidden_acts:
            shown = act if isinstance(act, str) and len(act) <= 64 else "<not a name>"
            raise InvalidArgument(f"hidden_act {shown!r} is not supported for {arch} (the decoder implements "
                                  f"{list(spec.hidden_acts)})", field=f"base_model.{spec.activation_key}", value=shown)
        checked = HfModelConfig.from_dict(hf, field="base_model")
        params = hf.get("rope_parameters")
        local_theta = None
        if spec.block.local_rope and isinstance(params, Mapping) and isinstance(params.get("full_attention"), Mapping):
            # rope_parameters per layer type (Gemma 3): the global layers' rope as usual, the local one default.
            rope = _rope_parameters({**hf, "rope_parameters": params["full_attention"]})
            local = _rope_parameters({**hf, "rope_theta": hf.get("rope_local_base_freq"),
                                      "rope_parameters": params.get("sliding_attention") or {}, "rope_scaling": None})
            if local["rope_type"] != "default":
                raise InvalidArgument("the sliding layers' rope must be rope_type 'default'",
                                      field="base_model.rope_parameters.sliding_attention.rope_type",
                                      value=local["rope_type"])
            local_theta = float(local["rope_theta"])
        else:
            rope = _rope_parameters(hf)
            if spec.block.local_rope:  # the older config.json spelling, else Gemma 3's local default
                local_theta = float(hf.get("rope_local_base_freq") or 10000.0)
        own = spec.read_config(hf)
        return cls(
            architecture=arch,
            vocab_size=checked.vocab_size,
            hidden_size=checked.hidden_size,
            intermediate_size=checked.intermediate_size,
            num_layers=checked.num_hidden_layers,
            num_heads=checked.num_attention_heads,
            num_kv_heads=checked.num_key_value_heads,
            head_dim=checked.head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps") or 1e-6),  # hf_config: finite and > 0 when given
            rope_theta=float(rope.pop("rope_theta")),
            max_position_embeddings=checked.max_position_embeddings or 2048,
            tie_word_embeddings=checked.tie_word_embeddings,
            attention_bias=own.attention_bias,
            o_bias=own.o_bias,
            mlp_bias=own.mlp_bias,
            rope_scaling=rope,
            sliding_window=own.sliding_window,
            attn_logit_softcap=own.attn_logit_softcap,
            final_logit_softcap=own.final_logit_softcap,
            query_pre_attn_scalar=own.query_pre_attn_scalar,
            local_rope_layers=own.local_rope_layers if local_theta is not None else (),
            local_rope_theta=local_theta,
        )

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> DecoderConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise InvalidArgument(f"{model_dir} is not a Hugging Face checkpoint (no config.json)",
                                  field="base_model", value=str(model_dir))
        return cls.from_hf_dict(read_config_file(path, field="base_model", shown=f"{model_dir}/config.json"))


def _rope_parameters(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Normalise transformers-5 ``rope_parameters`` and legacy ``rope_theta`` + ``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise InvalidArgument("rope_parameters per layer type are not supported (one rope for every layer)",
                              field="base_model.rope_parameters", value=sorted(params)[:8])
    if "type" in legacy and "rope_type" not in legacy:
        legacy["rope_type"] = legacy.pop("type")
    merged = {**legacy, **params}
    merged["rope_theta"] = merged.get("rope_theta") or hf.get("rope_theta") or 10000.0
    merged.setdefault("rope_type", "default")
    if merged["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise InvalidArgument(
            f"rope type {merged['rope_type']!r} is not supported; supported: {list(SUPPORTED_ROPE_TYPES)}",
            field="base_model.rope_scaling.rope_type", value=merged["rope_type"])
    if merged.get("partial_rotary_factor", 1.0) != 1.0:
        raise InvalidArgument("partial_rotary_factor != 1 is not supported",
                              field="base_model.partial_rotary_factor", value=merged["partial_rotary_factor"])
    return merged
