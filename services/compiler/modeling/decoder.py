"""MultiLoraDecoder: the static-shape Llama/Mistral/Qwen2 decoder with per-row adapters.

One module is both the PyTorch reference and the thing exported to ONNX. Its forward follows
loraflow/artifact/graph_contract.py (target "onnxruntime"):

  forward(input_ids [B, S], position_ids [B, S], lora_ids [B, 1], batch_index [B, 1],
          past_keys L x [P, F, H, D], past_values L x [P, F, H, D], lora_a {m: [L, N, in, R]},
          lora_b {m: [L, N, R, out]})
    -> logits [B, 1, V] at each row's last non-padding token,
       present_keys / present_values L x [S, B, H, D] (K after RoPE) for the runtime to store.

Banks default to the module's own buffers (``set_banks``); the export passes them as inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from loraflow.artifact.graph_contract import ALL_LORA_MODULES
from loraflow.errors import InvalidArgument
from services.compiler.modeling.config import DecoderConfig
from services.compiler.modeling.layers import DecoderLayer, Dims, LoraSelector, rms_norm, soft_cap
from services.compiler.modeling.rope import (
    Rope,
    inverse_frequencies,
    rope_cos_sin,
    rotate_half_matrix,
    uses_local_rope,
)
from services.compiler.modeling.weights import CheckpointWeights, WeightSource, model_names


def mask_value(dtype: torch.dtype) -> float:
    """A large finite negative: fully masked rows give a uniform softmax instead of NaN."""
    return float(torch.finfo(dtype).min) / 2


def attention_bias(position_ids: torch.Tensor, past_len: int | torch.SymInt, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, 1, S, P+S] for keys (past P ++ this chunk S).

    Row b sees past entries j < position_ids[b, 0] and, within the chunk, non-padding tokens at or
    before its own index. Every token also sees itself, so padding tokens and idle rows (all -1)
    stay finite.
    """
    B, S = position_ids.shape
    start = position_ids[:, :1]  # [B, 1]
    past_j = torch.arange(past_len, device=position_ids.device)  # [P]
    past_ok = past_j.view(1, 1, -1) < start.unsqueeze(-1)  # [B, 1, P]
    past_ok = past_ok.expand(B, S, past_ok.shape[-1])  # [B, S, P]
    s = torch.arange(S, device=position_ids.device)
    causal = s.view(1, S, 1) >= s.view(1, 1, S)  # [1, S, S]
    valid_key = (position_ids >= 0).view(B, 1, S)  # [B, 1, S]
    itself = s.view(1, S, 1) == s.view(1, 1, S)  # [1, S, S]
    chunk_ok = (causal & valid_key) | itself  # [B, S, S]
    ok = torch.cat([past_ok, chunk_ok], dim=-1)  # [B, S, P+S]
    zero = torch.zeros((), dtype=dtype, device=position_ids.device)
    neg = torch.full((), mask_value(dtype), dtype=dtype, device=position_ids.device)
    return torch.where(ok, zero, neg).view(B, 1, 1, S, -1)  # [B, S, P+S] -> [B, 1, 1, S, P+S]


def embed(table: torch.Tensor, input_ids: torch.Tensor, cfg: DecoderConfig) -> torch.Tensor:
    """Rows of ``table`` [V, hidden] for input_ids -> [..., hidden], times the family's embedding scale (in the
    table's dtype, as HF multiplies)."""
    h = table[input_ids]
    scale = cfg.embedding_scale
    return h if scale is None else h * torch.tensor(scale, dtype=table.dtype)


def last_token_index(position_ids: torch.Tensor) -> torch.Tensor:
    """[B] index of each row's last non-padding token (padding is at the end of a row); 0 for idle rows."""
    return ((position_ids >= 0).sum(dim=1) - 1).clamp(min=0)


class MultiLoraDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, lora_modules: Sequence[str] = ()):
        super().__init__()
        self.cfg = cfg
        # The requested modules this family has (a Llama has no qkv_proj module, Phi-3 no q_proj), in bank order.
        shapes = cfg.lora_module_shapes()
        self.lora_modules = tuple(m for m in ALL_LORA_MODULES if m in lora_modules and m in shapes)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = rms_norm(cfg, cfg.hidden_size)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.init_buffers()

    def init_buffers(self) -> None:
        """RoPE tables and empty banks (non-persistent buffers), on the CPU: a decoder built on the meta
        device gets real ones after its weights are assigned."""
        cfg = self.cfg
        self.register_buffer("inv_freq", inverse_frequencies(cfg), persistent=False)
        if cfg.local_rope_layers:
            self.register_buffer("inv_freq_local", inverse_frequencies(cfg, local=True), persistent=False)
        self.register_buffer("rope_rotate", rotate_half_matrix(cfg.head_dim), persistent=False)
        self.num_slots = 1  # N; set_banks changes it
        for m in self.lora_modules:
            fin, fout = cfg.lora_module_shapes()[m]
            self.register_buffer(f"bank_a_{m}", torch.zeros(cfg.num_layers, 1, fin, 1), persistent=False)
            self.register_buffer(f"bank_b_{m}", torch.zeros(cfg.num_layers, 1, 1, fout), persistent=False)

    # --- banks --------------------------------------------------------------------------------
    def set_banks(self, banks_a: Mapping[str, np.ndarray | torch.Tensor],
                  banks_b: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        """Install banks [L, N, in, R] / [L, N, R, out] for the PyTorch path (one per adapted module)."""
        if set(banks_a) != set(self.lora_modules) or set(banks_b) != set(self.lora_modules):
            raise InvalidArgument(f"banks cover {sorted(banks_a)} but the decoder adapts {list(self.lora_modules)}",
                                  field="banks", value=sorted(banks_a))
        dtype = self.embed_tokens.weight.dtype
        for m in self.lora_modules:
            a, b = torch.as_tensor(banks_a[m]).to(dtype), torch.as_tensor(banks_b[m]).to(dtype)
            self.num_slots = a.shape[1]
            setattr(self, f"bank_a_{m}", a)
            setattr(self, f"bank_b_{m}", b)

    def banks(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return ({m: getattr(self, f"bank_a_{m}") for m in self.lora_modules},
                {m: getattr(self, f"bank_b_{m}") for m in self.lora_modules})

    # --- forward ------------------------------------------------------------------------------
    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype, local: bool = False) -> Rope:
        cos, sin = rope_cos_sin(position_ids, self.inv_freq_local if local else self.inv_freq, dtype)  # [B, S, 1, D]
        return Rope(cos=cos, sin=sin, rotate=self.rope_rotate.to(dtype))

    def logits_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(h)
        if self.lm_head is None:
            logits = F.linear(h, self.embed_tokens.weight)  # tied: [B, S, hidden] -> [B, S, V]
        else:
            logits = self.lm_head(h)
        return soft_cap(logits, self.cfg.final_logit_softcap)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, S] -> [B, S, hidden] (times sqrt(hidden) in the embedding's dtype for Gemma)."""
        return embed(self.embed_tokens.weight, input_ids, self.cfg)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, lora_ids: torch.Tensor,
                batch_index: torch.Tensor, past_keys: Sequence[torch.Tensor], past_values: Sequence[torch.Tensor],
                lora_a: Mapping[str, torch.Tensor] | None = None, lora_b: Mapping[str, torch.Tensor] | None = None,
                *, all_logits: bool = False) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        if lora_a is None or lora_b is None:
            lora_a, lora_b = self.banks()
        num_slots = next(iter(lora_a.values())).shape[1] if lora_a else 1
        B, S = input_ids.shape
        dims = Dims(rows=B, tokens=S, past=past_keys[0].shape[0])
        h = self.embed(input_ids)  # [B, S, hidden]
        rope = self.rope(position_ids, h.dtype)
        local_rope = self.rope(position_ids, h.dtype, local=True) if self.cfg.local_rope_layers else None
        bias = attention_bias(position_ids, dims.past, h.dtype)  # [B, 1, 1, S, P+S]
        lora = LoraSelector(dict(lora_a), dict(lora_b), lora_ids, num_slots)
        rows = batch_index.reshape(-1)  # [B, 1] -> [B]
        presents_k, presents_v = [], []
        for i, layer in enumerate(self.layers):
            layer_rope = local_rope if uses_local_rope(self.cfg, i) else rope
            h, k, v = layer(h, layer_rope, past_keys[i], past_values[i], rows, bias, lora, i, dims)
            presents_k.append(k)
            presents_v.append(v)
        if not all_logits:
            idx = last_token_index(position_ids).view(B, 1, 1).expand(B, 1, h.shape[-1])  # [B, 1, hidden]
            h = torch.gather(h, 1, idx)  # [B, S, hidden] -> [B, 1, hidden]
        return self.logits_from_hidden(h), presents_k, presents_v

    def cast(self, dtype: torch.dtype) -> MultiLoraDecoder:
        """Weights and banks to ``dtype``; RoPE frequencies stay float32 in every dtype."""
        self.to(dtype)
        self.inv_freq = inverse_frequencies(self.cfg)
        if self.cfg.local_rope_layers:
            self.inv_freq_local = inverse_frequencies(self.cfg, local=True)
        return self

    # --- helpers for the PyTorch reference path ---------------------------------------------------
    def empty_cache(self, full_batch: int, past_len: int = 1) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Zeroed time-major caches L x [past_len, F, H, D]."""
        shape = (past_len, full_batch, self.cfg.num_kv_heads, self.cfg.head_dim)
        dtype = self.embed_tokens.weight.dtype
        return ([torch.zeros(shape, dtype=dtype) for _ in self.layers],
                [torch.zeros(shape, dtype=dtype) for _ in self.layers])


# --- loading -------------------------------------------------------------------------------------
def load_decoder(model_dir: str | Path, lora_modules: Sequence[str] = (), dtype: torch.dtype = torch.float32,
                 *, weights: WeightSource | None = None) -> MultiLoraDecoder:
    """The whole decoder from an HF checkpoint dir, for the traced export and tests: built on the meta device
    (no random init) and given the checkpoint's tensors (one float32 copy of the model). Model-sized work
    streams through a WeightSource instead (services/compiler/modeling/weights.py)."""
    model_dir = Path(model_dir)
    cfg = weights.cfg if weights is not None else DecoderConfig.from_model_dir(model_dir)
    source = weights or CheckpointWeights.open(model_dir, cfg)
    with torch.device("meta"):
        model = MultiLoraDecoder(cfg, lora_modules)
    state = {name: source.get(name) for name in model_names(cfg)}
    model.load_state_dict(state, strict=True, assign=True)
    model.init_buffers()
    return model.cast(dtype).eval()
