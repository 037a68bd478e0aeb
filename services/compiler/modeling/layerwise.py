"""The PyTorch reference run layer by layer, with one layer's weights resident at a time.

Verification compares an artifact with the decoder on a handful of short sequences. Instead of a
materialised model, every sequence is embedded, then each layer is built from its weight source (on the
meta device, its tensors assigned), applied to every sequence and released; the final norm and the head
come last, the head a slice of the vocabulary at a time. Peak memory is one layer per model computed
plus the activations of the sequences.

Several models can be computed in the same pass (``Variant``s): e.g. the float32 decoder and the same
weights in float64, whose difference measures the float32 accumulation error of this model on these
sequences (verify.py's tolerance follows it), or a quantised artifact's read-back weights beside the
checkpoint's. Sources shared by variants are read once per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from loraflow.artifact import graph_contract as gc
from services.compiler.modeling.buffer_pool import BufferPool
from services.compiler.modeling.config import DecoderConfig
from services.compiler.modeling.decoder import attention_bias, embed
from services.compiler.modeling.layers import DecoderLayer, Dims, LoraSelector, rms_norm, soft_cap
from services.compiler.modeling.rope import (
    Rope,
    inverse_frequencies,
    rope_cos_sin,
    rotate_half_matrix,
    uses_local_rope,
)
from services.compiler.modeling.weights import EMBED, FINAL_NORM, LM_HEAD, WeightSource, layer_names

# Vocabulary rows of the head converted and multiplied at a time (bounds the head's memory at 7B).
HEAD_CHUNK_ROWS = 8192
# Below this many weights per matrix the reference runs on one thread: splitting a small matmul costs more
# than it saves (measured 2.5 ms per [12, 128] @ [128, 256] on 2 threads of a loaded 2-core host, 0.1 ms on one).
ONE_THREAD_BELOW = 1 << 22


@dataclass(frozen=True)
class Variant:
    """One model the reference computes: where its weights come from, and in which precision.

    ``activation_block``: the base projections' (and the head's) inputs are rounded to int8 per block of that
    many values first, as MatMulNBits does at accuracy level 4 (ONNX Runtime's MLAS: per block of the weights'
    block size, scale max|x| / 127, round to nearest even), so the reference computes what the int8-activation
    kernel computes and the check of a quantised graph stays tight. The LoRA deltas see the unrounded input,
    as in the graph.

    ``rows``: the indices of the rows this variant computes (None: every row); its result lists only those."""

    source: WeightSource
    dtype: torch.dtype = torch.float32
    activation_block: int | None = None
    rows: tuple[int, ...] | None = None


def round_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """x [..., K] with every block of ``block`` values along K rounded to int8 (scale max|x| / 127), as MLAS
    quantises a MatMulNBits input at accuracy level 4; K is a whole number of blocks."""
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)  # [..., K] -> [..., K/block, block]
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(amax != 0, 127.0 / amax, torch.zeros((), dtype=x.dtype))
    return (torch.round(blocks * inverse) * (amax / 127.0)).reshape(x.shape)  # round: to nearest even, as MLAS


class _RoundedInput(torch.nn.Module):
    """A base projection whose input is rounded to int8 per block first (see Variant.activation_block)."""

    def __init__(self, linear: torch.nn.Linear, block: int):
        super().__init__()
        self.linear, self.block = linear, block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(round_activations(x, self.block))


@dataclass(frozen=True)
class ReferenceRow:
    """A sequence run from an empty cache with adapter slot ``lora_id`` (0 = base model)."""

    tokens: tuple[int, ...]
    lora_id: int


@dataclass(frozen=True)
class ReferenceResult:
    logits: list[np.ndarray]  # per row: [len(tokens), V] float32 (every position)
    max_activation: float  # largest |h| in the residual stream, any layer, any row


# Called with every group of weights as it is loaded (the embedding, each layer, the final norm and head):
# {source: {name: tensor}}; e.g. checks read-back weights against the checkpoint's.
LayerHook = Callable[[Mapping[WeightSource, Mapping[str, torch.Tensor]]], None]


def _layer_module(cfg: DecoderConfig, i: int, weights: Mapping[str, torch.Tensor], variant: Variant,
                  buffers: BufferPool) -> tuple[DecoderLayer, list[torch.Tensor]]:
    """Layer ``i`` of ``variant`` over ``weights``, and the converted copies it holds (taken from ``buffers``:
    the caller gives them back once the layer is done)."""
    with torch.device("meta"):
        layer = DecoderLayer(cfg)
    prefix = f"layers.{i}."
    converted, state = [], {}
    for k, v in weights.items():
        if v.dtype != variant.dtype:  # e.g. float64: into the buffer the previous layer's same-sized weight used
            v = buffers.take(v.shape, variant.dtype).copy_(v)
            converted.append(v)
        state[k.removeprefix(prefix)] = v
    layer.load_state_dict(state, strict=True, assign=True)
    if variant.activation_block:
        block = variant.activation_block
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj, attn.o_proj = _RoundedInput(attn.qkv_proj, block), _RoundedInput(attn.o_proj, block)
        mlp.gate_up_proj, mlp.down_proj = _RoundedInput(mlp.gate_up_proj, block), _RoundedInput(mlp.down_proj, block)
    return layer.eval(), converted


def reference_logits(variants: Mapping[str, Variant], rows: Sequence[ReferenceRow], banks: Mapping[str, np.ndarray],
                     lora_modules: Sequence[str], *, on_layer: LayerHook | None = None
                     ) -> dict[str, ReferenceResult]:
    """Logits of every row's every position for each variant (by label). ``banks``: [L, N, in, R] /
    [L, N, R, out] float arrays by graph input name for the adapted ``lora_modules``."""
    cfg = next(iter(variants.values())).source.cfg
    sources = list(dict.fromkeys(v.source for v in variants.values()))  # each read once per layer

    # Every layer has the same shapes: each read and conversion reuses the previous layer's buffers. (The
    # embedding and the head are read once, outside it: an idle buffer of their size would outlive its use.)
    buffers = BufferPool()

    def load(names) -> dict[WeightSource, dict[str, torch.Tensor]]:
        pool = buffers if all(n.startswith("layers.") for n in names) else None
        weights = {src: {n: src.get(n, pool) for n in names} for src in sources}
        if on_layer is not None:
            on_layer(weights)
        return weights

    threads = torch.get_num_threads()
    if cfg.hidden_size * cfg.intermediate_size < ONE_THREAD_BELOW:
        torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return _layer_by_layer(cfg, variants, rows, banks, lora_modules, load, buffers)
    finally:
        torch.set_num_threads(threads)


def _layer_by_layer(cfg: DecoderConfig, variants: Mapping[str, Variant], rows: Sequence[ReferenceRow],
                    banks: Mapping[str, np.ndarray], lora_modules: Sequence[str], load,
                    buffers: BufferPool) -> dict[str, ReferenceResult]:
    state = {label: _Batches(cfg, v, rows if v.rows is None else [rows[j] for j in v.rows], banks, lora_modules)
             for label, v in variants.items()}
    embeds = load([EMBED])
    for label, v in variants.items():
        state[label].embed(embeds[v.source][EMBED])
    del embeds
    for i in range(cfg.num_layers):
        weights = load(layer_names(cfg, i))
        for label, v in variants.items():
            layer, converted = _layer_module(cfg, i, weights[v.source], v, buffers)
            state[label].apply(layer, i)
            del layer
            for t in converted:
                buffers.give_back(t)
        for tensors in weights.values():
            for t in tensors.values():
                buffers.give_back(t)  # a source's own fresh tensor is not the pool's: left alone
        del weights
    buffers.clear()  # the head is other shapes
    head_name = EMBED if cfg.tie_word_embeddings else LM_HEAD
    last = load(dict.fromkeys([FINAL_NORM, head_name]))
    return {label: state[label].finish(last[v.source][FINAL_NORM], last[v.source][head_name])
            for label, v in variants.items()}


# Rows share a padded batch when the shorter is at least this share of the batch's longest: a layer is one
# call per batch, and the padding's tokens are computed too (the scenario's 14, 9, 8 and 8 tokens: 41 token
# rows in two batches instead of 56 in one).
BATCH_FILL = 0.75


def length_batches(lengths: Sequence[int]) -> list[list[int]]:
    """Row indices grouped into batches, longest first, a row joining the batch before it when at least
    BATCH_FILL of that batch's longest."""
    batches: list[list[int]] = []
    for j in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        if batches and lengths[j] >= BATCH_FILL * lengths[batches[-1][0]]:
            batches[-1].append(j)
        else:
            batches.append([j])
    return batches


class _Batches:
    """One variant's rows in length_batches, each a _Run; results back in row order."""

    def __init__(self, cfg: DecoderConfig, variant: Variant, rows: Sequence[ReferenceRow],
                 banks: Mapping[str, np.ndarray], lora_modules: Sequence[str]):
        self.count = len(rows)
        self.runs = [(batch, _Run(cfg, variant, [rows[j] for j in batch], banks, lora_modules))
                     for batch in length_batches([len(r.tokens) for r in rows])]

    def embed(self, table: torch.Tensor) -> None:
        for _, run in self.runs:
            run.embed(table)

    def apply(self, layer: DecoderLayer, i: int) -> None:
        for _, run in self.runs:
            run.apply(layer, i)

    def finish(self, norm_weight: torch.Tensor, head: torch.Tensor) -> ReferenceResult:
        logits: list[np.ndarray] = [np.empty(0)] * self.count
        top = 0.0
        for batch, run in self.runs:
            got = run.finish(norm_weight, head)
            for j, row_logits in zip(batch, got.logits, strict=True):
                logits[j] = row_logits
            top = max(top, got.max_activation)
        return ReferenceResult(logits=logits, max_activation=top)


class _Run:
    """One variant's activations as the layers go by: every row in one batch [R, T] (the shorter rows padded
    at the end with position -1, which nothing attends), so a layer is one call however many rows there are."""

    def __init__(self, cfg: DecoderConfig, variant: Variant, rows: Sequence[ReferenceRow],
                 banks: Mapping[str, np.ndarray], lora_modules: Sequence[str]):
        self.cfg, self.dtype, self.activation_block = cfg, variant.dtype, variant.activation_block
        dtype = variant.dtype
        # float32 angles as MultiLoraDecoder computes them; float64 ones for a float64 variant.
        angle_t = torch.float64 if dtype == torch.float64 else torch.float32
        lora_a = {m: torch.from_numpy(np.asarray(banks[gc.lora_a(m)])).to(dtype) for m in lora_modules}
        lora_b = {m: torch.from_numpy(np.asarray(banks[gc.lora_b(m)])).to(dtype) for m in lora_modules}
        num_slots = next(iter(lora_a.values())).shape[1] if lora_a else 1
        self.lengths = [len(r.tokens) for r in rows]
        R, T = len(rows), max(self.lengths)
        self.tokens = torch.zeros(R, T, dtype=torch.long)
        positions = torch.full((R, T), -1, dtype=torch.long)  # [R, T]: -1 = padding
        for j, r in enumerate(rows):
            self.tokens[j, :len(r.tokens)] = torch.tensor(r.tokens)
            positions[j, :len(r.tokens)] = torch.arange(len(r.tokens))
        rotate = rotate_half_matrix(cfg.head_dim).to(dtype)
        ropes = {}
        for local in (False, True) if cfg.local_rope_layers else (False,):
            cos, sin = rope_cos_sin(positions, inverse_frequencies(cfg, local).to(angle_t), dtype)  # [R, T, 1, D]
            ropes[local] = Rope(cos=cos, sin=sin, rotate=rotate)
        self.ropes = ropes
        self.past = torch.zeros(1, R, cfg.num_kv_heads, cfg.head_dim, dtype=dtype)  # an empty past: masked
        self.bias = attention_bias(positions, 1, dtype)  # [R, 1, 1, T, 1 + T]
        self.lora = LoraSelector(lora_a, lora_b, torch.tensor([[r.lora_id] for r in rows]), num_slots)
        self.slots = torch.arange(R)
        self.dims = Dims(rows=R, tokens=T, past=1)
        self.hidden = torch.empty(0)
        self.max_activation = 0.0

    def embed(self, table: torch.Tensor) -> None:
        self.hidden = embed(table, self.tokens, self.cfg).to(self.dtype)  # [R, T, hidden]

    def apply(self, layer: DecoderLayer, i: int) -> None:
        rope = self.ropes[uses_local_rope(self.cfg, i)]
        self.hidden, _, _ = layer(self.hidden, rope, self.past, self.past, self.slots, self.bias, self.lora, i,
                                  self.dims)
        real = torch.cat([self.hidden[j, :n] for j, n in enumerate(self.lengths)])  # padding excluded
        self.max_activation = max(self.max_activation, float(real.abs().max()))

    def finish(self, norm_weight: torch.Tensor, head: torch.Tensor) -> ReferenceResult:
        norm = rms_norm(self.cfg, self.cfg.hidden_size)
        norm.weight = torch.nn.Parameter(norm_weight.to(self.dtype), requires_grad=False)
        normed = torch.cat([norm(self.hidden[j, :n]) for j, n in enumerate(self.lengths)])  # [sum T, hidden]
        if self.activation_block:  # the head is a MatMulNBits too
            normed = round_activations(normed, self.activation_block)
        logits = torch.empty(normed.shape[0], head.shape[0], dtype=torch.float32)
        for start in range(0, head.shape[0], HEAD_CHUNK_ROWS):
            chunk = head[start:start + HEAD_CHUNK_ROWS].to(self.dtype)  # [v, hidden]
            chunk_logits = soft_cap(normed @ chunk.T, self.cfg.final_logit_softcap)  # [sum T, hidden] @ [hidden, v]
            logits[:, start:start + chunk.shape[0]] = chunk_logits.float()
        per_row = torch.split(logits, self.lengths)  # [sum T, V] -> [T_j, V] per row
        return ReferenceResult(logits=[x.numpy() for x in per_row], max_activation=self.max_activation)
