"""Building blocks of the multi-LoRA decoder: RMSNorm, per-row LoRA selection, attention, SwiGLU.

Shape letters as in loraflow/graph_contract.py: B rows, S new tokens, P past tokens, H KV heads,
G query heads per KV head, D head_dim, L layers, N adapter slots + 1, R max_rank.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from services.compiler.modeling.config import DecoderConfig
from services.compiler.modeling.rope import apply_rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 like HF, so fp16 graphs do not overflow the mean of squares.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class LoraSelector:
    """Picks each row's adapter from the banks: a gather of B slices, O(rows) not O(slots).

    banks_a[m] [L, N, in, R], banks_b[m] [L, N, R, out]; lora_ids [B, 1].
    """

    def __init__(self, banks_a: dict[str, torch.Tensor], banks_b: dict[str, torch.Tensor],
                 lora_ids: torch.Tensor, num_slots: int):
        self.banks_a = banks_a
        self.banks_b = banks_b
        self.num_slots = num_slots
        self.rows = lora_ids.reshape(-1)  # [B, 1] -> [B]

    def delta(self, module: str, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """x [B, S, in] -> x A B [B, S, out] for each row's adapter; None if `module` is not adapted."""
        bank_a = self.banks_a.get(module)
        if bank_a is None:
            return None
        bank_b = self.banks_b[module]
        index = self.rows + layer * self.num_slots  # [B] flat index into the [L*N, ...] views
        a = bank_a.flatten(0, 1)[index]  # [L, N, in, R] -> [L*N, in, R] -> [B, in, R]
        b = bank_b.flatten(0, 1)[index]  # [L, N, R, out] -> [L*N, R, out] -> [B, R, out]
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
        self.scale = cfg.head_dim ** -0.5

    def project_qkv(self, x: torch.Tensor, lora: LoraSelector, layer: int, cos: torch.Tensor, sin: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, S, hidden] -> q [B, S, Hq, D], k [B, S, H, D] (both after RoPE), v [B, S, H, D]."""
        B, S, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = _add(q, lora.delta("q_proj", layer, x))
        k = _add(k, lora.delta("k_proj", layer, x))
        v = _add(v, lora.delta("v_proj", layer, x))
        q = q.view(B, S, self.num_heads, self.head_dim)  # [B, S, Hq*D] -> [B, S, Hq, D]
        k = k.view(B, S, self.num_kv_heads, self.head_dim)  # [B, S, H*D] -> [B, S, H, D]
        v = v.view(B, S, self.num_kv_heads, self.head_dim)  # [B, S, H*D] -> [B, S, H, D]
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """q [B, S, Hq, D]; keys/values [B, H, T, D]; bias [B, 1, 1, S, T] -> [B, S, Hq*D].

        Query heads are grouped per KV head (HF's repeat_kv order: query head = kv_head*G + g), so
        K/V are never repeated.
        """
        B, S, _, D = q.shape
        H, G = self.num_kv_heads, self.num_heads // self.num_kv_heads
        T = keys.shape[2]
        qg = q.view(B, S, H, G, D).permute(0, 2, 3, 1, 4)  # [B, S, Hq, D] -> [B, H, G, S, D]
        qg = qg.reshape(B, H, G * S, D)  # [B, H, G, S, D] -> [B, H, G*S, D]
        scores = torch.matmul(qg, keys.transpose(2, 3)) * self.scale  # [B, H, G*S, T]
        scores = scores.view(B, H, G, S, T) + bias  # [B, H, G*S, T] -> [B, H, G, S, T]
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        probs = probs.view(B, H, G * S, T)  # [B, H, G, S, T] -> [B, H, G*S, T]
        out = torch.matmul(probs, values)  # [B, H, G*S, D]
        out = out.view(B, H, G, S, D).permute(0, 3, 1, 2, 4)  # [B, H, G*S, D] -> [B, S, H, G, D]
        return out.reshape(B, S, self.num_heads * D)  # [B, S, H, G, D] -> [B, S, Hq*D]

    def output(self, attn: torch.Tensor, lora: LoraSelector, layer: int) -> torch.Tensor:
        return _add(self.o_proj(attn), lora.delta("o_proj", layer, attn))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past_key: torch.Tensor,
                past_value: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor, lora: LoraSelector, layer: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Time-major cache: past [P, F, H, D]; returns (out [B, S, hidden], present k/v [S, B, H, D])."""
        q, k, v = self.project_qkv(x, lora, layer, cos, sin)
        present_k = k.transpose(0, 1)  # [B, S, H, D] -> [S, B, H, D]
        present_v = v.transpose(0, 1)  # [B, S, H, D] -> [S, B, H, D]
        # Only this call's rows of the cache, and only its first P positions.
        keys = torch.cat([past_key[:, rows], present_k], dim=0)  # [P, B, H, D] ++ [S, B, H, D] -> [T, B, H, D]
        values = torch.cat([past_value[:, rows], present_v], dim=0)  # [T, B, H, D]
        keys = keys.permute(1, 2, 0, 3)  # [T, B, H, D] -> [B, H, T, D]
        values = values.permute(1, 2, 0, 3)  # [T, B, H, D] -> [B, H, T, D]
        out = self.attend(q, keys, values, bias)
        return self.output(out, lora, layer), present_k, present_v


class MLP(nn.Module):
    """SwiGLU with gate and up in one fused matmul."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor, lora: LoraSelector, layer: int) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split([self.inter, self.inter], dim=-1)  # [B, S, I] each
        gate = _add(gate, lora.delta("gate_proj", layer, x))
        up = _add(up, lora.delta("up_proj", layer, x))
        h = F.silu(gate) * up
        return _add(self.down_proj(h), lora.delta("down_proj", layer, h))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past_key: torch.Tensor,
                past_value: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor, lora: LoraSelector, layer: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn, present_k, present_v = self.self_attn(self.input_layernorm(h), cos, sin, past_key, past_value,
                                                    rows, bias, lora, layer)
        h = h + attn
        h = h + self.mlp(self.post_attention_layernorm(h), lora, layer)
        return h, present_k, present_v
