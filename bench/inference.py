"""Mixed-adapter decoding throughput: loraflow's engine vs base-only vs PEFT vs onnxruntime-genai.

SmolLM2-135M-Instruct, 8 LoRA adapters (random, PEFT init_lora_weights=False), batch 8,
64 greedy tokens per row, all sides measured in one run with their runs interleaved (A B A B ...),
medians reported. Prints one JSON object:

  engine_mixed_tok_s   8 rows, 8 different adapters, one continuous batch (prefill included)
  engine_base_tok_s    the same engine and prompts, every row on the base model
  engine_mixed_onnx_kernel_tok_s  engine_mixed on the artifact's standard-operator graph (present when
                       the runtime runs the native LoRA kernel, lora_kernel="native": what a runtime
                       without loraflow/native gets)
  peft_mixed_tok_s     PEFT's generate(adapter_names=[...]) on the same base, adapters, prompts
  *_decode_tok_s       the same runs counting only the decode phase (after every row's first token)
  *_tok_per_cpu_s      tokens per CPU-second of this process (less sensitive to a busy shared host)
  *_decode_step_ms     mean wall time of one batched decode call (from the engine's metrics)
  greedy_rows_equal_peft  rows whose 64 engine tokens equal PEFT's (correctness of the mixed batch)
  int4_engine_*        the same for dtype="int4" (null with int4_unavailable when the compiler lacks it)
  genai_{fp32,int4}_*  onnxruntime-genai's own builder on the same checkpoint, base model only (it cannot
                       mix adapters in a batch), same prompts, batch, tokens and threads
  *_compile_s          cold compile: loraflow's build_artifact (verification included) and
                       onnxruntime-genai's builder, timed when first built (cached after)
  *_ttft_ms            time to first token for one 30-token request, batch 1
  uptime_before/after  the host's load around the measurement

onnxruntime-genai is optional (the bench extra); without it the genai_* fields are null.
Usage: python bench/inference.py [--quick] [--threads 2] [--tokens 64] [--rank 8] [--targets q_proj,v_proj]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from services.inference.spinning import DEFAULT_SPINNING, SPINNING_POLICIES

PROMPTS = [
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Give me a name for a pet turtle.",
    "What does a compiler do?",
]


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def make_adapters(model_dir: Path, out: Path, n: int, rank: int, targets: list[str]) -> list[tuple[str, Path]]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapters = []
    for i in range(n):
        name = f"bench-{i}"
        path = out / name
        if not (path / "adapter_model.safetensors").is_file():
            torch.manual_seed(100 + i)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False,
                             task_type="CAUSAL_LM")
            peft_model = get_peft_model(model, cfg)
            with torch.no_grad():  # small deltas: adapters change the text without breaking it
                for pname, p in peft_model.named_parameters():
                    if "lora_B" in pname:
                        p.mul_(0.05)
            peft_model.save_pretrained(path)
        adapters.append((name, path))
    return adapters


def build(model_dir: Path, adapters, out: Path, rows: int, tokens: int, rank: int, dtype: str = "fp32"):
    """(artifact dir, manifest, cold compile seconds): the time is measured on the first build and kept
    beside the artifact, so a cached run still reports it."""
    import shutil

    from loraflow.artifact.manifest import Manifest
    from services.compiler.artifact import COMPILER_VERSION, build_artifact
    from services.compiler.options import CompileOptions

    timing = out.parent / f"{out.name}.compile_seconds"
    if (out / "manifest.json").is_file():
        manifest = Manifest.load(out)
        if manifest.compiler_version == COMPILER_VERSION:  # else an older compiler's graph: build it again
            seconds = float(timing.read_text()) if timing.is_file() else None
            return out, manifest, seconds
        shutil.rmtree(out)
    # As QEfficient's README compiles: full_batch_size and nothing else of the batch (batch_size stays 1).
    options = CompileOptions(full_batch_size=rows, prefill_seq_len=32, ctx_len=128 + tokens,
                             max_rank=rank, adapter_slots=len(adapters), dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    manifest = build_artifact(model_dir, adapters, options, out)
    seconds = time.perf_counter() - started
    timing.write_text(f"{seconds:.3f}")
    return out, manifest, seconds


def int4_unavailable() -> str | None:
    """Why the compiler cannot build dtype="int4" yet (None when it can)."""
    from services.compiler.options import DTYPES

    if "int4" not in DTYPES:
        return f"services.compiler.options.DTYPES={list(DTYPES)} has no 'int4' (fused graph builder not landed)"
    return None


def genai_available() -> str | None:
    """None when onnxruntime-genai imports, else why not (it is only in the bench extra)."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError as e:
        return f"onnxruntime-genai is not installed (pip install -e '.[bench]'): {e}"
    return None


def build_genai(model_dir: Path, out: Path, precision: str, threads: int,
                extra_options: list[str] | None = None) -> float | None:
    """onnxruntime-genai's own builder on the same local checkpoint (offline); returns its wall time when
    it ran now, the recorded one when cached."""
    import subprocess

    timing = out.parent / f"{out.name}.build_seconds"
    if not (out / "genai_config.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out),
               "-p", precision, "-e", "cpu", "-c", str(out.parent / f"{out.name}.hf-cache")]
        if extra_options:
            cmd += ["--extra_options", *extra_options]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        started = time.perf_counter()
        done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              timeout=900, check=False)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"onnxruntime-genai builder failed ({done.returncode}): {done.stderr[-2000:]}")
        timing.write_text(f"{seconds:.3f}")
    # Same thread budget as ours: the builder writes no thread count, so ORT would take every core.
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    if opts.get("intra_op_num_threads") != threads or opts.get("inter_op_num_threads") != 1:
        opts.update(intra_op_num_threads=threads, inter_op_num_threads=1)
        cfg_path.write_text(json.dumps(cfg, indent=4))
    return float(timing.read_text()) if timing.is_file() else None


def run_genai(model, prompts_ids, tokens: int, pad_id: int) -> dict:
    """Base-only greedy generation of ``tokens`` per row, batch = len(prompts), prefill included."""
    import numpy as np
    import onnxruntime_genai as og

    width = max(len(p) for p in prompts_ids)
    batch = np.array([[pad_id] * (width - len(p)) + list(p) for p in prompts_ids], dtype=np.int32)  # left pad
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, batch_size=len(prompts_ids), max_length=width + tokens,
                              min_length=width + tokens)
    cpu_started = time.process_time()
    started = time.perf_counter()
    generator = og.Generator(model, params)
    generator.append_tokens(batch)
    first = None
    steps = 0
    while not generator.is_done() and steps < tokens:  # bounded: at most ``tokens`` steps
        generator.generate_next_token()
        steps += 1
        if first is None:
            first = time.perf_counter()
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    outputs = [list(generator.get_sequence(i))[width:] for i in range(len(prompts_ids))]
    del generator
    total = sum(len(o) for o in outputs)
    return {"tok_s": total / elapsed, "decode_tok_s": (total - len(outputs)) / max(1e-9, started + elapsed - first),
            "seconds": elapsed, "outputs": outputs, "tok_per_cpu_s": total / max(1e-9, cpu)}


def genai_ttft(model, prompt_ids: list[int]) -> float:
    import numpy as np
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, batch_size=1, max_length=len(prompt_ids) + 1)
    started = time.perf_counter()
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt_ids], dtype=np.int32))
    generator.generate_next_token()
    return time.perf_counter() - started


def engine_ttft(model, prompt_ids: list[int], adapter: str) -> float:
    from services.inference.engine import GenerationRequest
    from services.inference.sampling import SamplingParams

    started = time.perf_counter()
    handle = model.engine.submit(GenerationRequest(tuple(prompt_ids), adapter,
                                                   SamplingParams(max_new_tokens=1, ignore_eos=True)))
    first = None
    for chunk in handle:
        if chunk.token_ids and first is None:
            first = time.perf_counter()
    return (first or time.perf_counter()) - started


def prompt_of(ids: list[int], n: int) -> list[int]:
    """Exactly ``n`` tokens: the chat prompt repeated/cut (TTFT is about length, not content)."""
    return (ids * (n // len(ids) + 1))[:n]


def uptime() -> str:
    import subprocess

    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5, check=False).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def _burn() -> None:
    while True:  # one core busy until terminated
        pass


def start_burners(n: int) -> list:
    """``n`` processes that each keep a core busy (a host shared with other work)."""
    import multiprocessing

    procs = [multiprocessing.get_context("spawn").Process(target=_burn, daemon=True) for _ in range(n)]
    for proc in procs:
        proc.start()
    if procs:
        say(f"{n} CPU burners running")
    return procs


def stop_burners(procs: list) -> None:
    for proc in procs:
        proc.terminate()
        proc.join(5)


def median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


def run_engine(model, prompts_ids, adapters: list[str], tokens: int) -> dict:
    import threading

    from services.inference import metrics
    from services.inference.engine import GenerationRequest
    from services.inference.sampling import SamplingParams

    def step_stats(kind: str) -> tuple[float, float]:
        labels = {"model": model.model_id, "kind": kind}
        get = metrics.REGISTRY.get_sample_value
        return (get("loraflow_inference_step_seconds_sum", labels) or 0.0,
                get("loraflow_inference_step_seconds_count", labels) or 0.0)

    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    before = {k: step_stats(k) for k in ("prefill", "decode")}
    cpu_started = time.process_time()
    started = time.perf_counter()
    handles = [model.engine.submit(GenerationRequest(tuple(ids), adapter, params))
               for ids, adapter in zip(prompts_ids, adapters, strict=True)]
    first_times: list[float] = [0.0] * len(handles)
    outputs: list[list[int]] = [[] for _ in handles]

    def consume(i: int) -> None:  # each row read as it streams, so first-token times are real
        for chunk in handles[i]:
            if chunk.token_ids and not outputs[i]:
                first_times[i] = time.perf_counter()
            outputs[i].extend(chunk.token_ids)

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(handles))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    total = sum(len(o) for o in outputs)
    # Decode phase: from the moment every row has its first token to the end.
    decode_seconds = max(1e-9, started + elapsed - max(first_times))
    after = {k: step_stats(k) for k in ("prefill", "decode")}
    steps = {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in after}
    return {"tok_s": total / elapsed, "decode_tok_s": (total - len(outputs)) / decode_seconds,
            "seconds": elapsed, "outputs": outputs, "tok_per_cpu_s": total / max(1e-9, cpu),
            "decode_step_ms": 1000 * steps["decode"][0] / max(1, steps["decode"][1]),
            "prefill_seconds": steps["prefill"][0]}


def run_peft(model_dir: Path, adapters, prompts_ids, tokens: int) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapters[0][1], adapter_name=adapters[0][0])
    for name, path in adapters[1:]:
        model.load_adapter(path, adapter_name=name)
    model.eval()
    width = max(len(p) for p in prompts_ids)
    pad = base.config.pad_token_id if base.config.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts_ids])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts_ids])
    names = [name for name, _ in adapters]
    kwargs = dict(attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                  adapter_names=names, eos_token_id=None)
    with torch.no_grad():
        model.generate(input_ids=ids[:, :4], attention_mask=mask[:, :4], max_new_tokens=2, do_sample=False,
                       adapter_names=names)  # warm-up
        cpu_started = time.process_time()
        started = time.perf_counter()
        out = model.generate(input_ids=ids, **kwargs)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
    outputs = out[:, width:].tolist()
    total = sum(len(o) for o in outputs)
    return {"tok_s": total / elapsed, "seconds": elapsed, "outputs": outputs, "tok_per_cpu_s": total / cpu}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--work-dir", default=None, help="where adapters and the artifact are kept between runs")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds per configuration (median kept)")
    p.add_argument("--ort-spinning", choices=SPINNING_POLICIES, default=DEFAULT_SPINNING,
                   help=f"loraflow's ONNX Runtime threading policy (default {DEFAULT_SPINNING}, the service's)")
    p.add_argument("--spinning", dest="ort_spinning", action="store_const", const="on", help="= --ort-spinning on")
    p.add_argument("--cpu-burners", type=int, default=0,
                   help="processes that keep one core busy each while the sides run (a shared host)")
    p.add_argument("--skip-peft", action="store_true")
    p.add_argument("--skip-genai", action="store_true", help="leave onnxruntime-genai out")
    p.add_argument("--quick", action="store_true", help="smoke run: 8 tokens, one round")
    args = p.parse_args()
    if args.quick:
        args.tokens, args.repeats = 8, 1
    if not 0 <= args.cpu_burners <= 64:
        p.error(f"--cpu-burners={args.cpu_burners} must be in 0..64")
    for name in ("threads", "tokens", "rows", "rank", "repeats"):
        if not 1 <= getattr(args, name) <= 4096:
            p.error(f"--{name}={getattr(args, name)} must be in 1..4096")
    if args.rows > len(PROMPTS):
        p.error(f"--rows={args.rows} must be at most {len(PROMPTS)} (one prompt per row)")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import torch

    from loraflow import native as native_lora
    from loraflow.storage.models_import import import_model
    from services.inference.model_manager import open_model

    load_before = uptime()
    torch.set_num_threads(args.threads)
    model_dir = import_model("smollm2-135m-instruct")
    targets = args.targets.split(",")
    bench_root = Path(args.work_dir or Path(model_dir).parent.parent / "bench")
    work = bench_root / f"inference-r{args.rank}-{'-'.join(targets)}-{args.rows}x{args.tokens}"
    work.mkdir(parents=True, exist_ok=True)
    say(f"adapters and artifacts under {work}")
    adapters = make_adapters(model_dir, work / "adapters", args.rows, args.rank, targets)
    names = [name for name, _ in adapters]

    # Every side that will run: name -> (callable running the batch once). Opened up front so the
    # interleaved rounds below compare them under the same host load.
    sides: dict[str, object] = {}
    opened = []
    compile_s: dict[str, float | None] = {}
    artifact_dir, _, compile_s["fp32"] = build(model_dir, adapters, work / "artifact-default", args.rows, args.tokens,
                                              args.rank)
    model = open_model(artifact_dir, num_threads=args.threads, model_id="bench", spinning=args.ort_spinning)
    opened.append(model)
    prompts_ids = [model.tokenizer.encode_chat(t) for t in PROMPTS[: args.rows]]
    ttft_prompt = prompt_of(prompts_ids[0], 30)
    sides["engine_mixed"] = lambda m=model: run_engine(m, prompts_ids, names, args.tokens)
    sides["engine_base"] = lambda m=model: run_engine(m, prompts_ids, [""] * args.rows, args.tokens)
    lora_kernel = model.runtime.lora_kernel
    if lora_kernel == "native":
        # The same artifact's standard-operator graph, as a runtime without loraflow/native runs it.
        os.environ[native_lora.DISABLE_ENV] = "1"
        try:
            onnx_model = open_model(artifact_dir, num_threads=args.threads, model_id="bench-onnx",
                                    spinning=args.ort_spinning)
        finally:
            del os.environ[native_lora.DISABLE_ENV]
        opened.append(onnx_model)
        sides["engine_mixed_onnx_kernel"] = lambda m=onnx_model: run_engine(m, prompts_ids, names, args.tokens)

    int4_reason = int4_unavailable()
    int4_model = None
    if int4_reason is None:
        int4_dir, _, compile_s["int4"] = build(model_dir, adapters, work / "artifact-int4-default", args.rows,
                                               args.tokens, args.rank, dtype="int4")
        int4_model = open_model(int4_dir, num_threads=args.threads, model_id="bench-int4",
                                spinning=args.ort_spinning)
        opened.append(int4_model)
        sides["int4_engine_mixed"] = lambda m=int4_model: run_engine(m, prompts_ids, names, args.tokens)
        sides["int4_engine_base"] = lambda m=int4_model: run_engine(m, prompts_ids, [""] * args.rows,
                                                                    args.tokens)
    else:
        say(f"int4 skipped: {int4_reason}")

    genai_reason = "--skip-genai" if args.skip_genai else genai_available()
    genai_models = {}
    genai_build_s: dict[str, float | None] = {}
    if genai_reason is None:
        import onnxruntime_genai as og

        for precision in ("fp32", "int4"):
            out = bench_root / f"genai-{precision}"
            genai_build_s[precision] = build_genai(Path(model_dir), out, precision, args.threads)
            cfg = json.loads((out / "genai_config.json").read_text())
            genai_models[precision] = og.Model(str(out))
            pad_id = int(cfg["model"].get("pad_token_id", 0))
            sides[f"genai_{precision}_base"] = (
                lambda m=genai_models[precision], pad=pad_id: run_genai(m, prompts_ids, args.tokens, pad))
            run_genai(genai_models[precision], prompts_ids[:2], 4, pad_id)  # warm-up
    else:
        say(f"onnxruntime-genai skipped: {genai_reason}")

    run_engine(model, prompts_ids[:2], names[:2], 4)  # warm-up (session, allocator)
    if int4_model is not None:
        run_engine(int4_model, prompts_ids[:2], names[:2], 4)
    # Interleave the sides round by round (A B A B ...) and keep each one's median: on a shared host the
    # difference between runs is mostly other processes.
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    burners = start_burners(args.cpu_burners)
    for round_no in range(args.repeats):
        for key, side in sides.items():
            run = side()
            runs[key].append(run)
            say(f"round {round_no + 1}: {key} {run['tok_s']:.1f} tok/s")

    ttft: dict[str, list[float]] = {"engine": [], "int4_engine": [], "genai_fp32": [], "genai_int4": []}
    for _ in range(max(3, args.repeats)):
        ttft["engine"].append(engine_ttft(model, ttft_prompt, names[0]))
        if int4_model is not None:
            ttft["int4_engine"].append(engine_ttft(int4_model, ttft_prompt, names[0]))
        for precision, gm in genai_models.items():
            ttft[f"genai_{precision}"].append(genai_ttft(gm, ttft_prompt))
    stop_burners(burners)
    # Under --ort-spinning auto: how many steps each session ran (the sleeping one while the host was contended).
    steps_by_spinning = {m.model_id: dict(getattr(m.runtime, "steps_by_spinning", {})) for m in opened}
    for m in opened:
        m.close()

    def med(key: str, field: str, digits: int = 1):
        values = [r[field] for r in runs.get(key, [])]
        return round(median(values), digits) if values else None

    result = {
        "model": "smollm2-135m-instruct", "rows": args.rows, "new_tokens": args.tokens,
        "adapters": len(adapters), "rank": args.rank, "repeats": args.repeats, "statistic": "median",
        "ort_spinning": args.ort_spinning, "cpu_burners": args.cpu_burners, "targets": targets, "threads": args.threads, "lora_kernel": lora_kernel,
        "uptime_before": load_before, "steps_by_spinning": steps_by_spinning,
    }
    for key in sides:
        result[f"{key}_tok_s"] = med(key, "tok_s")
        result[f"{key}_decode_tok_s"] = med(key, "decode_tok_s")
        result[f"{key}_tok_per_cpu_s"] = med(key, "tok_per_cpu_s")
        if key.startswith(("engine", "int4_engine")):  # engine_mixed_onnx_kernel included
            result[f"{key}_decode_step_ms"] = med(key, "decode_step_ms", 2)
            result[f"{key}_prefill_s"] = med(key, "prefill_seconds", 3)
    if int4_reason is not None:
        for key in ("int4_engine_mixed", "int4_engine_base"):
            result[f"{key}_tok_s"] = None
        result["int4_unavailable"] = int4_reason
    if genai_reason is not None:
        for key in ("genai_fp32_base", "genai_int4_base"):
            result[f"{key}_tok_s"] = None
        result["genai_unavailable"] = genai_reason
    result["mixed_vs_base"] = round(result["engine_mixed_tok_s"] / result["engine_base_tok_s"], 3)
    for ours, theirs in (("engine_mixed", "genai_fp32_base"), ("int4_engine_mixed", "genai_int4_base")):
        a, b = result.get(f"{ours}_tok_s"), result.get(f"{theirs}_tok_s")
        result[f"{ours}_vs_{theirs}"] = round(a / b, 3) if a and b else None
    for key, values in ttft.items():
        result[f"{key}_ttft_ms"] = round(1000 * median(values), 1) if values else None
    result["ttft_prompt_tokens"] = len(ttft_prompt)
    result["engine_compile_s"] = None if compile_s.get("fp32") is None else round(compile_s["fp32"], 2)
    result["int4_engine_compile_s"] = None if compile_s.get("int4") is None else round(compile_s["int4"], 2)
    for precision in ("fp32", "int4"):
        value = genai_build_s.get(precision)
        result[f"genai_{precision}_compile_s"] = None if value is None else round(value, 2)
    if not args.skip_peft:
        peft = run_peft(model_dir, adapters, prompts_ids, args.tokens)
        say(f"PEFT generate(adapter_names=...): {peft['tok_s']:.1f} tok/s")
        result["peft_mixed_tok_s"] = round(peft["tok_s"], 1)
        result["peft_mixed_tok_per_cpu_s"] = round(peft["tok_per_cpu_s"], 1)
        result["mixed_vs_peft"] = round(result["engine_mixed_tok_s"] / peft["tok_s"], 2)
        # Greedy decoding is deterministic: every round's rows must equal PEFT's, so check the last one.
        mixed_rows = runs["engine_mixed"][-1]["outputs"]
        result["greedy_rows_equal_peft"] = sum(a == b for a, b in zip(mixed_rows, peft["outputs"], strict=True))
    result["uptime_after"] = uptime()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
