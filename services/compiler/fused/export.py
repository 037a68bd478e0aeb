"""Write the fused graph of a model into an artifact directory (model.onnx [+ model.native.onnx] + model.onnx.data).

The weights stream from a WeightSource one tensor at a time (see builder.py); the second graph reuses
every initializer of the first, so the checkpoint is read once."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import onnx

from loraflow import native as native_lora
from loraflow.artifact import graph_contract as gc
from loraflow.artifact.manifest import GraphSpec, LoraModuleSpec, TensorSpec
from services.compiler.fused.builder import ExternalData, FusedGraphBuilder, FusedGraphOptions, WrittenWeight
from services.compiler.modeling.config import DecoderConfig
from services.compiler.modeling.weights import WeightSource

ONNX_FILE = "model.onnx"
NATIVE_ONNX_FILE = "model.native.onnx"  # the same graph with loraflow/native's LoraRows (optional)
DATA_FILE = "model.onnx.data"


def fused_io(cfg: DecoderConfig, opts: FusedGraphOptions) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The fused graph's inputs and outputs (symbolic dims as letters; see graph_contract.py)."""
    H, D, L, C = cfg.num_kv_heads, cfg.head_dim, cfg.num_layers, opts.ctx_len
    inputs = [TensorSpec(gc.INPUT_IDS, "int64", ("B", "S")), TensorSpec(gc.LORA_IDS, "int64", ("B", 1)),
              TensorSpec(gc.SEQLENS_K, "int32", ("B",)), TensorSpec(gc.TOTAL_SEQUENCE_LENGTH, "int32", ()),
              TensorSpec(gc.LOGITS_INDEX, "int64", ("B", 1))]
    outputs = [TensorSpec(gc.LOGITS, "float32", ("B", 1, cfg.vocab_size))]
    for i in range(L):
        inputs += [TensorSpec(gc.past_key(i), "float32", ("B", H, C, D)),
                   TensorSpec(gc.past_value(i), "float32", ("B", H, C, D))]
        outputs += [TensorSpec(gc.present_key(i), "float32", ("B", H, C, D)),
                    TensorSpec(gc.present_value(i), "float32", ("B", H, C, D))]
    shapes = cfg.lora_module_shapes()
    for m in opts.lora_modules:
        fin, fout = shapes[m]
        inputs += [TensorSpec(gc.lora_a(m), "float32", (gc.BANK_ROWS_DIM, fin, opts.max_rank)),
                   TensorSpec(gc.lora_b(m), "float32", (gc.BANK_ROWS_DIM, opts.max_rank, fout))]
    return tuple(inputs), tuple(outputs)


@dataclass(frozen=True)
class FusedExport:
    graph: GraphSpec
    timings: dict[str, float]
    written: dict[str, WrittenWeight]  # decoder tensor -> where the graph holds it (for reading it back)
    digests: dict[str, str]  # file name -> sha256 of the files written (hashed while writing)


def export_fused(weights: WeightSource, out_dir: str | Path, opts: FusedGraphOptions, *,
                 native: bool | None = None) -> FusedExport:
    """Write out_dir/model.onnx (LoRA in standard operators) and its weights file (model.onnx.data,
    written directly and hashed) from ``weights``, one tensor at a time; with ``native`` (default: when
    loraflow/native's library is built here) also model.native.onnx, the same graph with LoraRows nodes
    over the same weights file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = weights.cfg
    if native is None:
        native = bool(opts.lora_modules) and native_lora.library_path() is not None
    t0 = time.perf_counter()
    external = ExternalData(out_dir / DATA_FILE, DATA_FILE)
    try:
        builder = FusedGraphBuilder(cfg, weights, replace(opts, lora_kernel="onnx"), external)
        model = builder.build()
        native_model = None
        if native:  # every initializer is already in the data file: this build reads and writes no weight
            native_model = FusedGraphBuilder(cfg, weights, replace(opts, lora_kernel="native"), external).build()
    finally:
        data_sha = external.close()
    timings = {"export": time.perf_counter() - t0}
    t0 = time.perf_counter()
    onnx.save(model, str(out_dir / ONNX_FILE))  # the graph only: every large tensor is already external
    if native_model is not None:
        onnx.save(native_model, str(out_dir / NATIVE_ONNX_FILE))
    timings["save"] = time.perf_counter() - t0
    inputs, outputs = fused_io(cfg, opts)
    shapes = cfg.lora_module_shapes()
    graph = GraphSpec(file=ONNX_FILE, target="onnxruntime", dtype="float32", layers=cfg.num_layers,
                      num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, vocab_size=cfg.vocab_size,
                      inputs=inputs, outputs=outputs,
                      lora_modules={m: LoraModuleSpec(*shapes[m]) for m in opts.lora_modules},
                      kv_layout=gc.KV_LAYOUT_SHARED, native_file=NATIVE_ONNX_FILE if native_model is not None else "",
                      native_inputs=(TensorSpec(gc.LORA_RANKS, "int64", (gc.SLOTS_DIM, len(opts.lora_modules))),)
                      if native_model is not None
                      else ())
    return FusedExport(graph=graph, timings=timings, written=builder.written, digests={DATA_FILE: data_sha})
