"""Target "ai100": the QEfficient-compatible graph, its specializations / custom IO, and qaic-exec.

The graph keeps the whole KV cache as retained state, QEfficient-style:

  inputs   input_ids [batch_size, seq_len], position_ids [batch_size, seq_len], lora_ids [batch_size, 1],
           batch_index [batch_size, 1], past_key.{i} / past_value.{i} [full_batch_size, H, ctx_len, D],
           lora_a.{m} / lora_b.{m} (banks, as in the onnxruntime graph)
  outputs  logits [batch_size, 1, V], past_key.{i}_RetainedState / past_value.{i}_RetainedState

New K/V are written inside the graph at (batch_index[b], position_ids[b, s]); padding (-1) writes
nothing. Compiling needs the Cloud AI 100 SDK (``qaic-exec``); without it we fail with
FailedPrecondition instead of pretending.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraflow import graph_contract as gc
from loraflow.errors import FailedPrecondition, LoraflowError
from loraflow.manifest import GraphSpec, LoraModuleSpec, TensorSpec
from services.compiler.export import BankShape, sample_args, torch_export
from services.compiler.modeling.decoder import MultiLoraDecoder, last_token_index
from services.compiler.modeling.layers import Dims, LoraSelector
from services.compiler.options import CompileOptions

SDK_EXEC_DIR = Path("/opt/qti-aic/exec")
SPECIALIZATIONS_FILE = "specializations.json"
CUSTOM_IO_FILE = "custom_io.yaml"
QPC_DIR = "qpc"
# QEfficient masks with a finite value that survives -convert-to-fp16 (finfo(float32).min would not).
AI100_MASK_VALUE = -10000.0


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
            f"{SDK_EXEC_DIR}; install the SDK on the compiler host or use target 'onnxruntime'",
            field="options.target", value="ai100", reason="AI100_SDK_MISSING")
    return exe


class Ai100Graph(nn.Module):
    """Same weights and LoRA selection as the onnxruntime graph; cache layout [F, H, ctx_len, D]."""

    def __init__(self, decoder: MultiLoraDecoder):
        super().__init__()
        self.decoder = decoder
        self.num_layers = decoder.cfg.num_layers
        self.modules_ = decoder.lora_modules

    @staticmethod
    def write_cache(cache: torch.Tensor, rows: torch.Tensor, position_ids: torch.Tensor, new: torch.Tensor
                    ) -> torch.Tensor:
        """cache [F, H, C, D]; new [B, S, H, D] lands at (rows[b], :, position_ids[b, s]); -1 is dropped."""
        C = cache.shape[2]
        hit = (position_ids.unsqueeze(-1) == torch.arange(C).view(1, 1, C)).to(new.dtype)  # [B, S, C]
        written = hit.sum(dim=1) > 0  # [B, C]
        placed = torch.einsum("bsc,bshd->bhcd", hit, new)  # [B, H, C, D]
        current = cache[rows]  # [F, H, C, D] -> [B, H, C, D]
        updated = torch.where(written.unsqueeze(1).unsqueeze(-1), placed, current)  # [B, H, C, D]
        return cache.index_put((rows,), updated)  # rows of [F, H, C, D] replaced

    def forward(self, input_ids, position_ids, lora_ids, batch_index, *rest):
        dec = self.decoder
        L = self.num_layers
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
        rows = batch_index.reshape(-1)  # [B, 1] -> [B]
        # Cache position j is visible to token (b, s) when j <= position_ids[b, s].
        visible = torch.arange(C).view(1, 1, C) <= position_ids.unsqueeze(-1)  # [B, S, C]
        bias = torch.where(visible, torch.zeros((), dtype=h.dtype),
                           torch.full((), AI100_MASK_VALUE, dtype=h.dtype)).view(B, 1, 1, S, C)
        retained = []
        for i, layer in enumerate(dec.layers):
            attn = layer.self_attn
            q, k, v = attn.project_qkv(layer.input_layernorm(h), lora, i, rope, dims)
            cache_k = self.write_cache(past_k[i], rows, position_ids, k)  # [F, H, C, D]
            cache_v = self.write_cache(past_v[i], rows, position_ids, v)
            out = attn.attend(q, cache_k[rows], cache_v[rows], bias, dims)  # keys/values [B, H, C, D]
            h = h + attn.output(out, lora, i)
            h = h + layer.mlp(layer.post_attention_layernorm(h), lora, i)
            retained += [cache_k, cache_v]
        idx = last_token_index(position_ids).view(B, 1, 1).expand(B, 1, h.shape[-1])  # [B, 1, hidden]
        return (dec.logits_from_hidden(torch.gather(h, 1, idx)), *retained)


def ai100_io(decoder: MultiLoraDecoder, banks: BankShape) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    cfg = decoder.cfg
    H, D, L = cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
    cache = ("full_batch_size", H, "ctx_len", D)
    inputs = [TensorSpec(gc.INPUT_IDS, "int64", ("batch_size", "seq_len")),
              TensorSpec(gc.POSITION_IDS, "int64", ("batch_size", "seq_len")),
              TensorSpec(gc.LORA_IDS, "int64", ("batch_size", 1)),
              TensorSpec(gc.BATCH_INDEX, "int64", ("batch_size", 1))]
    for i in range(L):
        inputs += [TensorSpec(gc.past_key(i), "float32", cache), TensorSpec(gc.past_value(i), "float32", cache)]
    shapes = cfg.lora_module_shapes()
    for m in decoder.lora_modules:
        fin, fout = shapes[m]
        inputs += [TensorSpec(gc.lora_a(m), "float32", (L, banks.num_slots, fin, banks.max_rank)),
                   TensorSpec(gc.lora_b(m), "float32", (L, banks.num_slots, banks.max_rank, fout))]
    outputs = [TensorSpec(gc.LOGITS, "float32", ("batch_size", 1, cfg.vocab_size))]
    for i in range(L):
        outputs += [TensorSpec(gc.retained_key(i), "float32", cache),
                    TensorSpec(gc.retained_value(i), "float32", cache)]
    return tuple(inputs), tuple(outputs)


def export_ai100(decoder: MultiLoraDecoder, out_dir: str | Path, *, banks: BankShape, ctx_len: int,
                 file_name: str = "model.onnx") -> GraphSpec:
    """Export the retained-state graph (fp32; qaic-exec converts to fp16) to out_dir/file_name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    decoder.cast(torch.float32)
    inputs, outputs = ai100_io(decoder, banks)
    dims = {"batch_size": 2, "seq_len": 3, "full_batch_size": 3, "ctx_len": min(ctx_len, 16),
            "N": banks.num_slots, "B": 2, "S": 3, "P": 0, "F": 3}
    args = sample_args(inputs, dims, decoder.cfg.vocab_size)
    torch_export(Ai100Graph(decoder), args, inputs, outputs, out_dir / file_name)
    cfg = decoder.cfg
    shapes = cfg.lora_module_shapes()
    return GraphSpec(file=file_name, target="ai100", dtype="float32", layers=cfg.num_layers,
                     num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, vocab_size=cfg.vocab_size,
                     inputs=inputs, outputs=outputs,
                     lora_modules={m: LoraModuleSpec(*shapes[m]) for m in decoder.lora_modules})


# --- compile inputs ------------------------------------------------------------------------------
def specializations(options: CompileOptions) -> list[dict[str, int]]:
    """Prefill (seq_len = prefill_seq_len) and decode (seq_len = 1) for resolved ``options``.

    Our graph always has batch_index, so it is always the continuous-batching pair QEfficient
    writes: prefill runs batch_size rows into a cache of full_batch_size slots, decode runs all
    full_batch_size slots.
    """
    fbs, ctx = int(options.full_batch_size), int(options.ctx_len)
    prefill = {"batch_size": int(options.batch_size), "seq_len": int(options.prefill_seq_len), "ctx_len": ctx,
               "full_batch_size": fbs}
    decode = {"batch_size": fbs, "seq_len": 1, "ctx_len": ctx, "full_batch_size": fbs}
    return [prefill, decode]


def write_specializations(path: Path, specs: Sequence[Mapping[str, Any]]) -> Path:
    """QEfficient's file format: {"specializations": [{name: "value", ...}, ...]} with string values."""
    path.write_text(json.dumps({"specializations": [{k: str(v) for k, v in s.items()} for s in specs]},
                               indent=4) + "\n")
    return path


def custom_io(num_layers: int, kv_dtype: str = "float16") -> dict[str, str]:
    """The KV cache travels in fp16 both ways (in and retained out), as QEfficient compiles it."""
    io: dict[str, str] = {}
    for suffix in ("", "_RetainedState"):
        for i in range(num_layers):
            for kind in ("key", "value"):
                io[f"past_{kind}.{i}{suffix}"] = kv_dtype
    return io


def write_custom_io(path: Path, io: Mapping[str, str]) -> Path:
    path.write_text("".join(f" - IOName: {name}\n   Precision: {dtype}\n\n" for name, dtype in io.items()))
    return path


def qaic_exec_command(*, qaic_exec: str | Path, onnx_path: Path, specializations_path: Path,
                      custom_io_path: Path, qpc_dir: Path, num_cores: int, mxfp6_matmul: bool,
                      num_devices: int = 1) -> list[str]:
    cmd = [
        str(qaic_exec),
        f"-m={onnx_path}",
        "-aic-hw",
        "-aic-hw-version=2.0",
        f"-network-specialization-config={specializations_path}",
        "-convert-to-fp16",
        "-retained-state",
        f"-aic-num-cores={num_cores}",
        f"-custom-IO-list-file={custom_io_path}",
        "-compile-only",
        f"-aic-binary-dir={qpc_dir}",
    ]
    if mxfp6_matmul:
        cmd.append("-mxfp6-matmul")
    if num_devices > 1:
        cmd.append(f"-mdp-num-devices={num_devices}")  # only when tensor-slicing over several cards
    return cmd


def compile_qpc(onnx_path: Path, out_dir: Path, options: CompileOptions, num_layers: int,
                *, timeout_s: float = 3600) -> tuple[Path, list[str]]:
    """Write specializations + custom IO next to the graph and run qaic-exec; returns (qpc dir, command)."""
    exe = require_sdk()
    spec_path = write_specializations(out_dir / SPECIALIZATIONS_FILE, specializations(options))
    io_path = write_custom_io(out_dir / CUSTOM_IO_FILE, custom_io(num_layers))
    qpc = out_dir / QPC_DIR
    cmd = qaic_exec_command(qaic_exec=exe, onnx_path=onnx_path, specializations_path=spec_path,
                            custom_io_path=io_path, qpc_dir=qpc, num_cores=int(options.num_cores or 16),
                            mxfp6_matmul=options.mxfp6_matmul)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if proc.returncode != 0:
        raise LoraflowError(f"qaic-exec failed with exit code {proc.returncode}: {proc.stderr[-2000:]}",
                            reason="AI100_COMPILE_FAILED")
    return qpc, cmd
