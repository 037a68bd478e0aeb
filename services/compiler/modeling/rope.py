"""Rotary position embeddings: inverse frequencies per rope type, and the rotation itself.

cos/sin are computed from ``position_ids`` inside the graph (O(B*S*D)), so no table of
max_position_embeddings rows is stored or sliced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from services.compiler.modeling.config import DecoderConfig


def inverse_frequencies(cfg: DecoderConfig, local: bool = False) -> torch.Tensor:
    """float32 [head_dim / 2], following transformers' rope init for default, linear and llama3; ``local``: the
    default rope of base ``local_rope_theta`` Gemma 3's sliding layers rotate with."""
    dim = cfg.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if local:
        return 1.0 / (cfg.local_rope_theta ** exponents)
    inv_freq = 1.0 / (cfg.rope_theta ** exponents)
    scaling = cfg.rope_scaling
    kind = cfg.rope_type
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", cfg.max_position_embeddings))
        low_wavelen = old_ctx / low
        high_wavelen = old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between smoothed.
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope type {kind!r}")  # DecoderConfig already rejected it


def rotate_half_matrix(dim: int) -> torch.Tensor:
    """[D, D] with x @ M == cat(-x[..., D/2:], x[..., :D/2]): one MatMul instead of slices + neg + concat."""
    half = dim // 2
    m = torch.zeros(dim, dim)
    idx = torch.arange(half)
    m[idx + half, idx] = -1.0
    m[idx, idx + half] = 1.0
    return m


def uses_local_rope(cfg: DecoderConfig, layer: int) -> bool:
    """Whether layer ``layer`` rotates with the local rope (Gemma 3's sliding layers)."""
    return layer in cfg.local_rope_layers


@dataclass(frozen=True)
class Rope:
    """cos/sin [B, S, 1, D] for this call's positions and the rotate-half matrix [D, D]."""

    cos: torch.Tensor
    sin: torch.Tensor
    rotate: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, H, D] rotated by the half-split convention HF Llama uses."""
        return x * self.cos + torch.matmul(x, self.rotate) * self.sin


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, S, 1, D] for positions [B, S] (padding -1 is clamped: its output is unused)."""
    pos = position_ids.clamp(min=0).to(torch.float32)
    freqs = pos.unsqueeze(-1) * inv_freq  # [B, S, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [B, S, D]
    return emb.cos().to(dtype).unsqueeze(2), emb.sin().to(dtype).unsqueeze(2)  # [B, S, 1, D]
