"""Target "ai100": the graph QEfficient hands to qaic-exec, its specializations / custom IO, the command.

The KV cache is retained state, [F, H, ctx_len, D] per layer, written and read inside the graph by
the Cloud AI 100 operators of the ``com.qualcomm.cloud`` domain, as QEfficient's cache does:

  continuous batching (full_batch_size > batch_size): CtxScatterCB / CtxGatherCB, rows pick their
      cache slot with ``batch_index``; a padding position (-1) is written as INT32_MAX, an index
      past the cache, which writes nothing.
  otherwise (full_batch_size == batch_size, QEfficient's "full_batch_size unset"): CtxScatter /
      CtxGather, row b owns cache row b and there is no batch_index input; a padding position -1
      is passed as is and counts from the end (ctx_len - 1), which no valid token reads before it
      writes it itself.
  reads: positions past the row's largest position are gathered as INT32_MAX (out of range: read
      as zero) and masked with AI100_MASK_VALUE, a finite value that survives -convert-to-fp16.

Each operator is carried in the model as an ONNX function (FunctionProto, domain com.qualcomm.cloud)
whose body is standard ONNX, so ONNX Runtime executes the very file qaic-exec compiles; qaic-exec
maps the domain's operators to its own kernels. Bodies keep the operators' out-of-range rules
(ONNX Runtime's ScatterND / GatherND would reject such an index): a write past the cache goes to a
scratch position that is sliced off, a read past it yields zero.

  inputs   input_ids [batch_size, seq_len], position_ids [batch_size, seq_len], lora_ids [batch_size, 1],
           batch_index [batch_size, 1] (continuous batching only),
           past_key.{i} / past_value.{i} [full_batch_size | batch_size, H, ctx_len, D],
           lora_a.{m} / lora_b.{m} (adapter banks, graph inputs as in the onnxruntime graph)
  outputs  logits [batch_size, 1, V] at each row's largest position,
           past_key.{i}_RetainedState / past_value.{i}_RetainedState

The graph itself is written node by node from the checkpoint, one tensor at a time, with fp32 or fp16
weights (services/compiler/ai100_writer.py); this module holds the operators' function bodies, the IO,
specializations, custom IO and the qaic-exec command.

Compiling needs the Cloud AI 100 SDK (``qaic-exec``); ``ai100_stage="export"`` stops before it and
publishes the bundle with the exact command line instead.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from loraflow.artifact import graph_contract as gc
from loraflow.artifact.manifest import TensorSpec
from loraflow.errors import FailedPrecondition, InvalidArgument, LoraflowError
from services.compiler.modeling.config import DecoderConfig
from services.compiler.options import CompileOptions

SDK_EXEC_DIR = Path("/opt/qti-aic/exec")
DEFAULT_QAIC_EXEC = SDK_EXEC_DIR / "qaic-exec"
ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
SPECIALIZATIONS_FILE = "specializations.json"
CUSTOM_IO_FILE = "custom_io.yaml"
COMMAND_FILE = "qaic_exec_command.txt"
QPC_DIR = "qpc"
OPSET = 17
QAIC_DOMAIN = "com.qualcomm.cloud"
# Part of every ai100 artifact id: bump when the graph changes.
GRAPH_VERSION = "ai100-ctx-ops/1"
# Finite, so a fully masked row (padding, idle slot) stays finite after -convert-to-fp16
# (float32's min would overflow fp16 to -inf and a row of -inf softmaxes to NaN).
AI100_MASK_VALUE = -10000.0
INVALID_INDEX = int(np.iinfo(np.int32).max)  # QEfficient's "write nothing / read nothing" index
HW_VERSION = "2.0"


def find_qaic_exec() -> Path | None:
    found = shutil.which("qaic-exec")
    if found:
        return Path(found)
    candidate = SDK_EXEC_DIR / "qaic-exec"
    return candidate if candidate.is_file() and os.access(candidate, os.X_OK) else None


def sdk_available() -> bool:
    return find_qaic_exec() is not None


def require_sdk() -> Path:
    exe = find_qaic_exec()
    if exe is None:
        raise FailedPrecondition(
            "target 'ai100' needs the Qualcomm Cloud AI 100 SDK: qaic-exec is not on PATH nor in "
            f"{SDK_EXEC_DIR}; install the SDK on the compiler host, use options.ai100_stage='export' for "
            "the bundle without a QPC, or use target 'onnxruntime'",
            field="options.target", value="ai100", reason="AI100_SDK_MISSING")
    return exe


def continuous_batching(options: CompileOptions) -> bool:
    """More KV-cache slots than prefill rows needs batch_index: QEfficient's continuous batching."""
    return int(options.full_batch_size) > int(options.batch_size)


# --- the com.qualcomm.cloud operators as ONNX functions (standard-operator bodies) -----------------
def _const(name: str, values: Sequence[int]):
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, onnx.TensorProto.INT64,
                                                                             [len(values)], list(values)))


def _dims(data: str, prefix: str) -> list:
    """Nodes giving {prefix}_d0..d3: the four dims of ``data`` as 1-element int64 tensors."""
    nodes = [helper.make_node("Shape", [data], [f"{prefix}_shape"])]
    for i in range(4):
        nodes += [_const(f"{prefix}_i{i}", [i]),
                  helper.make_node("Gather", [f"{prefix}_shape", f"{prefix}_i{i}"], [f"{prefix}_d{i}"], axis=0)]
    return nodes


def _in_range_nodes(index: str, size: str, out: str) -> list:
    return [_const("zero_i", [0]),
            helper.make_node("GreaterOrEqual", [index, "zero_i"], [f"{out}_ge"]),
            helper.make_node("Less", [index, size], [f"{out}_lt"]),
            helper.make_node("And", [f"{out}_ge", f"{out}_lt"], [out])]


def _index_grid(batch: str | None, rows: str, heads: str, cols: str, ctx: str, ctx_axes: Sequence[int]) -> list:
    """indices [rows, heads, cols, 3] = (row or batch_index[row], head, ctx[row, ., col])."""
    nodes = [_const("one", [1]), _const("zero", [0]),
             helper.make_node("Concat", [rows, heads, cols, "one"], ["grid_shape"], axis=0)]
    if batch is None:
        nodes += [helper.make_node("Range", ["zero_s", rows + "_s", "one_s"], ["row_range"])]
        nodes += [_const("ax123", [1, 2, 3]), helper.make_node("Unsqueeze", ["row_range", "ax123"], ["row_u"])]
    else:
        nodes += [_const("ax23", [2, 3]), helper.make_node("Unsqueeze", [batch, "ax23"], ["row_u"])]
    nodes += [helper.make_node("Expand", ["row_u", "grid_shape"], ["row_idx"]),
              helper.make_node("Range", ["zero_s", heads + "_s", "one_s"], ["head_range"]),
              _const("ax023", [0, 2, 3]), helper.make_node("Unsqueeze", ["head_range", "ax023"], ["head_u"]),
              helper.make_node("Expand", ["head_u", "grid_shape"], ["head_idx"]),
              _const("ctx_axes", list(ctx_axes)), helper.make_node("Unsqueeze", [ctx, "ctx_axes"], ["ctx_u"]),
              helper.make_node("Expand", ["ctx_u", "grid_shape"], ["ctx_idx"]),
              helper.make_node("Concat", ["row_idx", "head_idx", "ctx_idx"], ["indices"], axis=3)]
    return nodes


def _scalars(*names: str) -> list:
    """Scalar views ({name}_s) of 1-element dims, for Range; plus scalar 0 and 1."""
    nodes = [helper.make_node("Constant", [], ["zero_s"], value=helper.make_tensor("z", onnx.TensorProto.INT64, [], [0])),
             helper.make_node("Constant", [], ["one_s"], value=helper.make_tensor("o", onnx.TensorProto.INT64, [], [1])),
             _const("ax0", [0])]
    for n in names:
        nodes.append(helper.make_node("Squeeze", [n, "ax0"], [n + "_s"]))
    return nodes


def _scatter_function(cb: bool) -> onnx.FunctionProto:
    name = "CtxScatterCB" if cb else "CtxScatter"
    inputs = ["data", "batch_index", "position_ids", "updates"] if cb else ["data", "position_ids", "updates"]
    nodes = _dims("data", "dd") + _dims("updates", "ud")
    nodes += _scalars("ud_d0", "dd_d1")
    if cb:
        # Out-of-range positions go to scratch position C of a one-longer copy, sliced off after.
        nodes += _in_range_nodes("position_ids", "dd_d2", "valid")
        nodes += [helper.make_node("Where", ["valid", "position_ids", "dd_d2"], ["pos"]),
                  _const("one_c", [1]),
                  helper.make_node("Concat", ["dd_d0", "dd_d1", "one_c", "dd_d3"], ["pad_shape"], axis=0),
                  helper.make_node("Constant", [], ["zero_f"], value=helper.make_tensor("zf", onnx.TensorProto.FLOAT,
                                                                                         [], [0.0])),
                  helper.make_node("CastLike", ["zero_f", "data"], ["zero_t"]),
                  helper.make_node("Expand", ["zero_t", "pad_shape"], ["pad"]),
                  helper.make_node("Concat", ["data", "pad"], ["ext"], axis=2)]
        nodes += _index_grid("batch_index", "ud_d0", "dd_d1", "ud_d2", "pos", (1, 3))
        nodes += [helper.make_node("ScatterND", ["ext", "indices", "updates"], ["ext_out"]),
                  _const("start0", [0]), _const("axis2", [2]),
                  helper.make_node("Slice", ["ext_out", "start0", "dd_d2", "axis2"], ["out"])]
    else:
        # Negative positions count from the end, as ONNX ScatterND defines and QEfficient relies on.
        nodes += _index_grid(None, "ud_d0", "dd_d1", "ud_d2", "position_ids", (1, 3))
        nodes += [helper.make_node("ScatterND", ["data", "indices", "updates"], ["out"])]
    return helper.make_function(QAIC_DOMAIN, name, inputs, ["out"], nodes, [helper.make_opsetid("", OPSET)])


def _gather_function(cb: bool) -> onnx.FunctionProto:
    name = "CtxGatherCB" if cb else "CtxGather"
    inputs = ["data", "batch_index", "ctx_indices"] if cb else ["data", "ctx_indices"]
    rows_src = "batch_index" if cb else "data"
    nodes = _dims("data", "dd")
    nodes += [helper.make_node("Shape", [rows_src], ["rows_shape"]), _const("r0", [0]),
              helper.make_node("Gather", ["rows_shape", "r0"], ["rows"], axis=0)]
    nodes += _scalars("rows", "dd_d1")
    nodes += _in_range_nodes("ctx_indices", "dd_d2", "valid")  # [B, 1, C]
    nodes += [_const("zero_idx", [0]),
              helper.make_node("Where", ["valid", "ctx_indices", "zero_idx"], ["safe"])]
    nodes += _index_grid("batch_index" if cb else None, "rows", "dd_d1", "dd_d2", "safe", (3,))
    nodes += [helper.make_node("GatherND", ["data", "indices"], ["picked"]),
              _const("axm1", [-1]), helper.make_node("Unsqueeze", ["valid", "axm1"], ["valid_u"]),
              helper.make_node("Constant", [], ["zero_f"], value=helper.make_tensor("zf", onnx.TensorProto.FLOAT,
                                                                                     [], [0.0])),
              helper.make_node("CastLike", ["zero_f", "data"], ["zero_t"]),
              helper.make_node("Where", ["valid_u", "picked", "zero_t"], ["out"])]
    return helper.make_function(QAIC_DOMAIN, name, inputs, ["out"], nodes, [helper.make_opsetid("", OPSET)])


def qaic_functions(cb: bool) -> list[onnx.FunctionProto]:
    return [_scatter_function(cb), _gather_function(cb)]


def attach_functions(model: onnx.ModelProto, cb: bool) -> None:
    """Add the operators' FunctionProtos (and the domain's opset) so ONNX Runtime can run the model."""
    used = {n.op_type for n in model.graph.node if n.domain == QAIC_DOMAIN}
    del model.functions[:]
    model.functions.extend(f for f in qaic_functions(cb) if f.name in used)
    if not any(o.domain == QAIC_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(QAIC_DOMAIN, 1))


def ai100_io(cfg: DecoderConfig, lora_modules: Sequence[str], num_slots: int, max_rank: int, cb: bool
             ) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The bundle graph's inputs and outputs (float32 whatever the weights' dtype: the card's IO contract)."""
    H, D, L = cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
    cache = ("full_batch_size" if cb else "batch_size", H, "ctx_len", D)
    inputs = [TensorSpec(gc.INPUT_IDS, "int64", ("batch_size", "seq_len")),
              TensorSpec(gc.POSITION_IDS, "int64", ("batch_size", "seq_len")),
              TensorSpec(gc.LORA_IDS, "int64", ("batch_size", 1))]
    if cb:
        inputs.append(TensorSpec(gc.BATCH_INDEX, "int64", ("batch_size", 1)))
    for i in range(L):
        inputs += [TensorSpec(gc.past_key(i), "float32", cache), TensorSpec(gc.past_value(i), "float32", cache)]
    shapes = cfg.lora_module_shapes()
    for m in lora_modules:
        fin, fout = shapes[m]
        inputs += [TensorSpec(gc.lora_a(m), "float32", (L, num_slots, fin, max_rank)),
                   TensorSpec(gc.lora_b(m), "float32", (L, num_slots, max_rank, fout))]
    outputs = [TensorSpec(gc.LOGITS, "float32", ("batch_size", 1, cfg.vocab_size))]
    for i in range(L):
        outputs += [TensorSpec(gc.retained_key(i), "float32", cache),
                    TensorSpec(gc.retained_value(i), "float32", cache)]
    return tuple(inputs), tuple(outputs)


# --- compile inputs ------------------------------------------------------------------------------
def specializations(options: CompileOptions) -> list[dict[str, int]]:
    """Prefill (batch_size rows of prefill_seq_len) and decode (full_batch_size rows of 1).

    With continuous batching the pair carries full_batch_size (the cache's rows); without it
    the cache has batch_size rows and both specializations run batch_size rows, as QEfficient writes.
    """
    bs, fbs, ctx = int(options.batch_size), int(options.full_batch_size), int(options.ctx_len)
    if continuous_batching(options):
        return [{"batch_size": bs, "seq_len": int(options.prefill_seq_len), "ctx_len": ctx, "full_batch_size": fbs},
                {"batch_size": fbs, "seq_len": 1, "ctx_len": ctx, "full_batch_size": fbs}]
    return [{"batch_size": bs, "seq_len": int(options.prefill_seq_len), "ctx_len": ctx},
            {"batch_size": bs, "seq_len": 1, "ctx_len": ctx}]


def write_specializations(path: Path, specs: Sequence[Mapping[str, Any]]) -> Path:
    """QEfficient's file format: {"specializations": [{name: "value", ...}, ...]} with string values."""
    path.write_text(json.dumps({"specializations": [{k: str(v) for k, v in s.items()} for s in specs]},
                               indent=4) + "\n")
    return path


def custom_io(num_layers: int, kv_dtype: str = "float16") -> dict[str, str]:
    """The KV cache travels in ``kv_dtype`` both ways (in and retained out), as QEfficient compiles it."""
    io: dict[str, str] = {}
    for suffix in ("", "_RetainedState"):
        for i in range(num_layers):
            for kind in ("key", "value"):
                io[f"past_{kind}.{i}{suffix}"] = kv_dtype
    return io


def write_custom_io(path: Path, io: Mapping[str, str]) -> Path:
    path.write_text("".join(f" - IOName: {name}\n   Precision: {dtype}\n\n" for name, dtype in io.items()))
    return path


# Flags qaic_exec_command sets itself: a compiler option may not repeat or override one.
OWN_FLAGS = ("-m", "-aic-hw", "-aic-hw-version", "-compile-only", "-retained-state", "-convert-to-fp16",
             "-network-specialization-config", "-custom-IO-list-file", "-aic-num-cores", "-mxfp6-matmul",
             "-mxint8", "-aic-binary-dir", "-mdp-num-devices")
# Passed-through options may not name files: the compiler host's paths are not the caller's.
_PATH_CHARS = ("/", "\\", "..", "~")


def check_compiler_options(options: Sequence[str]) -> tuple[str, ...]:
    """Validated passthrough options (their syntax is CompileOptions.validate's): no flag we set,
    no repeats, no file paths. ``-mxint8`` is ours (it also makes the KV custom IO mxint8)."""
    seen: set[str] = set()
    for opt in options:
        flag, _, value = opt.partition("=")
        if flag in OWN_FLAGS and flag != "-mxint8":
            raise InvalidArgument(f"options.compiler_options {opt!r} repeats a flag loraflow sets itself "
                                  f"({', '.join(OWN_FLAGS)}); use the matching compile option",
                                  field="options.compiler_options", value=opt)
        if flag == "-mxint8" and value:
            raise InvalidArgument("options.compiler_options '-mxint8' takes no value", field="options.compiler_options",
                                  value=opt)
        if flag in seen:
            raise InvalidArgument(f"options.compiler_options names {flag!r} twice", field="options.compiler_options",
                                  value=opt)
        if any(c in value for c in _PATH_CHARS):
            raise InvalidArgument(f"options.compiler_options {opt!r}: values may not be file paths",
                                  field="options.compiler_options", value=opt)
        seen.add(flag)
    return tuple(options)


def qaic_exec_command(*, qaic_exec: str | Path, onnx_path: str | Path, specializations_path: str | Path,
                      custom_io_path: str | Path, qpc_dir: str | Path, num_cores: int, mxfp6_matmul: bool,
                      mxint8: bool = False, num_devices: int = 1, compiler_options: Sequence[str] = ()) -> list[str]:
    """The qaic-exec argv QEfficient's _compile builds, plus validated passthrough options."""
    extra = [o for o in check_compiler_options(compiler_options) if o != "-mxint8"]
    cmd = [
        str(qaic_exec),
        f"-m={onnx_path}",
        "-aic-hw",
        f"-aic-hw-version={HW_VERSION}",
        "-compile-only",
        "-retained-state",
        "-convert-to-fp16",
        f"-network-specialization-config={specializations_path}",
        f"-custom-IO-list-file={custom_io_path}",
        f"-aic-num-cores={num_cores}",
    ]
    if mxfp6_matmul:
        cmd.append("-mxfp6-matmul")
    if mxint8:
        cmd.append("-mxint8")  # KV cache IO compressed to MXINT8 (custom_io says mxint8)
    if num_devices > 1:
        cmd.append(f"-mdp-num-devices={num_devices}")  # only when tensor-slicing over several cards
    cmd += extra
    cmd.append(f"-aic-binary-dir={qpc_dir}")
    return cmd


@dataclass(frozen=True)
class Bundle:
    """What qaic-exec compiles, relative to the artifact directory (the command runs there)."""

    specializations: tuple[Mapping[str, int], ...]
    custom_io: Mapping[str, str]
    command: tuple[str, ...]
    continuous_batching: bool

    def to_dict(self) -> dict[str, Any]:
        return {"specializations_file": SPECIALIZATIONS_FILE, "custom_io_file": CUSTOM_IO_FILE,
                "command_file": COMMAND_FILE, "qaic_exec": list(self.command), "cwd": ".",
                "continuous_batching": self.continuous_batching, "graph_version": GRAPH_VERSION,
                "kv_precision": next(iter(self.custom_io.values()), "float16")}


def write_bundle(out_dir: Path, options: CompileOptions, num_layers: int, qaic_exec: str | Path | None = None
                 ) -> Bundle:
    """specializations.json, custom_io.yaml and the qaic-exec command line (run from ``out_dir``)."""
    specs = specializations(options)
    mxint8 = "-mxint8" in options.compiler_options
    io = custom_io(num_layers, "mxint8" if mxint8 else "float16")
    write_specializations(out_dir / SPECIALIZATIONS_FILE, specs)
    write_custom_io(out_dir / CUSTOM_IO_FILE, io)
    cmd = qaic_exec_command(qaic_exec=qaic_exec or DEFAULT_QAIC_EXEC, onnx_path=ONNX_FILE,
                            specializations_path=SPECIALIZATIONS_FILE, custom_io_path=CUSTOM_IO_FILE,
                            qpc_dir=QPC_DIR, num_cores=int(options.num_cores or 16),
                            mxfp6_matmul=bool(options.mxfp6_matmul), mxint8=mxint8,
                            compiler_options=options.compiler_options)
    (out_dir / COMMAND_FILE).write_text(shlex.join(cmd) + "\n")
    return Bundle(specializations=tuple(specs), custom_io=io, command=tuple(cmd),
                  continuous_batching=continuous_batching(options))


def compile_qpc(out_dir: Path, bundle: Bundle, *, timeout_s: float = 3600) -> Path:
    """Run the bundle's qaic-exec command in ``out_dir``; returns the QPC directory."""
    proc = subprocess.run(list(bundle.command), cwd=out_dir, capture_output=True, text=True, timeout=timeout_s,
                          check=False)
    if proc.returncode != 0:
        raise LoraflowError(f"qaic-exec failed with exit code {proc.returncode}: {proc.stderr[-2000:]}",
                            reason="AI100_COMPILE_FAILED")
    qpc = out_dir / QPC_DIR
    if not qpc.is_dir():
        raise LoraflowError(f"qaic-exec exited 0 but wrote no {QPC_DIR}/ directory", reason="AI100_COMPILE_FAILED")
    return qpc
