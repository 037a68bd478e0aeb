"""ONNX export of the multi-LoRA decoder for target "onnxruntime" (names: loraflow/artifact/graph_contract.py).

Dynamic dims: B (rows), S (tokens per row), P (past tokens in use), F (KV-cache slots). The
banks have static shapes [L, N, in, R] / [L, N, R, out] fixed by adapter_slots and max_rank.

We use the TorchScript exporter (``dynamo=False``): in torch 2.13 it exports this module with
``dynamic_axes`` in about a second, while the dynamo exporter would need ``torch.export`` dynamic
shape specs for every input and rejects ``dynamic_axes``. The graph is then (int8) dynamically
quantised — base MatMul weights only: LoRA MatMuls have no constant operand — and saved after
ONNX Runtime graph optimisation, with weights as external data.
"""

from __future__ import annotations

import copy
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from loraflow.artifact import graph_contract as gc
from loraflow.artifact.manifest import GraphSpec, LoraModuleSpec, TensorSpec
from loraflow.errors import InvalidArgument
from services.compiler.modeling.decoder import MultiLoraDecoder

ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
OPSET = 17
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.float32}
NUMPY_DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "float32"}


@dataclass(frozen=True)
class BankShape:
    """Static bank sizes of an artifact: N = adapter_slots + 1 slots, rank R."""

    adapter_slots: int
    max_rank: int

    @property
    def num_slots(self) -> int:
        return self.adapter_slots + 1


class OrtGraph(nn.Module):
    """Flat-argument wrapper in contract order: ids, positions, lora_ids, batch_index,
    (past_key.i, past_value.i) for each layer, (lora_a.m, lora_b.m) for each adapted module."""

    def __init__(self, decoder: MultiLoraDecoder):
        super().__init__()
        self.decoder = decoder
        self.num_layers = decoder.cfg.num_layers
        self.modules_ = decoder.lora_modules

    def forward(self, input_ids, position_ids, lora_ids, batch_index, *rest):
        L = self.num_layers
        past_k, past_v = list(rest[0:2 * L:2]), list(rest[1:2 * L:2])
        banks = rest[2 * L:]
        lora_a = {m: banks[2 * i] for i, m in enumerate(self.modules_)}
        lora_b = {m: banks[2 * i + 1] for i, m in enumerate(self.modules_)}
        logits, k, v = self.decoder(input_ids, position_ids, lora_ids, batch_index, past_k, past_v, lora_a, lora_b)
        out = [logits]
        for i in range(L):
            out += [k[i], v[i]]
        return tuple(out)


def contract_io(decoder: MultiLoraDecoder, banks: BankShape, float_dtype: str
                ) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The graph's inputs and outputs with dtype and shape (symbolic dims as letters)."""
    cfg = decoder.cfg
    H, D, L = cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
    inputs = [TensorSpec(gc.INPUT_IDS, "int64", ("B", "S")), TensorSpec(gc.POSITION_IDS, "int64", ("B", "S")),
              TensorSpec(gc.LORA_IDS, "int64", ("B", 1)), TensorSpec(gc.BATCH_INDEX, "int64", ("B", 1))]
    for i in range(L):
        inputs += [TensorSpec(gc.past_key(i), float_dtype, ("P", "F", H, D)),
                   TensorSpec(gc.past_value(i), float_dtype, ("P", "F", H, D))]
    shapes = cfg.lora_module_shapes()
    for m in decoder.lora_modules:
        fin, fout = shapes[m]
        inputs += [TensorSpec(gc.lora_a(m), float_dtype, (L, banks.num_slots, fin, banks.max_rank)),
                   TensorSpec(gc.lora_b(m), float_dtype, (L, banks.num_slots, banks.max_rank, fout))]
    outputs = [TensorSpec(gc.LOGITS, float_dtype, ("B", 1, cfg.vocab_size))]
    for i in range(L):
        outputs += [TensorSpec(gc.present_key(i), float_dtype, ("S", "B", H, D)),
                    TensorSpec(gc.present_value(i), float_dtype, ("S", "B", H, D))]
    return tuple(inputs), tuple(outputs)


def sample_args(specs: Sequence[TensorSpec], dims: dict[str, int], vocab: int, seed: int = 0) -> list[torch.Tensor]:
    """Random example tensors for ``specs`` with symbolic dims bound by ``dims``."""
    g = torch.Generator().manual_seed(seed)
    args = []
    for spec in specs:
        shape = [dims[d] if isinstance(d, str) else d for d in spec.shape]
        if spec.name == gc.INPUT_IDS:
            args.append(torch.randint(0, vocab, shape, generator=g))
        elif spec.name == gc.POSITION_IDS:
            start = dims["P"]
            args.append(torch.arange(start, start + shape[1]).repeat(shape[0], 1))
        elif spec.name == gc.LORA_IDS:
            args.append(torch.arange(shape[0]).view(-1, 1) % max(dims.get("N", 1), 1))
        elif spec.name == gc.BATCH_INDEX:
            args.append(torch.arange(shape[0]).view(-1, 1) % dims["F"])
        else:
            dtype = torch.float16 if spec.dtype == "float16" else torch.float32
            args.append((torch.randn(shape, generator=g) * 0.1).to(dtype))
    return args


def _dynamic_axes(specs: Sequence[TensorSpec]) -> dict[str, dict[int, str]]:
    return {s.name: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)} for s in specs
            if any(isinstance(d, str) for d in s.shape)}


def _fix_output_shapes(model: onnx.ModelProto, outputs: Sequence[TensorSpec]) -> None:
    """The tracer names some output dims after internal nodes; restate them from the contract."""
    by_name = {s.name: s for s in outputs}
    for out in model.graph.output:
        spec = by_name[out.name]
        dims = out.type.tensor_type.shape.dim
        for dim, want in zip(dims, spec.shape, strict=True):
            if isinstance(want, str):
                dim.dim_param = want
            else:
                dim.dim_value = want


def _dims(value_info) -> list[int | str | None]:
    out: list[int | str | None] = []
    for d in value_info.type.tensor_type.shape.dim:
        out.append(d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None))
    return out


def _without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with large float initializers turned into typed inputs: shape inference needs
    their shapes, not their bytes, and must not copy gigabytes of weights."""
    from onnx import helper

    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.graph.node.extend(model.graph.node)
    light.graph.input.extend(model.graph.input)
    light.graph.output.extend(model.graph.output)
    for init in model.graph.initializer:
        if init.data_type in floats and int(np.prod(init.dims)) > 64:
            light.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            light.graph.initializer.append(init)
    return light


def simplify_reshapes(model: onnx.ModelProto) -> int:
    """Replace computed Reshape targets by constants using 0 (copy dim) and -1, then drop dead nodes.

    The TorchScript exporter spells every ``view(B, S, ...)`` as Shape -> Gather -> Unsqueeze ->
    Concat -> Reshape; with symbolic shape inference most of those targets are knowable, and a
    decode step then runs ~40% fewer nodes. Returns the number of Reshapes rewritten; the export is
    verified numerically afterwards, so a wrong rewrite cannot ship.
    """
    from onnx import numpy_helper
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inferred = SymbolicShapeInference.infer_shapes(_without_weights(model), auto_merge=False)
    if inferred is None:
        return 0
    shapes = {vi.name: _dims(vi) for vi in [*inferred.graph.value_info, *inferred.graph.input,
                                            *inferred.graph.output]}
    constant_names: set[str] = {init.name for init in model.graph.initializer}
    rewritten = 0
    for node in model.graph.node:
        if node.op_type != "Reshape" or node.input[1] in constant_names:
            continue
        src, dst = shapes.get(node.input[0]), shapes.get(node.output[0])
        if src is None or dst is None or any(d is None for d in [*src, *dst]):
            continue
        target: list[int] = []
        unknown = 0
        for i, d in enumerate(dst):
            if isinstance(d, int):
                target.append(d)
            elif i < len(src) and src[i] == d:
                target.append(0)
            else:
                target.append(-1)
                unknown += 1
        if unknown > 1 or any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        name = f"{node.output[0]}__shape"
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(target, np.int64), name))
        constant_names.add(name)
        node.input[1] = name
        rewritten += 1
    # Dead-node elimination, outputs first.
    needed = {o.name for o in model.graph.output}
    keep = []
    for node in reversed(list(model.graph.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    del model.graph.node[:]
    model.graph.node.extend(reversed(keep))
    used = {i for n in model.graph.node for i in n.input}
    live = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(live)
    return rewritten


def torch_export(module: nn.Module, args: Sequence[torch.Tensor], inputs: Sequence[TensorSpec],
                 outputs: Sequence[TensorSpec], path: Path, *, dynamic: bool = True) -> None:
    """TorchScript-exporter ONNX of ``module`` at ``path`` (weights inline; caller re-saves)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), tuple(args), str(path), input_names=[s.name for s in inputs],
                          output_names=[s.name for s in outputs],
                          dynamic_axes=_dynamic_axes([*inputs, *outputs]) if dynamic else None,
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    model = onnx.load(str(path))
    _fix_output_shapes(model, outputs)
    if dynamic:
        simplify_reshapes(model)
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=1024)


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantisation of MatMuls whose B is a constant: the base weights, never the banks.

    The lm_head stays float: per-tensor int8 on the vocabulary projection moves logits directly
    (SmolLM2-135M: relative logit error 0.38 with it, see the compiler report). Per-channel
    quantisation is not used: ORT 1.32's per-channel MatMulInteger path measured less accurate.
    """
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src), load_external_data=False)
    lm_head = [n.name for n in model.graph.node if n.op_type == "MatMul" and gc.LOGITS in n.output]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a "consider pre-processing" warning on root
    try:
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=False,
                         weight_type=QuantType.QInt8, use_external_data_format=True, nodes_to_exclude=lm_head,
                         extra_options={"MatMulConstBOnly": True})
    finally:
        root.setLevel(level)


def ort_optimize(src: Path, out_dir: Path, dtype: str) -> Path:
    """Save ``src`` after ONNX Runtime graph optimisation as out_dir/model.onnx (+ model.onnx.data).

    EXTENDED fusions (RMSNorm, GELU/SiLU, MatMul+Add, ...) emit CPU/CUDA contrib ops, which is
    right for fp32/int8 (CPU). fp16 artifacts target GPUs, so they get BASIC (portable) only.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if dtype == "fp16"
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
    dst = out_dir / ONNX_FILE
    so.optimized_model_filepath = str(dst)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA_FILE)
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return dst


def export_onnxruntime(decoder: MultiLoraDecoder, out_dir: str | Path, *, banks: BankShape, dtype: str = "fp32",
                       optimize: bool = True) -> tuple[GraphSpec, dict[str, float]]:
    """Export ``decoder`` (float32 weights) to out_dir/model.onnx; returns its GraphSpec and stage timings."""
    if dtype not in TORCH_DTYPES:
        raise InvalidArgument(f"dtype {dtype!r} is not one of {list(TORCH_DTYPES)}", field="options.dtype",
                              value=dtype)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    float_dtype = NUMPY_DTYPES[dtype]
    # fp16 exports a half-precision copy, so the caller's float32 decoder stays a true reference.
    module = copy.deepcopy(decoder).cast(torch.float16) if dtype == "fp16" else decoder
    inputs, outputs = contract_io(module, banks, float_dtype)
    dims = {"B": 2, "S": 3, "P": 4, "F": 3, "N": banks.num_slots}
    args = sample_args(inputs, dims, module.cfg.vocab_size)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        tmp_dir = Path(tmp)
        raw = tmp_dir / "raw.onnx"
        t0 = time.perf_counter()
        torch_export(OrtGraph(module), args, inputs, outputs, raw)
        timings["export"] = time.perf_counter() - t0
        src = raw
        if dtype == "int8":
            t0 = time.perf_counter()
            src = tmp_dir / "int8.onnx"
            quantize_int8(raw, src)
            timings["quantize"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if optimize:
            ort_optimize(src, out_dir, dtype)
        else:
            model = onnx.load(str(src))
            onnx.save(model, str(out_dir / ONNX_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=DATA_FILE, size_threshold=1024)
        timings["optimize"] = time.perf_counter() - t0
    if not (out_dir / DATA_FILE).exists():
        # Tiny models may have no initializer above the threshold; keep the file set fixed.
        (out_dir / DATA_FILE).touch()
    cfg = module.cfg
    shapes = cfg.lora_module_shapes()
    graph = GraphSpec(
        file=ONNX_FILE, target="onnxruntime", dtype=float_dtype, layers=cfg.num_layers,
        num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, vocab_size=cfg.vocab_size,
        inputs=inputs, outputs=outputs,
        lora_modules={m: LoraModuleSpec(*shapes[m]) for m in module.lora_modules})
    return graph, timings
