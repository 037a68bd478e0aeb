"""Building blocks of the multi-LoRA decoder: RMSNorm, per-row LoRA selection, attention, SwiGLU.

Shape letters as in loraflow/artifact/graph_contract.py: B rows, S new tokens, P past tokens, H KV heads,
G query heads per KV head, D head_dim, L layers, N adapter slots + 1, R max_rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from services.compiler.modeling.config import DecoderConfig
from services.compiler.modeling.rope import Rope


@dataclass(frozen=True)
class Dims:
    """Sizes read once per forward (B rows, S tokens, P past) and shared by every layer, so the
    exported graph computes each from its input's shape once instead of per reshape."""

    rows: int | torch.Tensor
    tokens: int | torch.Tensor
    past: int | torch.Tensor = 0


class RMSNorm(nn.Module):
    """x / rms(x) scaled by ``weight`` (by ``offset + weight`` for Gemma's zero-centred weights)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 like HF, so fp16 graphs do not overflow the mean of squares.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma: (x * (1 + w)) in float32, then the input's dtype
            return (xf * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * xf.to(x.dtype)


def rms_norm(cfg: DecoderConfig, dim: int) -> RMSNorm:
    """An RMSNorm over ``dim`` as the family's blocks compute it."""
    return RMSNorm(dim, cfg.rms_norm_eps, cfg.block.norm_offset)


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap) (Gemma 2's attention and final logit soft-capping); x itself without a cap."""
    return x if cap is None else torch.tanh(x / cap) * cap


class LoraSelector:
    """Picks each row's adapter from the banks: a gather of B slices, O(rows) not O(slots).

    banks_a[m] [L, N, in, R], banks_b[m] [L, N, R, out]; lora_ids [B, 1].
    """

    def __init__(self, banks_a: dict[str, torch.Tensor], banks_b: dict[str, torch.Tensor],
                 lora_ids: torch.Tensor, num_slots: int):
        # Flattened once per call, not per layer: [L, N, in, R] -> [L*N, in, R], [L, N, R, out] -> [L*N, R, out].
        self.flat_a = {m: a.flatten(0, 1) for m, a in banks_a.items()}
        self.flat_b = {m: b.flatten(0, 1) for m, b in banks_b.items()}
        self.num_slots = num_slots
        self.rows = lora_ids.reshape(-1)  # [B, 1] -> [B]
        self._index: dict[int, torch.Tensor] = {}

    def index(self, layer: int) -> torch.Tensor:
        """[B] flat index layer*N + lora_id into the [L*N, ...] views (one per layer, shared by modules)."""
        if layer not in self._index:
            self._index[layer] = self.rows + layer * self.num_slots
        return self._index[layer]

    def delta(self, module: str, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """x [B, S, in] -> x A B [B, S, out] for each row's adapter; None if `module` is not adapted."""
        flat_a = self.flat_a.get(module)
        if flat_a is None:
            return None
        index = self.index(layer)
        a = flat_a[index]  # [L*N, in, R] -> [B, in, R]
        b = self.flat_b[module][index]  # [L*N, R, out] -> [B, R, out]
        return torch.matmul(torch.matmul(x, a), b)  # [B, S, R] -> [B, S, out]


def _add(y: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    return y if delta is None else y + delta


class Attention(nn.Module):
    """GQA attention over (gathered past cache ++ this chunk); q/k/v in one fused matmul."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.scale = cfg.attention_scale
        self.softcap = cfg.attn_logit_softcap
        if cfg.block.qk_norm:  # per head, over head_dim, before rotary
            self.q_norm = rms_norm(cfg, cfg.head_dim)
            self.k_norm = rms_norm(cfg, cfg.head_dim)
        else:
            self.q_norm = self.k_norm = None

    def project_qkv(self, x: torch.Tensor, lora: LoraSelector, layer: int, rope: Rope, dims: Dims
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, S, hidden] -> q [B, S, Hq, D], k [B, S, H, D] (both after RoPE), v [B, S, H, D]."""
        B, S = dims.rows, dims.tokens
        qkv = _add(self.qkv_proj(x), lora.delta("qkv_proj", layer, x))  # a packed adapter spans all columns
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = _add(q, lora.delta("q_proj", layer, x))
        k = _add(k, lora.delta("k_proj", layer, x))
        v = _add(v, lora.delta("v_proj", layer, x))
        q = q.view(B, S, self.num_heads, self.head_dim)  # [B, S, Hq*D] -> [B, S, Hq, D]
        k = k.view(B, S, self.num_kv_heads, self.head_dim)  # [B, S, H*D] -> [B, S, H, D]
        v = v.view(B, S, self.num_kv_heads, self.head_dim)  # [B, S, H*D] -> [B, S, H, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return rope.apply(q), rope.apply(k), v

    def _group_queries(self, q: torch.Tensor, dims: Dims) -> torch.Tensor:
        """q [B, S, Hq, D] -> [B, H, G*S, D]: query heads grouped per KV head (HF's repeat_kv order,
        query head = kv_head*G + g), so K/V are never repeated."""
        B, S = dims.rows, dims.tokens
        H, G, D = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        qg = q.view(B, S, H, G, D).permute(0, 2, 3, 1, 4)  # [B, S, Hq, D] -> [B, H, G, S, D]
        return qg.reshape(B, H, G * S, D)  # [B, H, G, S, D] -> [B, H, G*S, D]

    def _merge_heads(self, out: torch.Tensor, dims: Dims) -> torch.Tensor:
        B, S = dims.rows, dims.tokens
        H, G, D = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        out = out.view(B, H, G, S, D).permute(0, 3, 1, 2, 4)  # [B, H, G*S, D] -> [B, S, H, G, D]
        return out.reshape(B, S, self.num_heads * D)  # [B, S, H, G, D] -> [B, S, Hq*D]

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, dims: Dims
               ) -> torch.Tensor:
        """q [B, S, Hq, D]; keys/values [B, H, T, D]; bias [B, 1, 1, S, T] -> [B, S, Hq*D]."""
        B, S = dims.rows, dims.tokens
        H, G = self.num_kv_heads, self.num_heads // self.num_kv_heads
        qg = self._group_queries(q, dims)  # [B, H, G*S, D]
        scores = soft_cap(torch.matmul(qg, keys.transpose(2, 3)) * self.scale, self.softcap)  # [B, H, G*S, T]
        scores = scores.view(B, H, G, S, -1) + bias  # [B, H, G*S, T] -> [B, H, G, S, T]
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        probs = probs.view(B, H, G * S, -1)  # [B, H, G, S, T] -> [B, H, G*S, T]
        return self._merge_heads(torch.matmul(probs, values), dims)  # [B, H, G*S, D] -> [B, S, Hq*D]

    def attend_past_and_new(self, q: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, new_k: torch.Tensor,
                            new_v: torch.Tensor, bias: torch.Tensor, dims: Dims) -> torch.Tensor:
        """Like ``attend`` over keys (past ++ new), without concatenating K/V: only the small score
        tensors are joined, so the past cache is read once (gather) and transposed once per step.

        q [B, S, Hq, D]; past_k/past_v [B, H, P, D]; new_k/new_v [B, H, S, D]; bias [B, 1, 1, S, P+S].
        """
        B, S, P = dims.rows, dims.tokens, dims.past
        H, G = self.num_kv_heads, self.num_heads // self.num_kv_heads
        qg = self._group_queries(q, dims)  # [B, H, G*S, D]
        s_past = torch.matmul(qg, past_k.transpose(2, 3))  # [B, H, G*S, P]
        s_new = torch.matmul(qg, new_k.transpose(2, 3))  # [B, H, G*S, S]
        scores = soft_cap(torch.cat([s_past, s_new], dim=-1) * self.scale, self.softcap)  # [B, H, G*S, P+S]
        scores = scores.view(B, H, G, S, -1) + bias  # [B, H, G*S, P+S] -> [B, H, G, S, P+S]
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        probs = probs.view(B, H, G * S, -1)  # [B, H, G, S, P+S] -> [B, H, G*S, P+S]
        out = torch.matmul(probs[..., :P], past_v) + torch.matmul(probs[..., P:], new_v)  # [B, H, G*S, D]
        return self._merge_heads(out, dims)  # [B, H, G*S, D] -> [B, S, Hq*D]

    def output(self, attn: torch.Tensor, lora: LoraSelector, layer: int) -> torch.Tensor:
        return _add(self.o_proj(attn), lora.delta("o_proj", layer, attn))

    def forward(self, x: torch.Tensor, rope: Rope, past_key: torch.Tensor, past_value: torch.Tensor,
                rows: torch.Tensor, bias: torch.Tensor, lora: LoraSelector, layer: int, dims: Dims
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Time-major cache: past [P, F, H, D]; returns (out [B, S, hidden], present k/v [S, B, H, D])."""
        q, k, v = self.project_qkv(x, lora, layer, rope, dims)
        present_k = k.transpose(0, 1)  # [B, S, H, D] -> [S, B, H, D]
        present_v = v.transpose(0, 1)  # [B, S, H, D] -> [S, B, H, D]
        # Only this call's rows of the cache, and only its first P positions.
        past_k = past_key[:, rows].permute(1, 2, 0, 3)  # [P, F, H, D] -> [P, B, H, D] -> [B, H, P, D]
        past_v = past_value[:, rows].permute(1, 2, 0, 3)  # [P, F, H, D] -> [P, B, H, D] -> [B, H, P, D]
        new_k = k.permute(0, 2, 1, 3)  # [B, S, H, D] -> [B, H, S, D]
        new_v = v.permute(0, 2, 1, 3)  # [B, S, H, D] -> [B, H, S, D]
        out = self.attend_past_and_new(q, past_k, past_v, new_k, new_v, bias, dims)
        return self.output(out, lora, layer), present_k, present_v


# The MLP gate's activation by BlockStructure.activation.
ACTIVATIONS = {"silu": F.silu, "gelu_tanh": partial(F.gelu, approximate="tanh")}


class MLP(nn.Module):
    """Gated MLP (SwiGLU for silu) with gate and up in one fused matmul."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.block.activation]
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor, lora: LoraSelector, layer: int) -> torch.Tensor:
        gate_up = _add(self.gate_up_proj(x), lora.delta("gate_up_proj", layer, x))  # [B, S, 2I]
        gate, up = gate_up.split([self.inter, self.inter], dim=-1)  # [B, S, I] each
        gate = _add(gate, lora.delta("gate_proj", layer, x))
        up = _add(up, lora.delta("up_proj", layer, x))
        h = self.act(gate) * up
        return _add(self.down_proj(h), lora.delta("down_proj", layer, h))


class DecoderLayer(nn.Module):
    """Pre-norm block; with ``sandwich_norms`` (Gemma) the attention and MLP outputs are normed too, and
    post_attention_layernorm is the attention's output norm, pre_feedforward_layernorm the MLP's input norm."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_layernorm = rms_norm(cfg, cfg.hidden_size)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = rms_norm(cfg, cfg.hidden_size)
        self.mlp = MLP(cfg)
        self.sandwich = cfg.block.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = rms_norm(cfg, cfg.hidden_size)
            self.post_feedforward_layernorm = rms_norm(cfg, cfg.hidden_size)

    def forward(self, h: torch.Tensor, rope: Rope, past_key: torch.Tensor, past_value: torch.Tensor,
                rows: torch.Tensor, bias: torch.Tensor, lora: LoraSelector, layer: int, dims: Dims
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn, present_k, present_v = self.self_attn(self.input_layernorm(h), rope, past_key, past_value,
                                                    rows, bias, lora, layer, dims)
        if self.sandwich:
            h = h + self.post_attention_layernorm(attn)
            h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h), lora, layer))
        else:
            h = h + attn
            h = h + self.mlp(self.post_attention_layernorm(h), lora, layer)
        return h, present_k, present_v
