"""Weight-only quantisation accuracy: int4 / int8 (MatMulNBits) artifacts against the fp32 artifact.

SmolLM2-135M-Instruct, the 8 chat prompts of bench/inference.py, row i on LoRA adapter i (the banks stay
float), 32 greedy tokens. For each dtype in (int4, int8), accuracy level in (0, 4) and block size in
(32, 128) it builds the artifact through services.compiler.artifact.build_artifact and prints one JSON
object with, per variant:

  first_max_abs_logit_err   max |logit - fp32 logit| over rows and vocabulary at the first generated position
  first_rel_logit_err       that, divided by max |fp32 logit| at that position
  greedy_match              share of the 8 x 32 greedy tokens equal to the fp32 path's, teacher-forced: every
                            step feeds the fp32 path's token, so one divergence does not cascade
  first_token_match         share of rows whose first generated token equals fp32's

The verification tolerances per dtype are set from these numbers. Until the compiler knows dtype
"int4" and the quant_block_size / quant_accuracy_level options it prints why it cannot run.

``--genai`` measures the same thing on onnxruntime-genai's builds of the same checkpoint (base model, one
row at a time, no adapters): its MatMulNBits weights come from the same ONNX Runtime quantiser our
services/compiler/fused/quantize.py calls (symmetric by default), so it is the reference the fused
builder's numbers should land near.

Usage: python bench/quant_accuracy.py [--threads 2] [--tokens 32] [--dtypes int4,int8] [--genai]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from inference import PROMPTS, make_adapters, say, uptime  # noqa: E402  (the same prompts and adapters)

ROWS = 8
RANK = 8
TARGETS = ["q_proj", "v_proj"]
ACCURACY_LEVELS = (0, 4)
BLOCK_SIZES = (32, 128)


def unsupported(dtypes: list[str]) -> str | None:
    """Why the compiler cannot build these quantised variants yet (None when it can)."""
    from services.compiler.options import DTYPES, CompileOptions

    missing = [d for d in dtypes if d not in DTYPES]
    if missing:
        return f"services.compiler.options.DTYPES={list(DTYPES)} lacks {missing} (fused graph builder not landed)"
    names = {f.name for f in fields(CompileOptions)}
    absent = [n for n in ("quant_block_size", "quant_accuracy_level") if n not in names]
    if absent:
        return f"CompileOptions has no {absent} (fused graph builder not landed)"
    return None


def base_options(tokens: int):
    from services.compiler.options import CompileOptions

    return CompileOptions(batch_size=ROWS, full_batch_size=ROWS, prefill_seq_len=32, ctx_len=128 + tokens,
                          max_rank=RANK, adapter_slots=ROWS)


def build(model_dir: Path, adapters, out: Path, options) -> Path:
    from services.compiler.artifact import build_artifact

    if not (out / "manifest.json").is_file():
        say(f"building {out.name}")
        out.mkdir(parents=True, exist_ok=True)
        build_artifact(model_dir, adapters, options, out)
    return out


def teacher_forced(artifact: Path, prompts_ids: list[list[int]], adapters: list[str], forced: list[list[int]] | None,
                   tokens: int, threads: int):
    """Prefill every row, then decode ``tokens`` steps feeding ``forced`` (or the greedy token when None).

    Returns (first-position logits [B, V] float64, greedy argmax per row per step [B][tokens]).
    """
    import numpy as np

    from loraflow.artifact.scheduler import ScheduledRow, SchedulerOutput
    from services.inference.runtime import OrtRuntime

    runtime = OrtRuntime(artifact, num_threads=threads)
    try:
        slots = runtime.adapter_names()
        lora = [slots[name] for name in adapters]
        chunk = int(runtime.manifest.options["prefill_seq_len"])
        rows = len(prompts_ids)
        first = np.zeros((rows, runtime.vocab_size))
        done = [0] * rows
        # Chunked prefill; a row leaves the step once its prompt is in. Bounded by the longest prompt.
        for _ in range(max(len(p) for p in prompts_ids) // chunk + 2):
            step_rows = [ScheduledRow(f"r{b}", b, lora[b], tuple(prompts_ids[b][done[b]:done[b] + chunk]), done[b],
                                      done[b] + chunk >= len(prompts_ids[b]))
                         for b in range(rows) if done[b] < len(prompts_ids[b])]
            if not step_rows:
                break
            seq = max(len(r.token_ids) for r in step_rows)
            logits = runtime.execute(SchedulerOutput("prefill", tuple(step_rows), seq))  # [B_step, V]
            for i, r in enumerate(step_rows):
                done[r.slot] += len(r.token_ids)
                if r.samples:
                    first[r.slot] = logits[i]
        picks = [[int(np.argmax(first[b]))] for b in range(rows)]
        for t in range(1, tokens):  # stop flag: exactly tokens - 1 decode steps
            feed = [(forced[b][t - 1] if forced is not None else picks[b][-1]) for b in range(rows)]
            step_rows = tuple(ScheduledRow(f"r{b}", b, lora[b], (feed[b],), len(prompts_ids[b]) + t - 1, True)
                              for b in range(rows))
            logits = runtime.execute(SchedulerOutput("decode", step_rows, 1))  # [B, V]
            for b in range(rows):
                picks[b].append(int(np.argmax(logits[b])))
        return first, picks
    finally:
        runtime.close()


def genai_teacher_forced(model_path: Path, prompts_ids, forced, tokens: int):
    """onnxruntime-genai, one row at a time: first-position logits [B, V] and teacher-forced argmax."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(model_path))
    firsts, picks = [], []
    for b, prompt in enumerate(prompts_ids):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, batch_size=1, max_length=len(prompt) + tokens + 1)
        generator = og.Generator(model, params)
        generator.append_tokens(np.array([prompt], dtype=np.int32))
        logits = np.asarray(generator.get_logits(), dtype=np.float64).reshape(-1)  # [1, 1, V] -> [V]
        firsts.append(logits)
        row = [int(np.argmax(logits))]
        for t in range(1, tokens):  # stop flag: exactly tokens - 1 steps
            feed = forced[b][t - 1] if forced is not None else row[-1]
            generator.append_tokens(np.array([[feed]], dtype=np.int32))
            row.append(int(np.argmax(np.asarray(generator.get_logits()).reshape(-1))))
        picks.append(row)
        del generator
    return np.stack(firsts), picks  # [B, V]


def compare(first, picks, ref_first, ref_tokens) -> dict:
    import numpy as np

    err = np.abs(first - ref_first)
    match = np.mean([a == b for pr, rr in zip(picks, ref_tokens, strict=True) for a, b in zip(pr, rr, strict=True)])
    return {
        "first_max_abs_logit_err": round(float(err.max()), 4),
        "first_rel_logit_err": round(float(err.max() / np.abs(ref_first).max()), 5),
        "greedy_match": round(float(match), 4),
        "first_token_match": round(float(np.mean([pr[0] == rr[0] for pr, rr in
                                                  zip(picks, ref_tokens, strict=True)])), 4),
    }


def requantize(fp32_dir: Path, out: Path, bits: int, block: int, level: int, lm_head: bool) -> Path:
    """onnxruntime-genai's fp32 graph with every decoder MatMul (and the LM head when ``lm_head``) replaced
    by MatMulNBits from our services.compiler.fused.quantize; embeddings stay fp32."""
    import shutil

    import onnx
    from onnx import numpy_helper

    from services.compiler.fused.quantize import matmul_nbits_node, quantize_blockwise

    if (out / "model.onnx").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(fp32_dir / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    nodes, used_weights = [], set()
    for node in model.graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or (not lm_head and node.name.startswith("/lm_head")):
            nodes.append(node)
            continue
        q = quantize_blockwise(numpy_helper.to_array(weight), bits, block)
        new, tensors = matmul_nbits_node(node.name + "_Q", node.input[0], node.output[0], q, accuracy_level=level)
        nodes.append(new)
        model.graph.initializer.extend(tensors)
        used_weights.add(weight.name)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    # A float weight another node still reads (a tied embedding) stays.
    still_read = {name for n in nodes for name in n.input}
    kept = [t for t in model.graph.initializer if t.name not in used_weights or t.name in still_read]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(out / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    for f in fp32_dir.iterdir():
        if f.name not in ("model.onnx", "model.onnx.data"):
            shutil.copy(f, out / f.name)
    return out


def run_genai(args, dtypes: list[str]) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from inference import build_genai

    from loraflow.storage.models_import import import_model
    from services.inference.tokenization import TextTokenizer

    model_dir = Path(import_model("smollm2-135m-instruct"))
    root = Path(args.work_dir or model_dir.parent.parent / "bench")
    tokenizer = TextTokenizer(model_dir)
    prompts_ids = [tokenizer.encode_chat(t) for t in PROMPTS[:ROWS]]
    build_genai(model_dir, root / "genai-fp32", "fp32", args.threads)
    ref_first, ref_tokens = genai_teacher_forced(root / "genai-fp32", prompts_ids, None, args.tokens)
    variants = []
    for dtype in dtypes:
        for block in BLOCK_SIZES:
            for level in ACCURACY_LEVELS:
                out = root / f"genai-{dtype}-b{block}-a{level}"
                build_genai(model_dir, out, dtype, args.threads,
                            extra_options=[f"block_size={block}", f"accuracy_level={level}"])
                first, picks = genai_teacher_forced(out, prompts_ids, ref_tokens, args.tokens)
                variant = {"dtype": dtype, "block_size": block, "accuracy_level": level,
                           **compare(first, picks, ref_first, ref_tokens)}
                say(json.dumps(variant))
                variants.append(variant)
    ours = []
    for dtype in dtypes:
        bits = 4 if dtype == "int4" else 8
        for lm_head in (False, True):
            for block in BLOCK_SIZES:
                for level in ACCURACY_LEVELS:
                    out = root / f"ours-{dtype}-b{block}-a{level}-{'lmq' if lm_head else 'lmf'}"
                    requantize(root / "genai-fp32", out, bits, block, level, lm_head)
                    first, picks = genai_teacher_forced(out, prompts_ids, ref_tokens, args.tokens)
                    variant = {"dtype": dtype, "block_size": block, "accuracy_level": level,
                               "lm_head_quantized": lm_head, **compare(first, picks, ref_first, ref_tokens)}
                    say("ours " + json.dumps(variant))
                    ours.append(variant)
    return {"source": "onnxruntime-genai builder (base model, symmetric, embeddings and LM head quantised too), "
                      "rows one at a time",
            "fp32_max_abs_logit": round(float(abs(ref_first).max()), 3), "genai_variants": variants,
            "ours_source": "the genai fp32 graph with its MatMuls replaced by MatMulNBits from "
                           "services.compiler.fused.quantize (symmetric); embeddings fp32",
            "ours_variants": ours}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--dtypes", default="int4,int8")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--genai", action="store_true", help="measure onnxruntime-genai's int4/int8 builds instead")
    args = p.parse_args()
    if not 1 <= args.tokens <= 256 or not 1 <= args.threads <= 64:
        p.error("--tokens must be in 1..256 and --threads in 1..64")
    dtypes = [d for d in args.dtypes.split(",") if d]
    if not dtypes or any(d not in ("int4", "int8") for d in dtypes):
        p.error(f"--dtypes={args.dtypes!r} must list int4 and/or int8")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import numpy as np

    from loraflow.storage.models_import import import_model

    result: dict = {"model": "smollm2-135m-instruct", "rows": ROWS, "tokens": args.tokens, "dtypes": dtypes,
                    "uptime_before": uptime()}
    if args.genai:
        result.update(run_genai(args, dtypes))
        result["uptime_after"] = uptime()
        print(json.dumps(result, indent=2))
        return 0
    reason = unsupported(dtypes)
    if reason is not None:
        result["unavailable"] = reason
        print(json.dumps(result, indent=2))
        return 0

    model_dir = Path(import_model("smollm2-135m-instruct"))
    work = Path(args.work_dir or model_dir.parent.parent / "bench" / f"quant-accuracy-{args.tokens}")
    work.mkdir(parents=True, exist_ok=True)
    adapters = make_adapters(model_dir, work / "adapters", ROWS, RANK, TARGETS)
    names = [n for n, _ in adapters]
    options = base_options(args.tokens)
    fp32 = build(model_dir, adapters, work / "fp32", options)

    from loraflow.artifact.manifest import Manifest
    from services.inference.tokenization import TextTokenizer

    manifest = Manifest.load(fp32)
    tokenizer = TextTokenizer(fp32 / manifest.tokenizer_dir, chat_template=manifest.chat_template)
    prompts_ids = [tokenizer.encode_chat(t) for t in PROMPTS[:ROWS]]
    ref_first, ref_tokens = teacher_forced(fp32, prompts_ids, names, None, args.tokens, args.threads)
    result["fp32_max_abs_logit"] = round(float(np.abs(ref_first).max()), 3)
    variants = []
    for dtype in dtypes:
        for block in BLOCK_SIZES:
            for level in ACCURACY_LEVELS:
                opts = replace(options, dtype=dtype, quant_block_size=block, quant_accuracy_level=level)
                art = build(model_dir, adapters, work / f"{dtype}-b{block}-a{level}", opts)
                first, picks = teacher_forced(art, prompts_ids, names, ref_tokens, args.tokens, args.threads)
                variant = {"dtype": dtype, "block_size": block, "accuracy_level": level,
                           **compare(first, picks, ref_first, ref_tokens)}
                say(json.dumps(variant))
                variants.append(variant)
    result["variants"] = variants
    result["uptime_after"] = uptime()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
