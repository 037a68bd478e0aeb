"""Writes the fused "onnxruntime" graph node by node from the decoder's tensors (no tracing).

The graph uses ONNX Runtime's fused contrib operators the way onnxruntime-genai's builder does:
``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` for RMSNorm with the residual add,
one packed q|k|v linear, ``GroupQueryAttention`` with rotary inside and the KV cache as one buffer per
layer that the operator updates in place (past and present bound to the same memory), and
``MatMulNBits`` for int4/int8 base weights. An fp32 linear is ``FusedMatMul(transB=1)`` over the checkpoint's own
[N, K] weight (onnxruntime-genai stores a transposed [K, N] copy for a MatMul): the export converts without
transposing, and a session that does not pre-pack (verification's range sessions) packs a row-major [N, K]
per call 1.3-1.5x faster than a [K, N] (rows of 2048 floats read in order instead of 64 bytes out of each);
pre-packed (serving), the two run the same kernel on the same packed blocks. The LoRA banks stay graph inputs ([L*N, in, R] /
[L*N, R, out], so a hot-added adapter needs no recompile) and each row gathers its own slice by
``lora_ids``. N is symbolic (graph6): the graph derives it from the banks' first dimension at run time
(N = L*N / L), so the runtime chooses how many adapter slots to keep resident. When q, k and v are all
adapted (or none is) GroupQueryAttention takes the packed q|k|v
(their deltas joined by one Concat and added once) instead of three split tensors. With
``lora_kernel="native"`` each adapted projection is instead one ``ai.loraflow.LoraRows`` node
(loraflow/native) adding its delta into its columns of the packed output, and a SiLU MLP's activation is
one ``ai.loraflow.SwiGlu`` node over the packed gate|up (graph7). Logits are computed
at one token per row only. Names: loraflow/artifact/graph_contract.py
("fused" layout).

Weights stream: the builder asks its WeightSource for one tensor at a time, in graph order, converts or
quantises it, writes it to the external data file and lets it go; nothing model-sized is kept. A second
graph over the same ExternalData (the other ``lora_kernel``) finds every initializer written and reads no
weight at all. A tied head is stored once: fp32 embeds with a Gather over ``embed_tokens.weight`` and
multiplies by the same table, as every fp32 linear (FusedMatMul transB); int4/int8 quantise the
head and embed with GatherBlockQuantized over the head's own MatMulNBits blocks. ``written`` records
where each decoder tensor went, so verification can read back exactly what the graph multiplies by.

A call's rows all feed S tokens: decode steps S = 1; a prefill call takes one row's chunk, or the first
chunks of rows in adjacent KV slots together, the shorter ones right-padded to the longest. Each row's position is implied
by its ``seqlens_k`` (tokens in its cache after this call, minus one, padding included: the padding's K/V
lands past the row's real length, where the next real token overwrites it and no real token attends
it), and ``logits_index`` picks the token whose logits the row returns (its last real one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from loraflow import native as native_lora
from loraflow.artifact import graph_contract as gc
from loraflow.errors import FailedPrecondition, InvalidArgument
from services.compiler.fused import quantize
from services.compiler.modeling.buffer_pool import BufferPool
from services.compiler.modeling.config import DecoderConfig
from services.compiler.modeling.weights import EMBED, FINAL_NORM, LM_HEAD, WeightSource

OPSET = 17
MS = "com.microsoft"
# GroupQueryAttention's rotary kernel handles head sizes in multiples of 16 only (ONNX Runtime 1.32).
ROTARY_HEAD_MULTIPLE = 16
FLOAT_DTYPES = {"fp32": TensorProto.FLOAT}
WEIGHT_BITS = {"fp32": None, "int8": 8, "int4": 4}
LORA_KERNELS = ("onnx", "native")


@dataclass(frozen=True)
class FusedGraphOptions:
    """What the builder needs besides the weights: dtype of the base weights, bank sizes, cache length."""

    dtype: str  # "fp32" | "int8" | "int4"
    ctx_len: int
    num_slots: int  # N = adapter_slots + 1 (slot 0 = base model)
    max_rank: int
    lora_modules: tuple[str, ...]
    quant_block_size: int = quantize.DEFAULT_BLOCK_SIZE
    quant_accuracy_level: int = 4
    # "onnx": the per-row delta in standard operators (Gather, MatMul, Add), runnable anywhere;
    # "native": one LoraRows node per adapted projection (loraflow/native), for runtimes that load it.
    lora_kernel: str = "onnx"

    def __post_init__(self):
        if self.dtype not in WEIGHT_BITS:
            raise InvalidArgument(f"options.dtype={self.dtype!r} has no fused graph; fused dtypes: "
                                  f"{list(WEIGHT_BITS)}", field="options.dtype", value=self.dtype)
        if self.lora_kernel not in LORA_KERNELS:
            raise InvalidArgument(f"lora_kernel={self.lora_kernel!r} is not one of {list(LORA_KERNELS)}",
                                  field="lora_kernel", value=self.lora_kernel)

    @property
    def bits(self) -> int | None:
        return WEIGHT_BITS[self.dtype]


def fused_graph_supported(cfg: DecoderConfig) -> str | None:
    """None when the fused builder can write ``cfg``; else why not (the caller falls back to the trace)."""
    if cfg.head_dim % ROTARY_HEAD_MULTIPLE:
        return (f"head_dim={cfg.head_dim} is not a multiple of {ROTARY_HEAD_MULTIPLE} "
                "(GroupQueryAttention's rotary kernel)")
    return None


def rotary_caches(cfg: DecoderConfig, ctx_len: int, local: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [ctx_len, D/2] for positions 0..ctx_len-1 (any rope type: the frequencies carry it; ``local``:
    Gemma 3's sliding layers' own rope)."""
    from services.compiler.modeling.rope import inverse_frequencies

    inv_freq = inverse_frequencies(cfg, local).double().numpy()  # [D/2]
    # float64 angles, rounded once: positions up to 131072 keep full float32 precision.
    angles = np.arange(ctx_len, dtype=np.float64)[:, None] * inv_freq[None, :]  # [C, D/2]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


# Tensors queued for the writer thread at most (each is one converted tensor: the builder reads and converts
# the next while the last is written and hashed).
WRITE_QUEUE = 2


class ExternalData:
    """Writes initializer bytes straight into the artifact's data file (ONNX external data), hashing them
    on the way: no TensorProto ever holds the weights, so nothing copies 500 MB through protobuf. The write
    and the sha256 run on a thread of their own (both release the GIL), overlapping the next tensor's read
    and conversion; at most WRITE_QUEUE tensors wait for it."""

    def __init__(self, path: Path, location: str):
        import hashlib
        import queue
        import threading

        self.path, self.location = Path(path), location
        # Converted weights taken from here go back once written: the next layer's same-shaped one reuses them.
        self.buffers = BufferPool()
        self._file = open(self.path, "wb")  # noqa: SIM115  (closed by close())
        self._sha = hashlib.sha256()
        self.size = 0
        self._written: dict[str, TensorProto] = {}  # a second graph over the same file reuses these
        self._queue: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE)
        self._error: BaseException | None = None
        self._writer = threading.Thread(target=self._drain, name="external-data-writer", daemon=True)
        self._writer.start()

    def _drain(self) -> None:
        while True:
            data = self._queue.get()
            if data is None:
                return
            if self._error is None:
                try:
                    self._file.write(data)
                    self._sha.update(data)
                except BaseException as err:  # noqa: BLE001  (raised on the builder's thread)
                    self._error = err
            self.buffers.give_back(data.obj)  # the array the memoryview was cast from (not the pool's: left)
            del data

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def known(self, name: str) -> TensorProto | None:
        """The initializer already written under ``name`` (None if not yet)."""
        return self._written.get(name)

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.require(array, requirements="C")
        data = memoryview(array).cast("B")
        known = self._written.get(name)
        if known is not None:
            if list(known.dims) != list(array.shape) or known.data_type != helper.np_dtype_to_tensor_dtype(array.dtype):
                raise InvalidArgument(f"initializer {name!r} was written as {list(known.dims)} and is now "
                                      f"{list(array.shape)}", field="initializer", value=name)
            t = TensorProto()
            t.CopyFrom(known)
            return t
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(self.size)), ("length", str(data.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        self._raise_if_failed()
        self._queue.put(data)  # the memoryview keeps the array alive until it is written
        self.size += data.nbytes
        self._written[name] = t
        return t

    def close(self) -> str:
        """Waits for the writer, closes the file; returns its sha256 (hex)."""
        self._queue.put(None)
        self._writer.join()
        self._file.close()
        self.buffers.clear()
        self._raise_if_failed()
        return self._sha.hexdigest()


# Initializers at least this large go to the external data file (the rest stay inline in the graph).
EXTERNAL_MIN_BYTES = 1024


@dataclass(frozen=True)
class WrittenWeight:
    """Where one decoder tensor (MultiLoraDecoder name) went: a float initializer in the tensor's own layout
    (a linear's [N, K]), or a MatMulNBits node's blocks (``bits``, named after the node)."""

    initializer: str  # float: the initializer; quantised: the node (its "{node}.qweight" / ".scales")
    bits: int | None = None
    block_size: int = 0
    k: int = 0
    n: int = 0


Tensor = np.ndarray | Callable[[], np.ndarray]  # an array, or a thunk read only if not yet written


@dataclass
class _Graph:
    """Nodes and initializers being written, with unique names."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[TensorProto] = field(default_factory=list)
    external: ExternalData | None = None
    _names: set[str] = field(default_factory=set)

    def node(self, op: str, inputs: list[str], outputs: list[str] | int = 1, *, name: str,
             domain: str = "", **attrs) -> list[str]:
        if isinstance(outputs, int):
            outputs = [f"{name}/out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs

    def has(self, name: str) -> bool:
        """Written to the data file already (by this graph or an earlier one over the same file)."""
        return name in self._names or (self.external is not None and self.external.known(name) is not None)

    def const(self, name: str, value: Tensor | None = None) -> str:
        """Initializer ``name``; a thunk is called only when the data file does not hold it yet (``None``: it
        must hold it already)."""
        if name in self._names:
            return name
        known = self.external.known(name) if self.external is not None else None
        if known is not None:
            t = TensorProto()
            t.CopyFrom(known)
            self.initializers.append(t)
        else:
            if value is None:
                raise InvalidArgument(f"initializer {name!r} was never written", field="initializer", value=name)
            array = value() if callable(value) else value
            if self.external is not None and array.nbytes >= EXTERNAL_MIN_BYTES:
                self.initializers.append(self.external.tensor(name, array))
            else:
                # np.require, not ascontiguousarray: the latter turns a 0-d scalar into shape [1].
                self.initializers.append(numpy_helper.from_array(np.require(array, requirements="C"), name))
        self._names.add(name)
        return name


class FusedGraphBuilder:
    """One model from a WeightSource's tensors, read one at a time as the graph is written."""

    def __init__(self, cfg: DecoderConfig, weights: WeightSource, options: FusedGraphOptions,
                 external: ExternalData | None = None):
        """``external``: where large initializers are written (None: inline in the model, for tests). A second
        builder over the same ExternalData (e.g. the other lora_kernel) reads and quantises nothing again."""
        why = fused_graph_supported(cfg)
        if why:
            raise FailedPrecondition(f"the fused graph cannot express this model: {why}", field="base_model",
                                     value=cfg.architecture)
        self.cfg, self.weights, self.opts = cfg, weights, options
        self.g = _Graph(external=external)
        self._buffers = external.buffers if external is not None else None
        self.written: dict[str, WrittenWeight] = {}  # decoder tensor name -> where the graph holds it

    def _layer_buffers(self, name: str) -> BufferPool | None:
        """Where a layer's tensor may take its memory: the writer's pool, which the next layer's same-shaped
        tensors reuse (the embedding and an untied head are read once: an idle buffer of theirs would stay)."""
        return self._buffers if name.startswith("layers.") else None

    def _w(self, name: str) -> Callable[[], np.ndarray]:
        """A thunk reading one float32 tensor [out, in] from the source (only if its initializer is new); a
        layer's comes from the writer's pool, which takes it back once written."""
        return lambda: self.weights.get(name, self._layer_buffers(name)).numpy()

    # --- pieces ---------------------------------------------------------------------------------
    def _linear(self, x: str, weight_name: str, bias_name: str | None, name: str, *, k: int, n: int) -> str:
        """y = x @ W^T (+ b) for the decoder linear ``weight_name`` [N, K]: FusedMatMul(transB) over it in fp32,
        MatMulNBits for int4/int8 (quantised here unless the data file holds its blocks already)."""
        g = self.g
        if self.opts.bits is None:
            (y,) = g.node("FusedMatMul", [x, g.const(f"{name}.weight", self._w(weight_name))], name=name, domain=MS,
                          transB=1)
            self.written[weight_name] = WrittenWeight(f"{name}.weight")
        else:
            y = self._matmul_nbits(x, weight_name, name, k=k, n=n)
        if bias_name is not None:
            (y,) = g.node("Add", [y, g.const(f"{name}.bias", self._w(bias_name))], name=f"{name}/bias")
            self.written[bias_name] = WrittenWeight(f"{name}.bias")
        return y

    def _quantized_initializers(self, weight_name: str, name: str) -> tuple[str, str]:
        """("{name}.qweight", "{name}.scales") of ``weight_name``'s blocks, quantised and written if new."""
        g, opts = self.g, self.opts
        qweight, scales = f"{name}.qweight", f"{name}.scales"
        if g.has(qweight) and g.has(scales):
            return g.const(qweight), g.const(scales)
        q = quantize.quantize_linear(self.weights.get(weight_name), opts.bits, opts.quant_block_size)  # [N, K] in
        return g.const(qweight, q.packed), g.const(scales, q.scales)  # [N, k_blocks, blob], [N * k_blocks]

    def _matmul_nbits(self, x: str, weight_name: str, name: str, *, k: int, n: int) -> str:
        opts = self.opts
        qweight, scales = self._quantized_initializers(weight_name, name)
        self.g.nodes.append(quantize.matmul_nbits(name, x, f"{name}/out0", [qweight, scales], k=k, n=n, bits=opts.bits,
                                                  block_size=opts.quant_block_size,
                                                  accuracy_level=opts.quant_accuracy_level))
        self.written[weight_name] = WrittenWeight(name, bits=opts.bits, block_size=opts.quant_block_size, k=k, n=n)
        return f"{name}/out0"

    def _embedding(self) -> str:
        """input_ids [B, S] -> h [B, S, hidden]; a tied quantised head is gathered from its own blocks."""
        cfg, opts, g = self.cfg, self.opts, self.g
        if not (cfg.tie_word_embeddings and opts.bits is not None):
            (h,) = g.node("Gather", [g.const(EMBED, self._w(EMBED)), gc.INPUT_IDS], name="embed", axis=0)
            self.written[EMBED] = WrittenWeight(EMBED)
            return h
        V, hidden, block = cfg.vocab_size, cfg.hidden_size, opts.quant_block_size
        k_blocks = (hidden + block - 1) // block
        qweight, scales = self._quantized_initializers(EMBED, "lm_head")  # the head's [V, k_blocks, blob]
        (scales_3d,) = g.node("Reshape", [scales, g.const("shape.embed_scales", np.array([V, k_blocks, 1], np.int64))],
                              name="embed/scales")  # [V * k_blocks] -> [V, k_blocks, 1] (a small folded copy)
        (blocks,) = g.node("GatherBlockQuantized", [qweight, gc.INPUT_IDS, scales_3d], name="embed", domain=MS,
                           bits=opts.bits, block_size=block, gather_axis=0, quantize_axis=2)  # [B, S, kb, block]
        (h,) = g.node("Reshape", [blocks, g.const("shape.embed", np.array([0, 0, k_blocks * block], np.int64))],
                      name="embed/flat")  # [B, S, k_blocks, block] -> [B, S, k_blocks*block]
        if k_blocks * block != hidden:  # the blocks pad K: drop the padding
            (h,) = g.node("Slice", [h, g.const("embed.start", np.array([0], np.int64)),
                                    g.const("embed.end", np.array([hidden], np.int64)),
                                    g.const("embed.axis", np.array([2], np.int64))], name="embed/unpad")
        self.written[EMBED] = WrittenWeight("lm_head", bits=opts.bits, block_size=block, k=hidden, n=V)
        return h

    def _head(self, last: str) -> None:
        """last [B, 1, hidden] -> logits [B, 1, V] (soft-capped where the family caps them)."""
        cfg, g = self.cfg, self.g
        cap = cfg.final_logit_softcap
        if cap is None:
            self._head_matmul(last, gc.LOGITS)
            return
        raw = self._head_matmul(last, "logits/raw")  # cap * tanh(logits / cap): 3 cheap nodes over [B, 1, V]
        (scaled,) = g.node("Div", [raw, g.const("final_softcap", np.array(cap, np.float32))], name="logits/softcap_div")
        (tanh,) = g.node("Tanh", [scaled], name="logits/softcap_tanh")
        g.node("Mul", [tanh, "final_softcap"], [gc.LOGITS], name="logits/softcap")

    def _head_matmul(self, last: str, out: str) -> str:
        """last [B, 1, hidden] -> ``out`` [B, 1, V], the head's matmul; returns ``out``."""
        cfg, opts, g = self.cfg, self.opts, self.g
        V, hidden = cfg.vocab_size, cfg.hidden_size
        if opts.bits is not None:
            weight = EMBED if cfg.tie_word_embeddings else LM_HEAD
            y = self._matmul_nbits(last, weight, "lm_head", k=hidden, n=V)
            g.node("Identity", [y], [out], name="logits")
        else:
            # [V, hidden] as stored, transposed inside the kernel like every fp32 linear; a tied head is the
            # embedding table itself (stored once).
            weight = EMBED if cfg.tie_word_embeddings else LM_HEAD
            g.node("FusedMatMul", [last, g.const(weight, self._w(weight))], [out], name="lm_head", domain=MS, transB=1)
            if not cfg.tie_word_embeddings:
                self.written[LM_HEAD] = WrittenWeight(LM_HEAD)
        return out

    def _lora_delta(self, module: str, x: str, row_index: str, name: str) -> str:
        """x [B, S, in] -> (x A_row) B_row [B, S, out], each row's slices gathered from the flat banks."""
        g = self.g
        (a,) = g.node("Gather", [gc.lora_a(module), row_index], name=f"{name}/gather_a", axis=0)  # [B, in, R]
        (b,) = g.node("Gather", [gc.lora_b(module), row_index], name=f"{name}/gather_b", axis=0)  # [B, R, out]
        (xa,) = g.node("MatMul", [x, a], name=f"{name}/xa")  # [B, S, R]
        (delta,) = g.node("MatMul", [xa, b], name=f"{name}/xab")  # [B, S, out]
        return delta

    def _adapted(self, module: str, y: str, x: str, row_index: str, name: str, *, layer: int,
                 column_offset: int = 0) -> str:
        """y with ``module``'s per-row delta added in columns column_offset.. (y itself if not a target)."""
        if module not in self.opts.lora_modules:
            return y
        if self.opts.lora_kernel == "native":
            # lora_ranks [N, P]: each row computes only its slot's rank of this module (column rank_column) of
            # the bank's R columns, none where its adapter does not touch the module.
            # layer/num_layers: the kernel finds this layer's rows from the banks' shape (N chosen at run time).
            (out,) = self.g.node("LoraRows", [y, x, gc.LORA_IDS, gc.lora_a(module), gc.lora_b(module),
                                              gc.LORA_RANKS],
                                 name=f"{name}/lora", domain=native_lora.DOMAIN,
                                 layer=layer, num_layers=self.cfg.num_layers, column_offset=column_offset,
                                 rank_column=list(self.opts.lora_modules).index(module))
            return out
        if column_offset:
            raise InvalidArgument("a column offset needs the native LoRA kernel", field="column_offset",
                                  value=column_offset)
        (out,) = self.g.node("Add", [y, self._lora_delta(module, x, row_index, f"{name}/lora")], name=f"{name}/add")
        return out

    # --- the model ----------------------------------------------------------------------------
    def build(self) -> onnx.ModelProto:
        """The model (``self.written`` then says where each decoder tensor went)."""
        cfg, opts, g = self.cfg, self.opts, self.g
        L, H, Hq, D, C = cfg.num_layers, cfg.num_kv_heads, cfg.num_heads, cfg.head_dim, opts.ctx_len
        R = opts.max_rank
        q_size, kv_size = Hq * D, H * D
        float_t = FLOAT_DTYPES["fp32"]

        # Gemma 2's attention soft-capping: GroupQueryAttention's own ``softcap`` (cap * tanh(scores / cap) on
        # the scaled scores, before the mask and softmax, inside the fused kernel).
        softcap = {} if cfg.attn_logit_softcap is None else {"softcap": float(cfg.attn_logit_softcap)}
        sandwich = cfg.block.sandwich_norms
        cos, sin = rotary_caches(cfg, C)
        g.const("rotary.cos", cos)
        g.const("rotary.sin", sin)
        if cfg.local_rope_layers:  # Gemma 3: the sliding layers' own rope base
            cos, sin = rotary_caches(cfg, C, local=True)
            g.const("rotary_local.cos", cos)
            g.const("rotary_local.sin", sin)
        lora_rows = "lora_rows"  # [B]
        g.node("Reshape", [gc.LORA_IDS, g.const("shape.rows", np.array([-1], np.int64))], [lora_rows],
               name="lora_ids/flat")  # [B, 1] -> [B]

        if opts.lora_modules and opts.lora_kernel == "onnx":
            # N (slots a layer) from the banks' first dimension, L*N: the runtime chooses it.
            (bank_rows,) = g.node("Shape", [gc.lora_a(opts.lora_modules[0])], name="lora_banks/rows", start=0,
                                  end=1)  # [1] = L*N
            (slots,) = g.node("Div", [bank_rows, g.const("lora_banks.layers", np.array([L], np.int64))],
                              name="lora_banks/slots")  # [1] = N
        if opts.lora_kernel == "native":
            qkv_shape = g.const("shape.qkv", np.array([0, 0, q_size + 2 * kv_size], np.int64))  # 0: keep B, S
        h = self._embedding()  # [B, S, hidden]
        if cfg.embedding_scale is not None:  # Gemma: times sqrt(hidden), in float32 as the fp32 model does
            (h,) = g.node("Mul", [h, g.const("embed.scale", np.array(cfg.embedding_scale, np.float32))],
                          name="embed/scale")
        x = self._plain_norm(h, "layers.0.input_layernorm.weight", "layers.0/input_norm")
        residual = h
        for i in range(L):
            p = f"layers.{i}"
            if opts.lora_modules and opts.lora_kernel == "onnx":
                # Row b's slices sit at i*N + lora_ids[b] in the flat [L*N, ...] banks.
                (offset,) = g.node("Mul", [slots, g.const(f"{p}.layer_index", np.array([i], np.int64))],
                                   name=f"{p}/bank_offset")  # [1] = i*N
                (row_index,) = g.node("Add", [lora_rows, offset], name=f"{p}/bank_rows")  # [B]
            else:
                row_index = ""
            # Attention: packed q|k|v projection, per-row adapter deltas, GQA with rotary and in-place cache.
            qkv = self._linear(x, f"{p}.self_attn.qkv_proj.weight",  # [q+2kv, hidden]
                               f"{p}.self_attn.qkv_proj.bias" if cfg.attention_bias else None, f"{p}/attn/qkv",
                               k=cfg.hidden_size, n=q_size + 2 * kv_size)
            # A packed adapter (Phi-3's qkv_proj) adds its delta across every column of q|k|v.
            qkv = self._adapted("qkv_proj", qkv, x, row_index, f"{p}/attn/qkv", layer=i)
            adapted = [m in opts.lora_modules for m in ("q_proj", "k_proj", "v_proj")]
            if opts.lora_kernel == "native":
                # Each adapted projection's delta goes straight into its columns of the packed q|k|v.
                for module, offset in (("q_proj", 0), ("k_proj", q_size), ("v_proj", q_size + kv_size)):
                    qkv = self._adapted(module, qkv, x, row_index, f"{p}/attn/{module[0]}", layer=i,
                                        column_offset=offset)
                if any(adapted) or "qkv_proj" in opts.lora_modules:
                    # A custom op's output has no inferred shape; GroupQueryAttention behind one ran a prefill
                    # chunk ~7x slower (SmolLM2-135M, B=8, S=32). A Reshape to [B, S, q+2kv] declares it.
                    (qkv,) = g.node("Reshape", [qkv, qkv_shape], name=f"{p}/attn/qkv/shape")  # [B, S, q+2kv]
                q, k, v = qkv, "", ""
            elif all(adapted) or not any(adapted):
                # GroupQueryAttention takes the packed q|k|v (no Split); deltas, if any, go in as one.
                if all(adapted):
                    deltas = [self._lora_delta(m, x, row_index, f"{p}/attn/{m[0]}/lora")
                              for m in ("q_proj", "k_proj", "v_proj")]
                    (delta,) = g.node("Concat", deltas, name=f"{p}/attn/qkv/lora/concat", axis=-1)  # [B, S, q+2kv]
                    (qkv,) = g.node("Add", [qkv, delta], name=f"{p}/attn/qkv/add")
                q, k, v = qkv, "", ""
            else:
                q, k, v = g.node("Split",
                                 [qkv, g.const(f"{p}.qkv_split", np.array([q_size, kv_size, kv_size], np.int64))],
                                 3, name=f"{p}/attn/split", axis=-1)  # [B, S, q+2kv] -> q, k, v
                q = self._adapted("q_proj", q, x, row_index, f"{p}/attn/q", layer=i)
                k = self._adapted("k_proj", k, x, row_index, f"{p}/attn/k", layer=i)
                v = self._adapted("v_proj", v, x, row_index, f"{p}/attn/v", layer=i)
            if cfg.block.qk_norm:
                q, k, v = self._qk_norm(q, k, v, i)
            attn, _, _ = g.node(
                "GroupQueryAttention",
                [q, k, v, gc.past_key(i), gc.past_value(i), gc.SEQLENS_K, gc.TOTAL_SEQUENCE_LENGTH,
                 *(("rotary_local.cos", "rotary_local.sin") if i in cfg.local_rope_layers
                    else ("rotary.cos", "rotary.sin"))],
                [f"{p}/attn/out", gc.present_key(i), gc.present_value(i)],
                name=f"{p}/attn/gqa", domain=MS, num_heads=Hq, kv_num_heads=H, scale=cfg.attention_scale,
                do_rotary=1, rotary_interleaved=0, **softcap)  # -> [B, S, Hq*D]
            o = self._linear(attn, f"{p}.self_attn.o_proj.weight", f"{p}.self_attn.o_proj.bias" if cfg.o_bias else None,
                             f"{p}/attn/o", k=q_size, n=cfg.hidden_size)
            o = self._adapted("o_proj", o, attn, row_index, f"{p}/attn/o", layer=i)
            if sandwich:  # Gemma: the attention output normed before the residual add; the MLP's input norm next
                o = self._plain_norm(o, f"{p}.post_attention_layernorm.weight", f"{p}/attn/out_norm")
            mlp_norm = f"{p}.pre_feedforward_layernorm.weight" if sandwich else f"{p}.post_attention_layernorm.weight"
            # residual + attention, then RMSNorm: one SkipSimplifiedLayerNormalization (output 3 = the sum).
            x, _, _, residual = g.node(
                "SkipSimplifiedLayerNormalization",
                [o, residual, self._norm(mlp_norm)],
                [f"{p}/post_norm/out", "", "", f"{p}/post_norm/sum"], name=f"{p}/post_norm", domain=MS,
                epsilon=cfg.rms_norm_eps)
            # MLP (SwiGLU) with gate|up packed in one projection.
            inter = cfg.intermediate_size
            gu = self._linear(x, f"{p}.mlp.gate_up_proj.weight",  # [2I, hidden]
                              f"{p}.mlp.gate_up_proj.bias" if cfg.mlp_bias else None, f"{p}/mlp/gate_up",
                              k=cfg.hidden_size, n=2 * inter)
            gu = self._adapted("gate_up_proj", gu, x, row_index, f"{p}/mlp/gate_up", layer=i)  # packed: all columns
            if opts.lora_kernel == "native":  # deltas into the packed gate|up columns, before the Split
                gu = self._adapted("gate_proj", gu, x, row_index, f"{p}/mlp/gate", layer=i)
                gu = self._adapted("up_proj", gu, x, row_index, f"{p}/mlp/up", layer=i, column_offset=inter)
            if opts.lora_kernel == "native" and cfg.block.activation == "silu":
                # One kernel reads the packed gate|up once (Split, Sigmoid, Mul, Mul in standard operators).
                (act,) = g.node("SwiGlu", [gu], name=f"{p}/mlp/act", domain=native_lora.DOMAIN)  # [B, S, 2I] -> [B, S, I]
            else:
                gate, up = g.node("Split", [gu, g.const(f"{p}.gate_up_split", np.array([inter, inter], np.int64))],
                                  2, name=f"{p}/mlp/split", axis=-1)  # [B, S, 2I] -> [B, S, I] x 2
                if opts.lora_kernel == "onnx":
                    gate = self._adapted("gate_proj", gate, x, row_index, f"{p}/mlp/gate", layer=i)
                    up = self._adapted("up_proj", up, x, row_index, f"{p}/mlp/up", layer=i)
                (act,) = g.node("Mul", [self._activation(gate, f"{p}/mlp"), up], name=f"{p}/mlp/act")  # [B, S, I]
            down = self._linear(act, f"{p}.mlp.down_proj.weight", f"{p}.mlp.down_proj.bias" if cfg.mlp_bias else None,
                                f"{p}/mlp/down", k=inter, n=cfg.hidden_size)
            down = self._adapted("down_proj", down, act, row_index, f"{p}/mlp/down", layer=i)
            if sandwich:
                down = self._plain_norm(down, f"{p}.post_feedforward_layernorm.weight", f"{p}/mlp/out_norm")
            # residual + MLP, then the next layer's input norm (the final norm after the last layer).
            weight_key, node_name = ((f"layers.{i + 1}.input_layernorm.weight", f"layers.{i + 1}/input_norm")
                                     if i + 1 < L else (FINAL_NORM, "final_norm"))
            x, _, _, residual = g.node(
                "SkipSimplifiedLayerNormalization", [down, residual, self._norm(weight_key)],
                [f"{node_name}/out", "", "", f"{node_name}/sum"], name=node_name, domain=MS,
                epsilon=cfg.rms_norm_eps)
        # Logits at one token per row only: the one at logits_index[b] (-1 = the last; a batched prefill
        # call points each right-padded row at its last real token).
        # [B, S, hidden] -> [B, 1, hidden] -> [B, 1, V].
        (index,) = g.node("Unsqueeze", [gc.LOGITS_INDEX, g.const("axes.last", np.array([2], np.int64))],
                          name="logits_index/unsqueeze")  # [B, 1] -> [B, 1, 1]
        (last,) = g.node("GatherND", [x, index], name="last_token", batch_dims=1)  # [B, 1, hidden]
        self._head(last)

        inputs = [helper.make_tensor_value_info(gc.INPUT_IDS, TensorProto.INT64, ["B", "S"]),
                  helper.make_tensor_value_info(gc.LORA_IDS, TensorProto.INT64, ["B", 1]),
                  helper.make_tensor_value_info(gc.SEQLENS_K, TensorProto.INT32, ["B"]),
                  helper.make_tensor_value_info(gc.TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, []),
                  helper.make_tensor_value_info(gc.LOGITS_INDEX, TensorProto.INT64, ["B", 1])]
        if opts.lora_kernel == "native":
            # Read by the LoraRows nodes. The standard-operator graph has no use for it (its Gather/MatMul
            # run all R columns) and does not take it, so model.onnx's contract is unchanged.
            inputs.append(helper.make_tensor_value_info(gc.LORA_RANKS, TensorProto.INT64,
                                                        [gc.SLOTS_DIM, len(opts.lora_modules)]))
        outputs = [helper.make_tensor_value_info(gc.LOGITS, float_t, ["B", 1, cfg.vocab_size])]
        for i in range(L):
            inputs += [helper.make_tensor_value_info(gc.past_key(i), float_t, ["B", H, C, D]),
                       helper.make_tensor_value_info(gc.past_value(i), float_t, ["B", H, C, D])]
            outputs += [helper.make_tensor_value_info(gc.present_key(i), float_t, ["B", H, C, D]),
                        helper.make_tensor_value_info(gc.present_value(i), float_t, ["B", H, C, D])]
        shapes = cfg.lora_module_shapes()
        for m in opts.lora_modules:
            fin, fout = shapes[m]
            inputs += [helper.make_tensor_value_info(gc.lora_a(m), float_t, [gc.BANK_ROWS_DIM, fin, R]),
                       helper.make_tensor_value_info(gc.lora_b(m), float_t, [gc.BANK_ROWS_DIM, R, fout])]
        graph = helper.make_graph(g.nodes, "loraflow_fused_decoder", inputs, outputs, g.initializers)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)]
        if opts.lora_kernel == "native":
            opsets.append(helper.make_opsetid(native_lora.DOMAIN, native_lora.OPSET))
        model = helper.make_model(graph, opset_imports=opsets,
                                  producer_name="loraflow")
        model.ir_version = 8
        return model

    def _qk_norm(self, q: str, k: str, v: str, layer: int) -> tuple[str, str, str]:
        """q and k (split from a packed q|k|v first) RMSNorm'd per head over head_dim, before
        GroupQueryAttention's rotary; GroupQueryAttention then takes q, k, v apart."""
        cfg, g, p = self.cfg, self.g, f"layers.{layer}"
        Hq, H, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if not k:  # packed [B, S, q+2kv]
            q, k, v = g.node("Split", [q, g.const(f"{p}.qkv_split", np.array([Hq * D, H * D, H * D], np.int64))], 3,
                             name=f"{p}/attn/split", axis=-1)  # [B, S, q+2kv] -> q, k, v
        out = []
        for x, heads, which in ((q, Hq, "q"), (k, H, "k")):
            (xh,) = g.node("Reshape", [x, g.const(f"shape.{which}_heads", np.array([0, 0, heads, D], np.int64))],
                           name=f"{p}/attn/{which}_heads")  # [B, S, heads*D] -> [B, S, heads, D]
            normed = self._plain_norm(xh, f"{p}.self_attn.{which}_norm.weight", f"{p}/attn/{which}_norm")
            (flat,) = g.node("Reshape", [normed, g.const(f"shape.{which}_flat", np.array([0, 0, heads * D], np.int64))],
                             name=f"{p}/attn/{which}_flat")  # [B, S, heads, D] -> [B, S, heads*D]
            out.append(flat)
        return out[0], out[1], v

    def _activation(self, gate: str, name: str) -> str:
        """The MLP gate's activation (the family's BlockStructure.activation)."""
        kind = self.cfg.block.activation
        if kind == "silu":
            (sig,) = self.g.node("Sigmoid", [gate], name=f"{name}/sigmoid")
            (out,) = self.g.node("Mul", [gate, sig], name=f"{name}/silu")
            return out
        if kind == "gelu_tanh":  # ONNX Runtime's FastGelu is GELU's tanh approximation
            (out,) = self.g.node("FastGelu", [gate], name=f"{name}/gelu", domain=MS)
            return out
        raise InvalidArgument(f"activation {kind!r} has no fused graph", field="base_model.hidden_act", value=kind)

    def _norm(self, name: str) -> str:
        """An RMSNorm's scale: the weight, stored under its decoder name, plus the family's norm offset (Gemma's
        1 + w: an Add of two initializers, which ONNX Runtime folds into one when the session is created)."""
        self.written[name] = WrittenWeight(name)
        weight = self.g.const(name, self._w(name))
        offset = self.cfg.block.norm_offset
        if not offset:
            return weight
        (scale,) = self.g.node("Add", [weight, self.g.const("norm.offset", np.array(offset, np.float32))],
                               name=f"{name}/offset")
        return scale

    def _plain_norm(self, x: str, weight: str, name: str) -> str:
        """RMSNorm of x over the last axis, without a residual."""
        (y,) = self.g.node("SimplifiedLayerNormalization", [x, self._norm(weight)], name=name, axis=-1,
                           epsilon=self.cfg.rms_norm_eps, stash_type=1)
        return y

