"""The AI 100 graph's meaning in PyTorch, to check the written graph (and its cache operators) against.

services/compiler/ai100_writer.py writes the bundle graph node by node; this is the same computation as a
module over a materialised MultiLoraDecoder, with the com.qualcomm.cloud cache operators' semantics
(QEfficient's CtxScatter / CtxGather, out-of-range positions writing and reading nothing).
"""

from __future__ import annotations

import torch
from torch import nn

from services.compiler.ai100 import AI100_MASK_VALUE, INVALID_INDEX
from services.compiler.modeling.decoder import MultiLoraDecoder
from services.compiler.modeling.layers import Dims, LoraSelector


class _Op:
    """A cache operator: ``apply`` runs its PyTorch semantics."""

    @classmethod
    def apply(cls, *args):
        return cls.forward(None, *args)


def _in_range(index: torch.Tensor, size: int) -> torch.Tensor:
    return (index >= 0) & (index < size)


class CtxScatterCB(_Op):
    """data [F, H, C, D]; batch_index [B, 1]; position_ids [B, S]; updates [B, H, S, D] -> data with
    updates[b, :, s] at (batch_index[b], :, position_ids[b, s]); positions outside [0, C) write nothing."""

    @staticmethod
    def forward(ctx, data, batch_index, position_ids, updates):
        C = data.shape[2]
        scratch = torch.zeros_like(data[:, :, :1])
        ext = torch.cat([data, scratch], dim=2)  # [F, H, C+1, D]: index C is the scratch position
        pos = torch.where(_in_range(position_ids, C), position_ids, torch.full_like(position_ids, C))
        heads = torch.arange(data.shape[1]).view(1, -1, 1)
        ext[batch_index.view(-1, 1, 1), heads, pos.unsqueeze(1)] = updates
        return ext[:, :, :C]



class CtxGatherCB(_Op):
    """data [F, H, C, D]; batch_index [B, 1]; ctx_indices [B, 1, C] -> [B, H, C, D]: row b reads slot
    batch_index[b] at ctx_indices[b, 0, j]; an index outside [0, C) reads zero."""

    @staticmethod
    def forward(ctx, data, batch_index, ctx_indices):
        C = data.shape[2]
        valid = _in_range(ctx_indices, C)  # [B, 1, C]
        safe = torch.where(valid, ctx_indices, torch.zeros_like(ctx_indices))
        heads = torch.arange(data.shape[1]).view(1, -1, 1)
        out = data[batch_index.view(-1, 1, 1), heads, safe]  # [B, H, C, D]
        return torch.where(valid.unsqueeze(-1), out, torch.zeros((), dtype=data.dtype))



class CtxScatter(_Op):
    """data [B, H, C, D]; position_ids [B, S]; updates [B, H, S, D]: row b of the cache is row b; a
    negative position counts from the end (ONNX ScatterND's convention, as QEfficient relies on)."""

    @staticmethod
    def forward(ctx, data, position_ids, updates):
        C = data.shape[2]
        pos = torch.where(position_ids < 0, position_ids + C, position_ids)
        out = data.clone()
        rows = torch.arange(data.shape[0]).view(-1, 1, 1)
        heads = torch.arange(data.shape[1]).view(1, -1, 1)
        out[rows, heads, pos.unsqueeze(1)] = updates
        return out



class CtxGather(_Op):
    """data [B, H, C, D]; ctx_indices [B, 1, C] -> [B, H, C, D]; an index outside [0, C) reads zero."""

    @staticmethod
    def forward(ctx, data, ctx_indices):
        C = data.shape[2]
        valid = _in_range(ctx_indices, C)
        safe = torch.where(valid, ctx_indices, torch.zeros_like(ctx_indices))
        rows = torch.arange(data.shape[0]).view(-1, 1, 1)
        heads = torch.arange(data.shape[1]).view(1, -1, 1)
        out = data[rows, heads, safe]
        return torch.where(valid.unsqueeze(-1), out, torch.zeros((), dtype=data.dtype))





class Ai100Graph(nn.Module):
    """The decoder's weights and LoRA selection around a retained-state cache [rows, H, ctx_len, D]."""

    def __init__(self, decoder: MultiLoraDecoder, cb: bool):
        super().__init__()
        self.decoder = decoder
        self.cb = cb
        self.num_layers = decoder.cfg.num_layers
        self.modules_ = decoder.lora_modules

    def forward(self, input_ids, position_ids, lora_ids, *rest):
        dec = self.decoder
        L = self.num_layers
        if self.cb:
            batch_index, rest = rest[0], rest[1:]
        past_k, past_v = list(rest[0:2 * L:2]), list(rest[1:2 * L:2])
        banks = rest[2 * L:]
        lora_a = {m: banks[2 * i] for i, m in enumerate(self.modules_)}
        lora_b = {m: banks[2 * i + 1] for i, m in enumerate(self.modules_)}
        B, S = input_ids.shape
        C = past_k[0].shape[2]
        num_slots = next(iter(lora_a.values())).shape[1] if lora_a else 1
        h = dec.embed_tokens(input_ids)  # [B, S, hidden]
        rope = dec.rope(position_ids, h.dtype)
        dims = Dims(rows=B, tokens=S)
        lora = LoraSelector(lora_a, lora_b, lora_ids, num_slots)
        ctx = torch.arange(C).view(1, 1, C)
        # Reads: positions up to each row's largest one; the rest is INT32_MAX (read nothing).
        limit = position_ids.max(dim=1, keepdim=True).values.unsqueeze(1)  # [B, 1, 1]
        unread = ctx > limit  # [B, 1, C]
        ctx_indices = torch.where(unread, torch.full((), INVALID_INDEX, dtype=torch.int64), ctx)
        if self.cb:
            scatter_pos = torch.where(position_ids < 0, torch.full((), INVALID_INDEX, dtype=torch.int64),
                                      position_ids)
        visible = ctx <= position_ids.unsqueeze(-1)  # [B, S, C]: causal, padding sees nothing
        bias = torch.where(visible, torch.zeros((), dtype=h.dtype),
                           torch.full((), AI100_MASK_VALUE, dtype=h.dtype)).view(B, 1, 1, S, C)
        retained = []
        for i, layer in enumerate(dec.layers):
            attn = layer.self_attn
            q, k, v = attn.project_qkv(layer.input_layernorm(h), lora, i, rope, dims)
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, S, H, D] -> [B, H, S, D]
            if self.cb:
                cache_k = CtxScatterCB.apply(past_k[i], batch_index, scatter_pos, k)
                cache_v = CtxScatterCB.apply(past_v[i], batch_index, scatter_pos, v)
                keys = CtxGatherCB.apply(cache_k, batch_index, ctx_indices)  # [B, H, C, D]
                values = CtxGatherCB.apply(cache_v, batch_index, ctx_indices)
            else:
                cache_k = CtxScatter.apply(past_k[i], position_ids, k)
                cache_v = CtxScatter.apply(past_v[i], position_ids, v)
                keys = CtxGather.apply(cache_k, ctx_indices)
                values = CtxGather.apply(cache_v, ctx_indices)
            values = torch.where(unread.unsqueeze(-1), torch.zeros((), dtype=values.dtype), values)
            out = attn.attend(q, keys, values, bias, dims)
            h = h + attn.output(out, lora, i)
            h = h + layer.mlp(layer.post_attention_layernorm(h), lora, i)
            retained += [cache_k, cache_v]
        # QEfficient's logit index: the position of each row's largest position id.
        idx = position_ids.argmax(dim=1).view(B, 1, 1).expand(B, 1, h.shape[-1])  # [B, 1, hidden]
        return (dec.logits_from_hidden(torch.gather(h, 1, idx)), *retained)
