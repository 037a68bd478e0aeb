"""A strict, typed, bounded reader of a Hugging Face ``config.json``: the one place a base model's sizes are
read before anything estimates or allocates from them.

A config.json comes from whoever pushed the model, so every size in it is untrusted input:

* the file is at most ``MAX_CONFIG_BYTES`` and must be a JSON object (not an array, not NaN/Infinity, not
  nested past ``MAX_JSON_DEPTH``);
* each size is an integer (``"2"``, ``2.0`` and ``true`` are not) inside a range no real model leaves
  (``num_hidden_layers`` 1..1024, ``vocab_size`` 1..4M, ...): a value outside is malformed, not big;
* ``rope_scaling`` / ``rope_parameters`` are objects whose ``rope_type`` is one transformers knows and whose
  factors are finite positive numbers.

Every refusal is INVALID_ARGUMENT naming ``<field>.<key>`` (e.g. ``base_model.num_hidden_layers``) and the
value, never bytes of the file beyond it. Whether a valid model *fits* is a separate question, answered by
loraflow.options.budget from these numbers (RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from loraflow.errors import InvalidArgument
from loraflow.security.safe_files import MAX_CONFIG_BYTES, read_regular_file

MAX_JSON_DEPTH = 64  # config.json nests a few levels (rope_parameters per layer type, text_config)

# Shape bounds: beyond these a config is a typo or an attack, not a model. The largest public models sit
# far inside them (Llama-3.1-405B: 126 layers, hidden 16384, vocab 128256; Gemma 3: vocab 262144).
MAX_LAYERS = 1024
MAX_HIDDEN_SIZE = 1 << 17
MAX_INTERMEDIATE_SIZE = 1 << 20
MAX_HEADS = 1024
MAX_HEAD_DIM = 2048
MAX_VOCAB_SIZE = 1 << 22
MAX_POSITION_EMBEDDINGS = 1 << 24
MAX_EXPERTS = 1024
MAX_MODEL_TYPE_CHARS = 64

# transformers' rope types (modeling_rope_utils.ROPE_INIT_FUNCTIONS) plus "default".
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional", "axial", "mrope")
_ROPE_NEEDS_FACTOR = ("linear", "dynamic", "yarn", "llama3")
# Rope fields that must be finite positive numbers when present.
_ROPE_POSITIVE = ("rope_theta", "factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow",
                  "attention_factor", "mscale", "mscale_all_dim", "partial_rotary_factor")
_ROPE_POSITIVE_INTS = ("original_max_position_embeddings",)
_ROPE_FACTOR_LISTS = ("short_factor", "long_factor", "mrope_section")
MAX_ROPE_LIST = 4096

# Legacy spellings of the canonical names (GPT-2 style configs), in the order they are looked up.
_ALIASES: dict[str, tuple[str, ...]] = {
    "num_hidden_layers": ("n_layer", "num_layers"),
    "hidden_size": ("n_embd", "d_model"),
    "num_attention_heads": ("n_head", "num_heads"),
    "intermediate_size": ("n_inner", "ffn_dim"),
    "max_position_embeddings": ("n_positions",),
}
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def _bad(field_name: str, value: Any, why: str) -> InvalidArgument:
    shown = value if isinstance(value, bool | int | float | type(None)) else _shown(value)
    return InvalidArgument(f"{field_name} {why}, got {shown!r}", field=field_name, value=shown)


def _shown(value: Any) -> str:
    """A short description of a JSON value (its type and, for a short string, itself)."""
    if isinstance(value, str):
        return value if len(value) <= 64 and value.isprintable() else f"<a {len(value)}-character string>"
    if isinstance(value, list):
        return f"<a JSON array of {len(value)}>"
    if isinstance(value, dict):
        return f"<a JSON object of {len(value)} keys>"
    return repr(value)


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value, stopping once it passes `limit` (iterative: no recursion)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def parse_config_bytes(raw: bytes, *, field: str, name: str = "config.json", shown: str = "") -> dict[str, Any]:
    """The JSON object in `raw`; InvalidArgument naming `field` (and the position of a syntax error only)."""
    shown = shown or field
    if len(raw) > MAX_CONFIG_BYTES:
        raise InvalidArgument(f"{field} {name} is {len(raw)} bytes, more than the {MAX_CONFIG_BYTES}-byte limit",
                              field=field, value=shown)
    try:
        data = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        # The decoder's position, never its excerpt of the file.
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise InvalidArgument(f"{field} {name} is not valid JSON{where}", field=field, value=shown) from None
    if not isinstance(data, dict):
        raise InvalidArgument(f"{field} {name} is not a JSON object (it is {_kind(data)})", field=field,
                              value=shown)
    if _depth(data, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise InvalidArgument(f"{field} {name} nests deeper than {MAX_JSON_DEPTH} levels", field=field,
                              value=shown)
    return data


def read_config_file(path: str | os.PathLike, *, field: str, shown: str | None = None) -> dict[str, Any]:
    """A config.json on disk: a regular file of at most MAX_CONFIG_BYTES holding a JSON object."""
    shown = shown if shown is not None else os.fspath(path)
    raw = read_regular_file(path, field=field, limit=MAX_CONFIG_BYTES, shown=shown)
    return parse_config_bytes(raw, field=field, name=os.path.basename(os.fspath(path)), shown=shown)


def _int(cfg: Mapping[str, Any], key: str, field_name: str, lo: int, hi: int, *, default: int | None = None,
         required: bool = True) -> int | None:
    """An integer in lo..hi under `key` (or its aliases); None/absent gives `default` (or an error if required)."""
    present = key
    value = cfg.get(key)
    if value is None:
        for alias in _ALIASES.get(key, ()):
            if cfg.get(alias) is not None:
                present, value = alias, cfg[alias]
                break
    if value is None:
        if default is not None or not required:
            return default
        raise InvalidArgument(f"{field_name}.{key} is missing; a causal LM config.json must give it",
                              field=f"{field_name}.{key}", value=None)
    name = f"{field_name}.{present}"
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(name, value, f"must be an integer (not {_kind(value)})")
    if not lo <= value <= hi:
        raise _bad(name, value, f"must be in {lo}..{hi}")
    return value


def _positive_number(value: Any, name: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _bad(name, value, f"must be a number (not {_kind(value)})")
    if not math.isfinite(value) or value <= 0:
        raise _bad(name, value, "must be a finite number > 0")
    return float(value)


def check_rope(value: Any, name: str, *, max_positions: int = MAX_POSITION_EMBEDDINGS) -> dict[str, Any] | None:
    """None, or a rope_scaling / rope_parameters object whose type and numbers make sense.

    transformers 5 may key rope_parameters by layer type ({"full_attention": {...}, ...}): each is checked."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad(name, value, f"must be an object or null (not {_kind(value)})")
    if any(isinstance(v, dict) for v in value.values()) and all(isinstance(v, dict | None) for v in value.values()):
        if len(value) > 16:
            raise _bad(name, value, "must key at most 16 layer types")
        for layer_type, inner in value.items():  # None: a layer type without rope (NoPE)
            check_rope(inner, f"{name}.{layer_type}", max_positions=max_positions)
        return dict(value)
    rope_type = value.get("rope_type", value.get("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in ROPE_TYPES:
        raise _bad(f"{name}.rope_type", rope_type, f"must be one of {list(ROPE_TYPES)}")
    for key, item in value.items():
        where = f"{name}.{key}"
        if key in ("rope_type", "type") or item is None:
            continue
        if key in _ROPE_POSITIVE:
            _positive_number(item, where)
        elif key in _ROPE_POSITIVE_INTS:
            if not isinstance(item, int) or isinstance(item, bool) or not 1 <= item <= max_positions:
                raise _bad(where, item, f"must be an integer in 1..{max_positions}")
        elif key in _ROPE_FACTOR_LISTS:
            if not isinstance(item, list) or len(item) > MAX_ROPE_LIST:
                raise _bad(where, item, f"must be an array of at most {MAX_ROPE_LIST} numbers")
            for i, x in enumerate(item):
                _positive_number(x, f"{where}[{i}]")
        elif not isinstance(item, bool | int | float | str | type(None)):
            raise _bad(where, item, "must be a number, string, boolean or null")
        elif isinstance(item, float) and not math.isfinite(item):
            raise _bad(where, item, "must be finite")
    if rope_type in _ROPE_NEEDS_FACTOR and value.get("factor") is None:
        raise InvalidArgument(f"{name}.factor is missing; rope_type {rope_type!r} needs a scaling factor",
                              field=f"{name}.factor", value=None)
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in value:
                raise InvalidArgument(f"{name}.{key} is missing; rope_type 'llama3' needs it",
                                      field=f"{name}.{key}", value=None)
    return dict(value)


@dataclass(frozen=True)
class HfModelConfig:
    """The sizes of a causal LM, each checked; ``raw`` is the whole (validated) JSON object."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int | None  # None: the config does not say
    tie_word_embeddings: bool
    num_experts: int = 1  # mixture-of-experts MLPs per layer (1 = dense)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any], *, field: str = "base_model") -> HfModelConfig:
        """Check every size, type and rope setting of `cfg` (see the module docstring)."""
        if not isinstance(cfg, Mapping):
            raise InvalidArgument(f"{field} config.json is not a JSON object (it is {_kind(cfg)})", field=field,
                                  value=_kind(cfg))
        text = cfg.get("text_config")
        if isinstance(text, Mapping) and cfg.get("num_hidden_layers") is None:
            # A multimodal wrapper: the language model's sizes live in text_config.
            merged = {**text, "model_type": cfg.get("model_type", text.get("model_type"))}
            return cls.from_dict(merged, field=field)
        model_type = cfg.get("model_type")
        if not isinstance(model_type, str) or not model_type or len(model_type) > MAX_MODEL_TYPE_CHARS \
                or not model_type.isprintable():
            raise _bad(f"{field}.model_type", model_type, "must be a non-empty model type string")
        layers = _int(cfg, "num_hidden_layers", field, 1, MAX_LAYERS)
        hidden = _int(cfg, "hidden_size", field, 1, MAX_HIDDEN_SIZE)
        heads = _int(cfg, "num_attention_heads", field, 1, MAX_HEADS)
        vocab = _int(cfg, "vocab_size", field, 1, MAX_VOCAB_SIZE)
        kv_heads = _int(cfg, "num_key_value_heads", field, 1, MAX_HEADS, default=heads)
        if heads % kv_heads:
            raise _bad(f"{field}.num_key_value_heads", kv_heads,
                       f"must divide num_attention_heads={heads}")
        head_dim = _int(cfg, "head_dim", field, 1, MAX_HEAD_DIM, required=False)
        if head_dim is None:
            if hidden % heads:
                raise _bad(f"{field}.hidden_size", hidden,
                           f"must be a multiple of num_attention_heads={heads} when head_dim is not given")
            head_dim = hidden // heads
        inter = _int(cfg, "intermediate_size", field, 1, MAX_INTERMEDIATE_SIZE, default=4 * hidden)
        positions = _int(cfg, "max_position_embeddings", field, 1, MAX_POSITION_EMBEDDINGS, required=False)
        window = cfg.get("sliding_window")
        if window is not None and (not isinstance(window, int) or isinstance(window, bool)
                                   or not 1 <= window <= MAX_POSITION_EMBEDDINGS):
            raise _bad(f"{field}.sliding_window", window, f"must be null or an integer in 1..{MAX_POSITION_EMBEDDINGS}")
        experts = 1
        for key in _EXPERT_KEYS:
            value = _int(cfg, key, field, 1, MAX_EXPERTS, required=False)
            if value is not None:
                experts = max(experts, value)
        tie = cfg.get("tie_word_embeddings", False)
        if not isinstance(tie, bool):
            raise _bad(f"{field}.tie_word_embeddings", tie, f"must be true or false (not {_kind(tie)})")
        for key in ("rope_theta", "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"):
            if cfg.get(key) is not None:
                _positive_number(cfg[key], f"{field}.{key}")
        for key in ("rope_scaling", "rope_parameters"):
            check_rope(cfg.get(key), f"{field}.{key}", max_positions=MAX_POSITION_EMBEDDINGS)
        layer_types = cfg.get("layer_types")
        if layer_types is not None:
            if not isinstance(layer_types, list) or len(layer_types) != layers \
                    or not all(isinstance(t, str) and len(t) <= 64 for t in layer_types):
                raise _bad(f"{field}.layer_types", layer_types,
                           f"must be null or an array of {layers} layer-type names (one per layer)")
        return cls(model_type=model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                   head_dim=head_dim, max_position_embeddings=positions, tie_word_embeddings=tie,
                   num_experts=experts, raw=dict(cfg))

    # -- the shapes the estimators use --------------------------------------------------------------

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear of one decoder layer, Llama naming (the shape every family shares), and
        the packed projections of the families that pack them (Phi-3: q|k|v and gate|up in one matrix)."""
        q_out = self.num_attention_heads * self.head_dim
        kv_out = self.num_key_value_heads * self.head_dim
        return {"q_proj": (self.hidden_size, q_out), "k_proj": (self.hidden_size, kv_out),
                "v_proj": (self.hidden_size, kv_out), "o_proj": (q_out, self.hidden_size),
                "gate_proj": (self.hidden_size, self.intermediate_size),
                "up_proj": (self.hidden_size, self.intermediate_size),
                "down_proj": (self.intermediate_size, self.hidden_size),
                "qkv_proj": (self.hidden_size, q_out + 2 * kv_out),
                "gate_up_proj": (self.hidden_size, 2 * self.intermediate_size)}
