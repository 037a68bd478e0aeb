"""Writes the AI 100 bundle's graph node by node from a WeightSource, one tensor at a time.

The graph is the one QEfficient hands to qaic-exec (services/compiler/ai100.py has its IO and the
com.qualcomm.cloud cache operators): a retained-state KV cache [rows, H, ctx_len, D] per layer written and
read by CtxScatter(CB) / CtxGather(CB), position_ids driving RoPE and the causal mask, per-row LoRA
gathered from the bank inputs, logits at each row's largest position. Every node is standard ONNX or one
of those functions, so ONNX Runtime runs the very file the card compiles.

Weights are fp32 or fp16 (``dtype``); with fp16 the whole graph computes in fp16, as the card does after
-convert-to-fp16, except RMSNorm's mean of squares and the softmax, which run in float32 like the PyTorch
decoder's. The IO stays float32 either way (Casts at the edges; qaic-exec's custom IO makes the KV cache
fp16 on the card), so the runtime's contract does not depend on the weights' dtype.

The residual stream between layers is named ``hidden.{i}`` (the input of layer i; ``hidden.{L}`` after the
last), so verification can run the graph one layer at a time (services/compiler/ai100_verify.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from loraflow.artifact import graph_contract as gc
from loraflow.artifact.manifest import GraphSpec, LoraModuleSpec
from loraflow.errors import InvalidArgument
from services.compiler import ai100
from services.compiler.fused.builder import ExternalData, _Graph
from services.compiler.modeling.weights import EMBED, FINAL_NORM, LM_HEAD, WeightSource

DTYPES = {"fp32": (TensorProto.FLOAT, np.float32), "fp16": (TensorProto.FLOAT16, np.float16)}


def hidden_name(i: int) -> str:
    """The residual stream entering layer ``i`` (``i`` = layers: after the last one)."""
    return f"hidden.{i}"


@dataclass(frozen=True)
class Ai100Export:
    graph: GraphSpec
    digests: dict[str, str]  # file name -> sha256 of the files written (hashed while writing)


class Ai100GraphWriter:
    """The bundle graph from ``weights``; large initializers go straight to ``external``."""

    def __init__(self, weights: WeightSource, *, lora_modules: Sequence[str], num_slots: int, max_rank: int,
                 cb: bool, dtype: str, external: ExternalData | None):
        if dtype not in DTYPES:
            raise InvalidArgument(f"options.dtype={dtype!r}: an ai100 bundle holds {list(DTYPES)} weights",
                                  field="options.dtype", value=dtype)
        self.weights, self.cfg = weights, weights.cfg
        self.lora_modules = tuple(lora_modules)
        self.num_slots, self.max_rank, self.cb = num_slots, max_rank, cb
        self.t, self.np_t = DTYPES[dtype]
        self.g = _Graph(external=external)
        self._n = 0

    # --- helpers ------------------------------------------------------------------------------
    def _node(self, op: str, inputs: list[str], name: str, outputs: list[str] | int = 1, **attrs) -> list[str]:
        return self.g.node(op, inputs, outputs, name=name, **attrs)

    def _one(self, op: str, inputs: list[str], name: str, out: str | None = None, **attrs) -> str:
        (y,) = self._node(op, inputs, name, [out] if out else 1, **attrs)
        return y

    def _ints(self, name: str, values: Sequence[int]) -> str:
        return self.g.const(name, np.array(list(values), np.int64))

    def _scalar(self, name: str, value: float) -> str:
        return self.g.const(name, np.array(value, self.np_t))

    def _tensor(self, name: str, transpose: bool = False, dtype=None) -> Callable[[], np.ndarray]:
        """A thunk reading one tensor in the graph's dtype (or ``dtype``); a linear's weight as [in, out] with
        ``transpose``."""
        def read() -> np.ndarray:
            w = self.weights.get(name)
            if transpose:
                w = w.t().contiguous()  # [out, in] -> [in, out] (x @ W)
            return w.numpy().astype(dtype or self.np_t, copy=False)
        return read

    def _to_t(self, x: str, name: str) -> str:
        return x if self.t == TensorProto.FLOAT else self._one("Cast", [x], name, to=self.t)

    def _to_float(self, x: str, name: str, out: str | None = None) -> str:
        """x as float32 (named ``out`` when given: a graph output)."""
        if self.t == TensorProto.FLOAT:
            return x if out is None else self._one("Identity", [x], name, out)
        return self._one("Cast", [x], name, out, to=TensorProto.FLOAT)

    # --- pieces ---------------------------------------------------------------------------------
    def _rms_norm(self, x: str, weight: str, name: str) -> str:
        """weight * x / sqrt(mean(x^2) + eps), the mean in float32 (fp16 squares overflow at real scales)."""
        xf = self._to_float(x, f"{name}/to_float")
        sq = self._one("Mul", [xf, xf], f"{name}/square")
        mean = self._one("ReduceMean", [sq], f"{name}/mean", axes=[-1], keepdims=1)  # opset 17: axes attribute
        eps = self.g.const(f"{name}.eps", np.array(self.cfg.rms_norm_eps, np.float32))
        rms = self._one("Sqrt", [self._one("Add", [mean, eps], f"{name}/add_eps")], f"{name}/sqrt")
        inv = self._one("Reciprocal", [rms], f"{name}/inv")
        normed = self._one("Mul", [xf, inv], f"{name}/scale")
        offset = self.cfg.block.norm_offset
        if offset:  # Gemma: (x * (1 + w)) in float32, then the graph's dtype (HF's order); the Add folds
            scale = self._one("Add", [self.g.const(weight, self._tensor(weight, dtype=np.float32)),
                                      self.g.const("norm.offset", np.array(offset, np.float32))], f"{name}/offset")
            return self._to_t(self._one("Mul", [normed, scale], f"{name}/weight"), f"{name}/to_t")
        normed = self._to_t(normed, f"{name}/to_t")
        return self._one("Mul", [self.g.const(weight, self._tensor(weight)), normed], f"{name}/weight")

    def _linear(self, x: str, weight: str, bias: str | None, name: str) -> str:
        y = self._one("MatMul", [x, self.g.const(f"{name}.weight", self._tensor(weight, transpose=True))], name)
        if bias is not None:
            y = self._one("Add", [y, self.g.const(f"{name}.bias", self._tensor(bias))], f"{name}/bias")
        return y

    def _delta(self, module: str, x: str, layer: int, name: str) -> str | None:
        """x [B, S, in] -> x A_row B_row [B, S, out] from each row's slot of the flat banks; None if not adapted."""
        if module not in self.lora_modules:
            return None
        row = self._one("Add", [self.lora_rows, self._ints(f"layers.{layer}.bank_offset", [layer * self.num_slots])],
                        f"{name}/lora/rows")  # [B]: layer * N + lora_ids
        a = self._one("Gather", [self.flat_a[module], row], f"{name}/lora/gather_a", axis=0)  # [B, in, R]
        b = self._one("Gather", [self.flat_b[module], row], f"{name}/lora/gather_b", axis=0)  # [B, R, out]
        xa = self._one("MatMul", [x, a], f"{name}/lora/xa")  # [B, S, R]
        return self._one("MatMul", [xa, b], f"{name}/lora/xab")  # [B, S, out]

    def _adapted(self, y: str, module: str, x: str, layer: int, name: str) -> str:
        delta = self._delta(module, x, layer, name)
        return y if delta is None else self._one("Add", [y, delta], f"{name}/lora/add")

    def _rope(self, x: str, name: str, layer: int) -> str:
        """x [B, S, heads, D] * cos + (x @ rotate_half) * sin, cos/sin [B, S, 1, D] (layer's rope: global or local)."""
        cos, sin = self.rope_tables[layer in self.cfg.local_rope_layers]
        rotated = self._one("MatMul", [x, self.rotate], f"{name}/rotate")
        return self._one("Add", [self._one("Mul", [x, cos], f"{name}/cos"),
                                 self._one("Mul", [rotated, sin], f"{name}/sin")], f"{name}/rope")

    # --- the graph ------------------------------------------------------------------------------
    def _prologue(self) -> None:
        """What every layer shares: RoPE cos/sin, read indices and masks, flat banks."""
        from services.compiler.modeling.rope import inverse_frequencies, rotate_half_matrix

        cfg, g = self.cfg, self.g
        D, G = cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
        # RoPE from position_ids (padding -1 clamped; its output is unused), float32 angles as in PyTorch.
        pos = self._one("Cast", [self._one("Max", [gc.POSITION_IDS, self._ints("zero.i64", [0])], "rope/clamp")],
                        "rope/pos", to=TensorProto.FLOAT)  # [B, S]
        pos = self._one("Unsqueeze", [pos, self._ints("axes.last", [-1])], "rope/pos_u")  # [B, S, 1]
        axes2 = self._ints("axes.2", [2])
        self.rope_tables: dict[bool, tuple[str, str]] = {}  # local? -> (cos, sin)
        for local in (False, True) if cfg.local_rope_layers else (False,):  # Gemma 3: the sliding layers' own
            r = "rope_local" if local else "rope"
            freqs = self._one("Mul", [pos, g.const(f"{r}.inv_freq", inverse_frequencies(cfg, local).numpy())],
                              f"{r}/freqs")  # [B, S, D/2]
            emb = self._one("Concat", [freqs, freqs], f"{r}/emb", axis=-1)  # [B, S, D]
            cos = self._one("Unsqueeze", [self._to_t(self._one("Cos", [emb], f"{r}/cos"), f"{r}/cos_t"), axes2],
                            f"{r}/cos_u")  # [B, S, 1, D]
            sin = self._one("Unsqueeze", [self._to_t(self._one("Sin", [emb], f"{r}/sin"), f"{r}/sin_t"), axes2],
                            f"{r}/sin_u")  # [B, S, 1, D]
            self.rope_tables[local] = (cos, sin)
        self.rotate = g.const("rope.rotate_half", rotate_half_matrix(D).numpy().astype(self.np_t))  # [D, D]
        # Context positions 0..C-1 (C = the cache's length), read up to each row's largest position.
        shape = self._one("Shape", [gc.past_key(0)], "ctx/shape")
        ctx_len = self._one("Gather", [shape, self._ints("index.2", [2])], "ctx/len", axis=0)  # [1]
        ctx = self._one("Range", [self.g.const("zero.s", np.array(0, np.int64)),
                                  self._one("Squeeze", [ctx_len], "ctx/len_s"),
                                  self.g.const("one.s", np.array(1, np.int64))], "ctx/range")  # [C]
        ctx = self._one("Reshape", [ctx, self._ints("shape.ctx", [1, 1, -1])], "ctx/row")  # [C] -> [1, 1, C]
        limit = self._one("Unsqueeze", [self._one("ReduceMax", [gc.POSITION_IDS], "ctx/limit", axes=[1], keepdims=1),
                                        self._ints("axes.1", [1])], "ctx/limit_u")  # [B, 1] -> [B, 1, 1]
        self.unread = self._one("Greater", [ctx, limit], "ctx/unread")  # [B, 1, C]
        invalid = self.g.const("index.invalid", np.array(ai100.INVALID_INDEX, np.int64))
        self.ctx_indices = self._one("Where", [self.unread, invalid, ctx], "ctx/indices")  # [B, 1, C]
        if self.cb:  # a padding position writes nothing: INT32_MAX is past the cache
            self.scatter_pos = self._one("Where", [self._one("Less", [gc.POSITION_IDS, self._ints("zero.i64", [0])],
                                                             "ctx/padding"), invalid, gc.POSITION_IDS], "ctx/write_pos")
        # Causal mask [B, 1, G*S, C]: position j visible to a token at p when j <= p; the rows of a query
        # group are g-major (g * S + s), which tiling the S axis G times gives.
        visible = self._one("LessOrEqual", [ctx, self._one("Unsqueeze", [gc.POSITION_IDS, self._ints("axes.last", [-1])],
                                                           "mask/pos_u")], "mask/visible")  # [B, S, C]
        bias = self._one("Where", [visible, self._scalar("mask.zero", 0.0), self._scalar("mask.value",
                                                                                        ai100.AI100_MASK_VALUE)],
                         "mask/bias")  # [B, S, C]
        bias = self._one("Unsqueeze", [bias, self._ints("axes.1", [1])], "mask/bias_u")  # [B, 1, S, C]
        self.bias = self._one("Tile", [bias, self._ints("mask.repeats", [1, 1, G, 1])], "mask/groups")  # [B,1,G*S,C]
        self.unread_values = self._one("Unsqueeze", [self.unread, self._ints("axes.last", [-1])],
                                       "ctx/unread_u")  # [B, 1, C, 1]
        # Banks [L, N, in, R] / [L, N, R, out] -> [L*N, in, R] / [L*N, R, out]; rows gather layer*N + lora_id.
        self.lora_rows = self._one("Reshape", [gc.LORA_IDS, self._ints("shape.rows", [-1])], "lora_ids/flat")  # [B]
        self.flat_a, self.flat_b = {}, {}
        for m in self.lora_modules:
            fin, fout = self.cfg.lora_module_shapes()[m]
            rows = self.cfg.num_layers * self.num_slots
            for name, flat, dims in ((gc.lora_a(m), self.flat_a, [rows, fin, self.max_rank]),
                                     (gc.lora_b(m), self.flat_b, [rows, self.max_rank, fout])):
                bank = self._one("Reshape", [name, self._ints(f"shape.{name}", dims)], f"{name}/flat")  # [L*N, ., .]
                flat[m] = self._to_t(bank, f"{name}/to_t")

    def _attention(self, x: str, i: int) -> str:
        cfg = self.cfg
        H, Hq, D = cfg.num_kv_heads, cfg.num_heads, cfg.head_dim
        G, q_size, kv_size = Hq // H, Hq * D, H * D
        p = f"layers.{i}/attn"
        qkv = self._linear(x, f"layers.{i}.self_attn.qkv_proj.weight",
                           f"layers.{i}.self_attn.qkv_proj.bias" if cfg.attention_bias else None, f"{p}/qkv")
        qkv = self._adapted(qkv, "qkv_proj", x, i, f"{p}/qkv")  # a packed adapter (Phi-3) spans all columns
        q, k, v = self._node("Split", [qkv, self._ints("split.qkv", [q_size, kv_size, kv_size])], f"{p}/split", 3,
                             axis=-1)  # [B, S, q+2kv] -> q, k, v
        q = self._adapted(q, "q_proj", x, i, f"{p}/q")
        k = self._adapted(k, "k_proj", x, i, f"{p}/k")
        v = self._adapted(v, "v_proj", x, i, f"{p}/v")
        q = self._one("Reshape", [q, self._ints("shape.q", [0, 0, Hq, D])], f"{p}/q_heads")  # [B, S, Hq, D]
        k = self._one("Reshape", [k, self._ints("shape.kv", [0, 0, H, D])], f"{p}/k_heads")  # [B, S, H, D]
        if cfg.block.qk_norm:  # per head, over head_dim, before rotary
            q = self._rms_norm(q, f"layers.{i}.self_attn.q_norm.weight", f"{p}/q_norm")
            k = self._rms_norm(k, f"layers.{i}.self_attn.k_norm.weight", f"{p}/k_norm")
        q, k = self._rope(q, f"{p}/q", i), self._rope(k, f"{p}/k", i)
        v = self._one("Reshape", [v, self._ints("shape.kv", [0, 0, H, D])], f"{p}/v_heads")  # [B, S, H, D]
        k = self._one("Transpose", [k], f"{p}/k_t", perm=[0, 2, 1, 3])  # [B, H, S, D]
        v = self._one("Transpose", [v], f"{p}/v_t", perm=[0, 2, 1, 3])  # [B, H, S, D]
        past_k = self._to_t(gc.past_key(i), f"{p}/past_k")
        past_v = self._to_t(gc.past_value(i), f"{p}/past_v")
        dom = ai100.QAIC_DOMAIN
        if self.cb:
            cache_k = self._one("CtxScatterCB", [past_k, gc.BATCH_INDEX, self.scatter_pos, k], f"{p}/scatter_k",
                                domain=dom)
            cache_v = self._one("CtxScatterCB", [past_v, gc.BATCH_INDEX, self.scatter_pos, v], f"{p}/scatter_v",
                                domain=dom)
            keys = self._one("CtxGatherCB", [cache_k, gc.BATCH_INDEX, self.ctx_indices], f"{p}/gather_k", domain=dom)
            values = self._one("CtxGatherCB", [cache_v, gc.BATCH_INDEX, self.ctx_indices], f"{p}/gather_v",
                               domain=dom)
        else:
            cache_k = self._one("CtxScatter", [past_k, gc.POSITION_IDS, k], f"{p}/scatter_k", domain=dom)
            cache_v = self._one("CtxScatter", [past_v, gc.POSITION_IDS, v], f"{p}/scatter_v", domain=dom)
            keys = self._one("CtxGather", [cache_k, self.ctx_indices], f"{p}/gather_k", domain=dom)
            values = self._one("CtxGather", [cache_v, self.ctx_indices], f"{p}/gather_v", domain=dom)
        self._to_float(cache_k, f"{p}/retain_k", out=gc.retained_key(i))
        self._to_float(cache_v, f"{p}/retain_v", out=gc.retained_value(i))
        values = self._one("Where", [self.unread_values, self._scalar("mask.zero", 0.0), values],
                           f"{p}/values")  # [B, H, C, D]: unread positions are zero
        # Queries grouped per KV head (HF's repeat_kv order, query head = kv_head*G + g): K/V never repeated.
        qg = self._one("Reshape", [q, self._ints("shape.q_groups", [0, 0, H, G, D])], f"{p}/q_groups")  # [B,S,H,G,D]
        qg = self._one("Transpose", [qg], f"{p}/q_groups_t", perm=[0, 2, 3, 1, 4])  # [B, H, G, S, D]
        qg = self._one("Reshape", [qg, self._ints("shape.q_rows", [0, 0, -1, D])], f"{p}/q_rows")  # [B, H, G*S, D]
        keys_t = self._one("Transpose", [keys], f"{p}/keys_t", perm=[0, 1, 3, 2])  # [B, H, D, C]
        scores = self._one("MatMul", [qg, keys_t], f"{p}/scores")  # [B, H, G*S, C]
        scores = self._one("Mul", [scores, self._scalar("attn.scale", cfg.attention_scale)], f"{p}/scale")
        scores = self._soft_cap(scores, cfg.attn_logit_softcap, "attn.softcap", f"{p}/softcap")
        scores = self._one("Add", [scores, self.bias], f"{p}/mask")
        probs = self._to_t(self._one("Softmax", [self._to_float(scores, f"{p}/scores_f")], f"{p}/softmax", axis=-1),
                           f"{p}/probs_t")  # in float32, as the decoder does
        out = self._one("MatMul", [probs, values], f"{p}/context")  # [B, H, G*S, D]
        out = self._one("Reshape", [out, self._ints("shape.out_groups", [0, 0, G, -1, D])], f"{p}/out_groups")
        out = self._one("Transpose", [out], f"{p}/out_t", perm=[0, 3, 1, 2, 4])  # [B, H, G, S, D] -> [B, S, H, G, D]
        out = self._one("Reshape", [out, self._ints("shape.merged", [0, 0, q_size])], f"{p}/merge")  # [B, S, Hq*D]
        o = self._linear(out, f"layers.{i}.self_attn.o_proj.weight",
                         f"layers.{i}.self_attn.o_proj.bias" if cfg.o_bias else None, f"{p}/o")
        return self._adapted(o, "o_proj", out, i, f"{p}/o")

    def _mlp(self, x: str, i: int) -> str:
        cfg = self.cfg
        p = f"layers.{i}/mlp"
        inter = cfg.intermediate_size
        gu = self._linear(x, f"layers.{i}.mlp.gate_up_proj.weight",
                          f"layers.{i}.mlp.gate_up_proj.bias" if cfg.mlp_bias else None, f"{p}/gate_up")
        gu = self._adapted(gu, "gate_up_proj", x, i, f"{p}/gate_up")
        gate, up = self._node("Split", [gu, self._ints("split.gate_up", [inter, inter])], f"{p}/split", 2, axis=-1)
        gate = self._adapted(gate, "gate_proj", x, i, f"{p}/gate")
        up = self._adapted(up, "up_proj", x, i, f"{p}/up")
        act = self._one("Mul", [self._activation(gate, p), up], f"{p}/act")  # [B, S, I]
        down = self._linear(act, f"layers.{i}.mlp.down_proj.weight",
                            f"layers.{i}.mlp.down_proj.bias" if cfg.mlp_bias else None, f"{p}/down")
        return self._adapted(down, "down_proj", act, i, f"{p}/down")

    def _soft_cap(self, x: str, cap: float | None, const: str, name: str) -> str:
        """cap * tanh(x / cap) (Gemma 2's soft-capping) in standard operators; x itself without a cap."""
        if cap is None:
            return x
        c = self._scalar(const, cap)
        return self._one("Mul", [self._one("Tanh", [self._one("Div", [x, c], f"{name}/div")], f"{name}/tanh"), c],
                         f"{name}/mul")

    def _activation(self, gate: str, p: str) -> str:
        """The MLP gate's activation (the family's BlockStructure.activation)."""
        kind = self.cfg.block.activation
        if kind == "silu":
            return self._one("Mul", [gate, self._one("Sigmoid", [gate], f"{p}/sigmoid")], f"{p}/silu")
        if kind == "gelu_tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): no Gelu operator at opset 17
            cube = self._one("Mul", [self._one("Mul", [gate, gate], f"{p}/gelu/sq"), gate], f"{p}/gelu/cube")
            inner = self._one("Add", [gate, self._one("Mul", [cube, self._scalar("gelu.c", 0.044715)], f"{p}/gelu/c")],
                              f"{p}/gelu/inner")
            t = self._one("Tanh", [self._one("Mul", [inner, self._scalar("gelu.k", math.sqrt(2.0 / math.pi))],
                                             f"{p}/gelu/k")], f"{p}/gelu/tanh")
            half = self._one("Mul", [gate, self._scalar("gelu.half", 0.5)], f"{p}/gelu/half")
            return self._one("Mul", [half, self._one("Add", [t, self._scalar("gelu.one", 1.0)], f"{p}/gelu/one")],
                             f"{p}/gelu")
        raise InvalidArgument(f"activation {kind!r} has no AI 100 graph", field="base_model.hidden_act", value=kind)

    def build(self) -> onnx.ModelProto:
        cfg, g = self.cfg, self.g
        L = cfg.num_layers
        self._prologue()
        scale = cfg.embedding_scale
        h = self._one("Gather", [g.const(EMBED, self._tensor(EMBED)), gc.INPUT_IDS], "embed",
                      None if scale is not None else hidden_name(0), axis=0)  # [B, S, hidden]
        if scale is not None:  # Gemma: times sqrt(hidden) in the embedding's dtype, as HF multiplies
            h = self._one("Mul", [h, self._scalar("embed.scale", scale)], "embed/scale", hidden_name(0))
        sandwich = cfg.block.sandwich_norms
        for i in range(L):
            p = f"layers.{i}"
            attn = self._attention(self._rms_norm(h, f"{p}.input_layernorm.weight", f"{p}/input_norm"), i)
            if sandwich:  # Gemma: the attention output normed before the residual add
                attn = self._rms_norm(attn, f"{p}.post_attention_layernorm.weight", f"{p}/attn_out_norm")
            h = self._one("Add", [h, attn], f"{p}/attn_residual")
            mlp_norm = f"{p}.pre_feedforward_layernorm.weight" if sandwich else f"{p}.post_attention_layernorm.weight"
            mlp = self._mlp(self._rms_norm(h, mlp_norm, f"{p}/post_norm"), i)
            if sandwich:
                mlp = self._rms_norm(mlp, f"{p}.post_feedforward_layernorm.weight", f"{p}/mlp_out_norm")
            h = self._one("Add", [h, mlp], f"{p}/mlp_residual", hidden_name(i + 1))
        # QEfficient's logit index: each row's largest position id (the first one if tied, as argmax takes).
        idx = self._one("ArgMax", [gc.POSITION_IDS], "last/argmax", axis=1, keepdims=1)  # [B, 1]
        idx = self._one("Unsqueeze", [idx, self._ints("axes.last", [-1])], "last/index")  # [B, 1, 1]
        idx = self._one("Expand", [idx, self._ints("last.shape", [1, 1, cfg.hidden_size])],
                        "last/expand")  # [B, 1, 1] -> [B, 1, hidden]
        last = self._one("GatherElements", [h, idx], "last/gather", axis=1)  # [B, S, hidden] -> [B, 1, hidden]
        normed = self._rms_norm(last, FINAL_NORM, "final_norm")
        if cfg.tie_word_embeddings:
            head = self._one("Transpose", [g.const(EMBED)], "lm_head/transpose", perm=[1, 0])  # [hidden, V]
        else:
            head = g.const("lm_head.weight_t", self._tensor(LM_HEAD, transpose=True))  # [hidden, V]
        logits = self._one("MatMul", [normed, head], "lm_head")  # [B, 1, V]
        logits = self._soft_cap(logits, cfg.final_logit_softcap, "final.softcap", "logits/softcap")
        self._to_float(logits, "logits/to_float", out=gc.LOGITS)
        return self._model()

    def _model(self) -> onnx.ModelProto:
        cfg = self.cfg
        inputs, outputs = ai100.ai100_io(cfg, self.lora_modules, self.num_slots, self.max_rank, self.cb)
        types = {"int64": TensorProto.INT64, "float32": TensorProto.FLOAT}
        graph = helper.make_graph(self.g.nodes, "loraflow_ai100_decoder",
                                  [helper.make_tensor_value_info(s.name, types[s.dtype], list(s.shape)) for s in inputs],
                                  [helper.make_tensor_value_info(s.name, types[s.dtype], list(s.shape)) for s in outputs],
                                  self.g.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ai100.OPSET)],
                                  producer_name="loraflow")
        model.ir_version = 8
        ai100.attach_functions(model, self.cb)
        return model


def export_ai100(weights: WeightSource, out_dir: str | Path, *, lora_modules: Sequence[str], num_slots: int,
                 max_rank: int, cb: bool = True, dtype: str = "fp32") -> Ai100Export:
    """Write out_dir/model.onnx (+ model.onnx.data, hashed as written) from ``weights``, one tensor at a time."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    external = ExternalData(out_dir / ai100.DATA_FILE, ai100.DATA_FILE)
    try:
        model = Ai100GraphWriter(weights, lora_modules=lora_modules, num_slots=num_slots, max_rank=max_rank, cb=cb,
                                 dtype=dtype, external=external).build()
    finally:
        data_sha = external.close()
    onnx.save(model, str(out_dir / ai100.ONNX_FILE))
    cfg = weights.cfg
    inputs, outputs = ai100.ai100_io(cfg, lora_modules, num_slots, max_rank, cb)
    shapes = cfg.lora_module_shapes()
    graph = GraphSpec(file=ai100.ONNX_FILE, target="ai100", dtype="float32", layers=cfg.num_layers,
                      num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, vocab_size=cfg.vocab_size,
                      inputs=inputs, outputs=outputs, lora_modules={m: LoraModuleSpec(*shapes[m]) for m in lora_modules})
    return Ai100Export(graph=graph, digests={ai100.DATA_FILE: data_sha})
