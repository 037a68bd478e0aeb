"""Where a batched decode step's time goes, op by op: loraflow's fused graph vs onnxruntime-genai's.

Both graphs come from the same SmolLM2-135M-Instruct checkpoint and run under ONNX Runtime's profiler
with the same thread budget: ours through the step driver the inference service uses (8 rows, each on
its own adapter, prefilled, then ``--steps`` decode calls), onnxruntime-genai's through its own
``generate`` loop on the same prompts (base model; it cannot mix adapters). Only decode calls are
counted (every call after each side's prefill). Prints one JSON object:

  {side}_step_ms          mean wall time of one decode call (ORT's model_run)
  {side}_kernel_ms        the same call's summed kernel times (the rest is ORT's own overhead)
  {side}_nodes            kernels per decode call
  {side}_by_op_us         per op type: microseconds per decode call, largest first
  {side} is ours_onnx (LoRA in standard operators), ours_native (loraflow/native's LoraRows kernel, when
  built here) and genai
  ours_*_lora_us / ours_*_lora_nodes   the part of ours that the per-row adapters add (nodes named */lora*)
  uptime_before/after     the host's load around the measurement

Usage: python bench/step_profile.py [--steps 16] [--threads 2] [--spinning] [--targets q_proj,k_proj,v_proj,o_proj]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference import PROMPTS, build, build_genai, genai_available, make_adapters, say, uptime  # noqa: E402


def decode_profile(trace: list[dict], skip_runs: int) -> dict:
    """Per decode call: wall ms, kernel ms, kernels, µs by op type and by LoRA/other, from an ORT trace."""
    runs = sorted((e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])[skip_runs:]
    if not runs:
        raise SystemExit(f"the profile holds no decode calls after the first {skip_runs}")
    windows = [(r["ts"], r["ts"] + r["dur"]) for r in runs]
    by_op: dict[str, float] = defaultdict(float)
    lora_us, lora_nodes, kernel_us, nodes = 0.0, 0, 0.0, 0
    for e in trace:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        if not any(lo <= e["ts"] <= hi for lo, hi in windows):
            continue
        op = e.get("args", {}).get("op_name", "?")
        by_op[op] += e["dur"]
        kernel_us += e["dur"]
        nodes += 1
        if "/lora" in e["name"]:
            lora_us += e["dur"]
            lora_nodes += 1
    n = len(runs)
    return {
        "calls": n,
        "step_ms": round(sum(r["dur"] for r in runs) / n / 1000, 2),
        "kernel_ms": round(kernel_us / n / 1000, 2),
        "nodes": nodes // n,
        "by_op_us": {op: round(us / n) for op, us in sorted(by_op.items(), key=lambda kv: -kv[1])},
        "lora_us": round(lora_us / n),
        "lora_nodes": lora_nodes // n,
    }


def profile_ours(artifact_dir: Path, manifest, prompts_ids: list[list[int]], steps: int, threads: int,
                 spinning: bool, prefix: Path, lora_kernel: str) -> dict:
    import numpy as np
    import onnxruntime as ort

    from loraflow import native as native_lora
    from loraflow.artifact import graph_contract as gc
    from loraflow.artifact import lora_bank
    from loraflow.artifact.kv_cache import SharedKvCache
    from loraflow.artifact.step_driver import FusedStepDriver, Row
    from services.compiler.fused.verify import flat_bank_views

    graph = manifest.graph
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.enable_profiling = True
    so.profile_file_prefix = str(prefix)
    file = graph.file
    if lora_kernel == "native":
        native_lora.register(so)
        file = graph.native_file
    session = ort.InferenceSession(str(artifact_dir / file), so, providers=["CPUExecutionProvider"])
    spec = lora_bank.BankSpec.from_manifest(manifest)
    banks_a, banks_b = lora_bank.empty_banks(spec)
    for entry in manifest.adapters:
        lora_bank.write_slot(banks_a, banks_b, entry.slot,
                             lora_bank.read_adapter(entry.name, artifact_dir / entry.path), spec)
    # graph input name -> the fused graph's flat [L*N, ...] view of the bank
    banks = flat_bank_views({**{gc.lora_a(m): a for m, a in banks_a.items()},
                             **{gc.lora_b(m): b for m, b in banks_b.items()}})
    rows = len(prompts_ids)
    cache = SharedKvCache(layers=graph.layers, slots=rows, kv_heads=graph.num_kv_heads,
                          ctx_len=int(manifest.options["ctx_len"]), head_dim=graph.head_dim)
    module_ranks = lora_bank.bank_module_ranks(banks_a, banks_b)  # [N, P]
    driver = FusedStepDriver(session, cache, banks, vocab_size=graph.vocab_size,
                             lora_ranks=module_ranks.max(axis=1, initial=0), lora_module_ranks=module_ranks)
    lora_ids = [1 + b % manifest.adapter_slots for b in range(rows)]
    chunk = int(manifest.options["prefill_seq_len"])
    done = [0] * rows
    logits = np.zeros((rows, graph.vocab_size), np.float32)
    while any(done[b] < len(prompts_ids[b]) for b in range(rows)):
        live = [b for b in range(rows) if done[b] < len(prompts_ids[b])]
        out = driver.prefill_rows([Row(b, lora_ids[b], tuple(prompts_ids[b][done[b]:done[b] + chunk]), done[b])
                                   for b in live])
        for j, b in enumerate(live):
            done[b] = min(len(prompts_ids[b]), done[b] + chunk)
            logits[b] = out[j]
    prefill_calls = driver.calls
    lengths = [len(p) for p in prompts_ids]
    for _ in range(steps):
        out = driver.decode([Row(b, lora_ids[b], (int(np.argmax(logits[b])),), lengths[b]) for b in range(rows)])
        logits = out.copy()
        lengths = [n + 1 for n in lengths]
    driver.close()
    trace = json.loads(Path(session.end_profiling()).read_text())
    return decode_profile(trace, prefill_calls)


def profile_genai(model_dir: Path, prompts_ids: list[list[int]], steps: int, prefix: Path, pad_id: int) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    cfg_path = model_dir / "genai_config.json"
    original = cfg_path.read_text()
    cfg = json.loads(original)
    opts = cfg["model"]["decoder"]["session_options"]
    opts["enable_profiling"] = str(prefix)
    cfg_path.write_text(json.dumps(cfg, indent=4))
    try:
        model = og.Model(str(model_dir))
        longest = max(len(p) for p in prompts_ids)
        padded = np.full((len(prompts_ids), longest), pad_id, np.int32)  # left-padded, as genai batches
        for b, p in enumerate(prompts_ids):
            padded[b, longest - len(p):] = p
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=longest + steps + 1, do_sample=False, batch_size=len(prompts_ids))
        generator = og.Generator(model, params)
        generator.append_tokens(padded)
        for _ in range(steps):
            generator.generate_next_token()
        del generator, params, model  # the session writes its profile when the last reference goes
        gc.collect()
    finally:
        cfg_path.write_text(original)
    files = sorted(prefix.parent.glob(f"{prefix.name}*.json"), key=lambda f: f.stat().st_mtime)
    if not files:
        raise SystemExit(f"onnxruntime-genai wrote no profile next to {prefix}")
    return decode_profile(json.loads(files[-1].read_text()), 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--spinning", action="store_true",
                   help="let our ONNX Runtime threads busy-wait (onnxruntime-genai keeps its own default)")
    p.add_argument("--work-dir", default=None, help="where adapters, artifacts and profiles are kept")
    args = p.parse_args()
    reason = genai_available()
    if reason:
        raise SystemExit(reason)
    from loraflow import native as native_lora
    from loraflow.storage.models_import import import_model
    from services.inference.tokenization import TextTokenizer

    model_dir = Path(import_model("smollm2-135m-instruct"))
    targets = args.targets.split(",")
    # The same places bench/inference.py keeps its adapters and builds, so either reuses the other's.
    bench_root = Path(args.work_dir or model_dir.parent.parent / "bench")
    work = bench_root / f"inference-r{args.rank}-{'-'.join(targets)}-{args.rows}x64"
    work.mkdir(parents=True, exist_ok=True)
    adapters = make_adapters(model_dir, work / "adapters", args.rows, args.rank, targets)
    artifact, manifest, _ = build(model_dir, adapters, work / "artifact", args.rows, 64, args.rank)
    if not manifest.graph.native_file and native_lora.library_path() is not None:
        say(f"{artifact} was compiled without the native LoRA graph: remove it to rebuild")
    genai_dir = bench_root / "genai-fp32"
    build_genai(model_dir, genai_dir, "fp32", args.threads)
    pad_id = int(json.loads((genai_dir / "genai_config.json").read_text())["model"].get("pad_token_id", 0))
    tokenizer = TextTokenizer(artifact / manifest.tokenizer_dir, chat_template=manifest.chat_template)
    prompts_ids = [tokenizer.encode_chat(text) for text in PROMPTS[:args.rows]]
    profiles = work / "profiles"
    profiles.mkdir(exist_ok=True)
    result: dict = {"uptime_before": uptime(), "threads": args.threads, "spinning": args.spinning,
                    "rows": args.rows, "steps": args.steps, "targets": targets, "rank": args.rank}
    kernels = ["onnx"] + (["native"] if manifest.graph.native_file else [])
    ours = {k: profile_ours(artifact, manifest, prompts_ids, args.steps, args.threads, args.spinning,
                            profiles / f"ours-{k}", k) for k in kernels}
    genai = profile_genai(genai_dir, prompts_ids, args.steps, profiles / "genai",
                          pad_id=pad_id)
    for side, prof in [*((f"ours_{k}", v) for k, v in ours.items()), ("genai", genai)]:
        for key in ("step_ms", "kernel_ms", "nodes", "by_op_us"):
            result[f"{side}_{key}"] = prof[key]
        if side != "genai":
            result[f"{side}_lora_us"], result[f"{side}_lora_nodes"] = prof["lora_us"], prof["lora_nodes"]
    result["uptime_after"] = uptime()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
