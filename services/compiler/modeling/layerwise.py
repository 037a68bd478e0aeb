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

from loraflow import graph_contract as gc
from services.compiler.modeling.config import DecoderConfig
from services.compiler.modeling.decoder import attention_bias
from services.compiler.modeling.layers import DecoderLayer, Dims, LoraSelector, RMSNorm
from services.compiler.modeling.rope import Rope, inverse_frequencies, rope_cos_sin, rotate_half_matrix
from services.compiler.modeling.weights import EMBED, FINAL_NORM, LM_HEAD, WeightSource, layer_names

# Vocabulary rows of the head converted and multiplied at a time (bounds the head's memory at 7B).
HEAD_CHUNK_ROWS = 8192


@dataclass(frozen=True)
class Variant:
    """One model the reference computes: where its weights come from, and in which precision."""

    source: WeightSource
    dtype: torch.dtype = torch.float32


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


def _layer_module(cfg: DecoderConfig, i: int, weights: Mapping[str, torch.Tensor], dtype: torch.dtype) -> DecoderLayer:
    with torch.device("meta"):
        layer = DecoderLayer(cfg)
    prefix = f"layers.{i}."
    layer.load_state_dict({k.removeprefix(prefix): v.to(dtype) for k, v in weights.items()}, strict=True,
                          assign=True)
    return layer.eval()


def reference_logits(variants: Mapping[str, Variant], rows: Sequence[ReferenceRow], banks: Mapping[str, np.ndarray],
                     lora_modules: Sequence[str], *, on_layer: LayerHook | None = None
                     ) -> dict[str, ReferenceResult]:
    """Logits of every row's every position for each variant (by label). ``banks``: [L, N, in, R] /
    [L, N, R, out] float arrays by graph input name for the adapted ``lora_modules``."""
    first = next(iter(variants.values()))
    cfg = first.source.cfg
    sources = list(dict.fromkeys(v.source for v in variants.values()))  # each read once per layer
    head_name = EMBED if cfg.tie_word_embeddings else LM_HEAD

    def load(names) -> dict[WeightSource, dict[str, torch.Tensor]]:
        weights = {src: {n: src.get(n) for n in names} for src in sources}
        if on_layer is not None:
            on_layer(weights)
        return weights

    with torch.no_grad():
        state = {label: _Run(cfg, v, rows, banks, lora_modules) for label, v in variants.items()}
        embeds = load([EMBED])
        for label, v in variants.items():
            emb = embeds[v.source][EMBED]
            state[label].hidden = [emb[list(r.tokens)].to(v.dtype).unsqueeze(0) for r in rows]  # [1, T, hidden]
        del embeds, emb
        for i in range(cfg.num_layers):
            weights = load(layer_names(cfg, i))
            for label, v in variants.items():
                layer = _layer_module(cfg, i, weights[v.source], v.dtype)
                state[label].apply(layer, i)
                del layer
            del weights
        last = load(dict.fromkeys([FINAL_NORM, head_name]))
        return {label: state[label].finish(last[v.source][FINAL_NORM], last[v.source][head_name])
                for label, v in variants.items()}


class _Run:
    """One variant's activations as the layers go by."""

    def __init__(self, cfg: DecoderConfig, variant: Variant, rows: Sequence[ReferenceRow],
                 banks: Mapping[str, np.ndarray], lora_modules: Sequence[str]):
        self.cfg, self.dtype = cfg, variant.dtype
        dtype = variant.dtype
        # float32 angles as MultiLoraDecoder computes them; float64 ones for a float64 variant.
        inv_freq = inverse_frequencies(cfg).to(torch.float64 if dtype == torch.float64 else torch.float32)
        rotate = rotate_half_matrix(cfg.head_dim).to(dtype)
        self.calls = []
        lora_a = {m: torch.from_numpy(np.asarray(banks[gc.lora_a(m)])).to(dtype) for m in lora_modules}
        lora_b = {m: torch.from_numpy(np.asarray(banks[gc.lora_b(m)])).to(dtype) for m in lora_modules}
        num_slots = next(iter(lora_a.values())).shape[1] if lora_a else 1
        for r in rows:
            positions = torch.arange(len(r.tokens)).view(1, -1)  # [1, T]
            cos, sin = rope_cos_sin(positions, inv_freq, dtype)
            shape = (1, 1, cfg.num_kv_heads, cfg.head_dim)  # an empty past: one masked position
            self.calls.append(dict(
                rope=Rope(cos=cos, sin=sin, rotate=rotate), past=torch.zeros(shape, dtype=dtype),
                bias=attention_bias(positions, 1, dtype), lora=LoraSelector(lora_a, lora_b, torch.tensor([[r.lora_id]]),
                                                                           num_slots),
                dims=Dims(rows=1, tokens=len(r.tokens), past=1)))
        self.hidden: list[torch.Tensor] = []
        self.max_activation = 0.0

    def apply(self, layer: DecoderLayer, i: int) -> None:
        rows = torch.zeros(1, dtype=torch.long)
        for j, call in enumerate(self.calls):
            h, _, _ = layer(self.hidden[j], call["rope"], call["past"], call["past"], rows, call["bias"], call["lora"],
                            i, call["dims"])
            self.hidden[j] = h
            self.max_activation = max(self.max_activation, float(h.abs().max()))

    def finish(self, norm_weight: torch.Tensor, head: torch.Tensor) -> ReferenceResult:
        norm = RMSNorm(self.cfg.hidden_size, self.cfg.rms_norm_eps)
        norm.weight = torch.nn.Parameter(norm_weight.to(self.dtype), requires_grad=False)
        normed = [norm(h)[0] for h in self.hidden]  # [T, hidden] each
        logits = [torch.empty(h.shape[0], head.shape[0], dtype=torch.float32) for h in normed]
        for start in range(0, head.shape[0], HEAD_CHUNK_ROWS):
            chunk = head[start:start + HEAD_CHUNK_ROWS].to(self.dtype)  # [v, hidden]
            for out, h in zip(logits, normed, strict=True):
                out[:, start:start + chunk.shape[0]] = (h @ chunk.T).float()  # [T, hidden] @ [hidden, v]
        return ReferenceResult(logits=[x.numpy() for x in logits], max_activation=self.max_activation)
