"""The decoder's weights by name, one tensor at a time: what the graph writers and the reference consume.

Names are MultiLoraDecoder's state-dict names (``layers.3.self_attn.qkv_proj.weight``); linears are in
nn.Linear layout [out, in], q|k|v and gate|up packed along ``out``. A ``WeightSource`` returns one tensor
per call and keeps nothing, so a consumer that asks layer by layer holds at most one layer:

* ``CheckpointWeights`` reads them from a safetensors checkpoint (the family's Hugging Face names ->
  ours is ``hf_names``, declared by the family module), checked against config.json before anything is read;
* ``ModuleWeights`` takes them from a materialised decoder (the traced export, tests);
* services/compiler/fused/readback.py reads them back from a written artifact (what a quantised graph
  really multiplies by).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from loraflow.errors import InvalidArgument
from services.compiler.modeling.checkpoint import Checkpoint
from services.compiler.modeling.config import DecoderConfig

EMBED = "embed_tokens.weight"
FINAL_NORM = "norm.weight"
LM_HEAD = "lm_head.weight"

if TYPE_CHECKING:
    import torch

    from services.compiler.modeling.buffer_pool import BufferPool


class WeightSource(Protocol):
    cfg: DecoderConfig

    def get(self, name: str, buffers: BufferPool | None = None) -> torch.Tensor:
        """float32 tensor ``name`` (see module docstring); the caller owns it. ``buffers``: where its memory may
        come from (the caller gives it back once done); a source whose tensor is fresh memory anyway (e.g. one
        dequantised from an artifact) allocates its own."""
        ...


def layer_names(cfg: DecoderConfig, i: int) -> tuple[str, ...]:
    """Our names of layer ``i``'s tensors (biases only where the family has them)."""
    p = f"layers.{i}."
    names = [p + "input_layernorm.weight", p + "post_attention_layernorm.weight", p + "self_attn.qkv_proj.weight"]
    if cfg.attention_bias:
        names.append(p + "self_attn.qkv_proj.bias")
    if cfg.block.qk_norm:
        names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
    names.append(p + "self_attn.o_proj.weight")
    if cfg.o_bias:
        names.append(p + "self_attn.o_proj.bias")
    if cfg.block.sandwich_norms:
        names += [p + "pre_feedforward_layernorm.weight", p + "post_feedforward_layernorm.weight"]
    names.append(p + "mlp.gate_up_proj.weight")
    if cfg.mlp_bias:
        names.append(p + "mlp.gate_up_proj.bias")
    names.append(p + "mlp.down_proj.weight")
    if cfg.mlp_bias:
        names.append(p + "mlp.down_proj.bias")
    return tuple(names)


def model_names(cfg: DecoderConfig) -> list[str]:
    """Every tensor of the decoder, embedding first, in the order a streaming writer asks for them."""
    names = [EMBED]
    for i in range(cfg.num_layers):
        names += layer_names(cfg, i)
    names.append(FINAL_NORM)
    if not cfg.tie_word_embeddings:
        names.append(LM_HEAD)
    return names


def shape_of(cfg: DecoderConfig, name: str) -> tuple[int, ...]:
    """The shape config.json implies for one of our tensors."""
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    if name in (EMBED, LM_HEAD):
        return (cfg.vocab_size, hidden)
    if name == FINAL_NORM or name.endswith("layernorm.weight"):
        return (hidden,)
    if name.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")):
        return (cfg.head_dim,)
    suffix = name.split(".", 2)[2]
    return {"self_attn.qkv_proj.weight": (qkv, hidden), "self_attn.qkv_proj.bias": (qkv,),
            "self_attn.o_proj.weight": (hidden, cfg.num_heads * cfg.head_dim), "self_attn.o_proj.bias": (hidden,),
            "mlp.gate_up_proj.weight": (2 * inter, hidden), "mlp.gate_up_proj.bias": (2 * inter,),
            "mlp.down_proj.weight": (hidden, inter), "mlp.down_proj.bias": (hidden,)}[suffix]


def hf_names(cfg: DecoderConfig, name: str) -> tuple[str, ...]:
    """The Hugging Face tensors that make up one of ours, concatenated along dim 0 in this order (the
    family's naming: services/compiler/families)."""
    return cfg.family.hf_names(name)


def hf_part_shapes(cfg: DecoderConfig, name: str) -> list[tuple[int, ...]]:
    """Shapes of the Hugging Face tensors of our ``name``, in hf_names order."""
    total = shape_of(cfg, name)
    if len(hf_names(cfg, name)) == 1:
        return [total]
    if ".qkv_proj." in name:
        rows = [cfg.num_heads * cfg.head_dim] + [cfg.num_kv_heads * cfg.head_dim] * 2
    else:  # gate|up
        rows = [cfg.intermediate_size] * 2
    return [(r, *total[1:]) for r in rows]


def hf_tensor_shapes(cfg: DecoderConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Every Hugging Face tensor a checkpoint of ``cfg`` holds, with its shape, in file order."""
    return [(part, shape) for name in model_names(cfg)
            for part, shape in zip(hf_names(cfg, name), hf_part_shapes(cfg, name), strict=True)]


class CheckpointWeights:
    """Our tensors straight from a checkpoint, converted to float32 one at a time."""

    def __init__(self, checkpoint: Checkpoint, cfg: DecoderConfig):
        self.checkpoint, self.cfg = checkpoint, cfg

    @classmethod
    def open(cls, model_dir, cfg: DecoderConfig | None = None) -> CheckpointWeights:
        """Open and check the checkpoint of ``model_dir`` (InvalidArgument naming the file otherwise)."""
        weights = cls(Checkpoint.open(model_dir), cfg or DecoderConfig.from_model_dir(model_dir))
        weights.check()
        return weights

    def check(self) -> None:
        """Every tensor the decoder needs is present, of a supported dtype and of the shape config.json
        implies; reads no weight."""
        for name, shape in hf_tensor_shapes(self.cfg):
            self.checkpoint.check(name, shape)

    def get(self, name: str, buffers: BufferPool | None = None) -> torch.Tensor:
        parts = hf_names(self.cfg, name)
        if len(parts) == 1:
            return self.checkpoint.read(parts[0], buffers)
        return self._read_rows(name, 0, shape_of(self.cfg, name)[0], buffers)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start`` .. ``stop`` of float32 tensor ``name`` (a packed projection's rows may span its pieces):
        ``get(name)[start:stop]`` without reading the rest."""
        return self._read_rows(name, start, stop, None)

    def _read_rows(self, name: str, start: int, stop: int, buffers: BufferPool | None) -> torch.Tensor:
        """Rows ``start`` .. ``stop`` of our tensor ``name`` as float32, each checkpoint piece's share read
        straight into its rows (a packed projection's pieces stacked)."""
        import torch

        shape = shape_of(self.cfg, name)
        if not 0 <= start <= stop <= shape[0]:
            raise InvalidArgument(f"rows {start}..{stop} of {name!r} are outside its {shape[0]} rows",
                                  field="base_model", value=name)
        out = _empty((stop - start, *shape[1:]), torch.float32, buffers)
        first = 0  # the piece's first row in the packed tensor
        for part in hf_names(self.cfg, name):
            rows = self.checkpoint.entry(part).shape[0]
            lo, hi = max(start, first), min(stop, first + rows)
            if lo < hi:
                self.checkpoint.read_rows_into(part, lo - first, hi - first, out[lo - start:hi - start], buffers)
            first += rows
        return out


def _empty(shape, dtype, buffers: BufferPool | None) -> torch.Tensor:
    import torch

    return buffers.take(tuple(shape), dtype) if buffers is not None else torch.empty(tuple(shape), dtype=dtype)


class ModuleWeights:
    """Our tensors from a materialised MultiLoraDecoder (as float32 copies)."""

    def __init__(self, decoder):
        self.cfg = decoder.cfg
        self._params = dict(decoder.named_parameters())

    def get(self, name: str, buffers: BufferPool | None = None) -> torch.Tensor:
        import torch

        param = self._params[name].detach()
        return _empty(param.shape, torch.float32, buffers).copy_(param)
