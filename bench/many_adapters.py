"""Many adapters, few slots: adapters loaded on first use vs every adapter already in a slot.

Registers N random PEFT LoRA adapters (default 64, rank 4 on q_proj/v_proj) in a real Redis registry
and a file store, compiles an artifact with S adapter slots (default 8, none compiled in), and sends
R requests (default 512) whose adapters follow a Zipf distribution (s = 1.1) from C concurrent
clients through the same entry point gRPC and HTTP use (ModelManager → engine.submit, so each first
use of an adapter loads it, evicting the least recently used idle one). The baseline sends the same
requests to an artifact with N slots where every adapter was loaded before the clock started.

Prints one JSON object: for each run, throughput (requests/s, tokens/s), p50/p99 latency (s),
adapter loads by source (store fetch vs host-cache copy), evictions and errors; plus the host load.

Base model: SmolLM2-135M-Instruct when it is imported in the cache (``python -m
loraflow.storage.models_import``), else (or with --tiny) a tiny random Llama from tests/support.

Usage: python bench/many_adapters.py [--tiny] [--adapters 64] [--slots 8] [--requests 512]
       [--concurrency 32] [--tokens 8] [--threads 0]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ["Write a haiku about the sea.", "What is the capital of France?", "List three prime numbers.",
           "Why is the sky blue?", "What does a compiler do?", "Name a pet turtle."]
TARGETS = ("q_proj", "v_proj")


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def base_model(tiny: bool, work: Path) -> tuple[Path, str]:
    from loraflow.storage.models_import import is_imported, model_dir

    smol = model_dir("smollm2-135m-instruct")
    if not tiny and is_imported(smol):
        return smol, "SmolLM2-135M-Instruct"
    from tests.support.tiny_models import make_tiny_model_dir

    return make_tiny_model_dir(work / "tiny-llama", "llama", seed=0), "tiny random llama"


def write_adapter(model_dir: Path, out: Path, seed: int, rank: int) -> Path:
    """A random PEFT LoRA adapter (the files PEFT's save_pretrained writes), without loading the model."""
    from safetensors.numpy import save_file

    config = json.loads((model_dir / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    out_features = {"q_proj": heads * head_dim, "v_proj": config.get("num_key_value_heads", heads) * head_dim}
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(layers):
        for module in TARGETS:
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, hidden)) / np.sqrt(hidden)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((out_features[module], rank)) * 0.02).astype(
                np.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": list(TARGETS), "bias": "none", "base_model_name_or_path": str(model_dir)}))
    return out


def compile_artifact(model_dir: Path, out: Path, slots: int, rank: int, rows: int, tokens: int):
    from services.compiler.artifact import build_artifact
    from services.compiler.options import CompileOptions

    options = CompileOptions(batch_size=rows, full_batch_size=rows, prefill_seq_len=32, ctx_len=64 + tokens,
                             max_rank=rank, adapter_slots=slots, target_modules=TARGETS)
    return build_artifact(model_dir, [], options, out)


def zipf_choices(n_adapters: int, n_requests: int, s: float, seed: int) -> list[int]:
    weights = 1.0 / np.arange(1, n_adapters + 1) ** s
    rng = np.random.default_rng(seed)
    return [int(i) for i in rng.choice(n_adapters, size=n_requests, p=weights / weights.sum())]


def counter(name: str, model: str, **labels) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, {"model": model, **labels}) or 0.0


def run(manager, model_id: str, requests: list[tuple[tuple[int, ...], str]], concurrency: int, tokens: int) -> dict:
    from loraflow.errors import LoraflowError
    from services.inference.engine import GenerationRequest
    from services.inference.sampling import SamplingParams

    model = manager.get(model_id)
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    loads_before = {s: counter("loraflow_inference_adapter_loads_total", model_id, source=s)
                    for s in ("store", "host_cache")}
    latencies: list[float] = []
    errors: dict[str, int] = {}
    generated = [0]
    lock = threading.Lock()

    def one(item) -> None:
        ids, adapter = item
        started = time.perf_counter()
        try:
            result = model.engine.submit(GenerationRequest(ids, adapter, params)).result()
        except LoraflowError as err:
            with lock:
                errors[err.code.name] = errors.get(err.code.name, 0) + 1
            return
        with lock:
            latencies.append(time.perf_counter() - started)
            generated[0] += len(result.token_ids)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, requests))
    elapsed = time.perf_counter() - started
    lat = np.asarray(latencies) if latencies else np.zeros(1)
    return {
        "requests": len(requests), "completed": len(latencies), "errors": errors, "seconds": round(elapsed, 2),
        "requests_per_s": round(len(latencies) / elapsed, 2), "tokens_per_s": round(generated[0] / elapsed, 1),
        "p50_latency_s": round(float(np.percentile(lat, 50)), 3), "p99_latency_s": round(float(np.percentile(lat, 99)), 3),
        "adapter_loads_from_store": int(counter("loraflow_inference_adapter_loads_total", model_id, source="store")
                                        - loads_before["store"]),
        "adapter_loads_from_host_cache": int(counter("loraflow_inference_adapter_loads_total", model_id,
                                                     source="host_cache") - loads_before["host_cache"]),
        "adapter_evictions": int(counter("loraflow_inference_adapter_evictions_total", model_id)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="use a tiny random Llama instead of SmolLM2-135M")
    p.add_argument("--adapters", type=int, default=64)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--tokens", type=int, default=8, help="greedy tokens per request")
    p.add_argument("--rows", type=int, default=8, help="KV-cache slots (requests decoded together)")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of adapter popularity")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = default)")
    p.add_argument("--work-dir", default=None, help="keep models/artifacts here (default: a temp dir)")
    args = p.parse_args(argv)

    import redis

    from loraflow.jobs.embedded_redis import EmbeddedRedis
    from loraflow.jobs.registry import AdapterRecord, ArtifactRecord, Registry
    from loraflow.storage.model_source import InputPolicy
    from loraflow.storage.store import open_store
    from services.inference.model_manager import ModelManager

    load_before = os.getloadavg()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="loraflow-bench-"))
    model_dir, model_name = base_model(args.tiny, work)
    say(f"base model: {model_name}; host load {load_before[0]:.2f} on {os.cpu_count()} CPUs")
    names = [f"zipf-{i:03d}" for i in range(args.adapters)]
    embedded = EmbeddedRedis()
    manager = None
    try:
        registry = Registry(redis.Redis.from_url(embedded.url))
        store = open_store((work / "store").as_uri())
        t0 = time.perf_counter()
        for i, name in enumerate(names):
            path = write_adapter(model_dir, work / "adapters" / name, seed=i, rank=args.rank)
            registry.put_adapter(AdapterRecord(name=name, uri=store.publish_dir(f"adapters/{name}", path),
                                               base_model=str(model_dir)))
        say(f"registered {len(names)} adapters in {time.perf_counter() - t0:.1f} s")
        artifacts = {}
        for label, slots in (("few", args.slots), ("all", args.adapters)):
            t0 = time.perf_counter()
            out = work / f"artifact-{slots}-slots"
            manifest = compile_artifact(model_dir, out, slots, args.rank, args.rows, args.tokens)
            registry.put_artifact(ArtifactRecord(artifact_id=manifest.artifact_id,
                                                 uri=store.publish_dir(f"artifacts/{manifest.artifact_id}", out),
                                                 base_model=str(model_dir)))
            artifacts[label] = manifest.artifact_id
            say(f"compiled {slots} adapter slots in {time.perf_counter() - t0:.1f} s")
        manager = ModelManager(store=store, registry=registry, cache_dir=work / "cache",
                               max_waiting=args.requests, inputs=InputPolicy())
        few = manager.load_artifact(artifacts["few"], model_id="few-slots", num_threads=args.threads)
        manager.load_artifact(artifacts["all"], model_id="all-slots", num_threads=args.threads)
        tokenizer = few.tokenizer
        choices = zipf_choices(args.adapters, args.requests, args.zipf, seed=0)
        requests = [(tuple(tokenizer.encode(PROMPTS[i % len(PROMPTS)])), names[c]) for i, c in enumerate(choices)]
        distinct = sorted({names[c] for c in choices})
        for name in distinct:  # the baseline: every adapter the requests use is in a slot before the clock
            manager.load_adapter("all-slots", name)
        say(f"{args.requests} requests over {len(distinct)} distinct adapters (Zipf s={args.zipf}), "
            f"{args.concurrency} concurrent clients")
        results = {}
        for label, model_id in (("all_adapters_in_slots", "all-slots"), ("few_slots_on_first_use", "few-slots")):
            results[label] = run(manager, model_id, requests, args.concurrency, args.tokens)
            say(f"{label}: {results[label]}")
        ratio = results["few_slots_on_first_use"]["requests_per_s"] / max(
            1e-9, results["all_adapters_in_slots"]["requests_per_s"])
        print(json.dumps({
            "base_model": model_name, "adapters": args.adapters, "adapter_slots": args.slots,
            "requests": args.requests, "distinct_adapters_requested": len(distinct), "zipf_s": args.zipf,
            "concurrency": args.concurrency, "tokens_per_request": args.tokens, "kv_slots": args.rows,
            "rank": args.rank, "host_load_1m_before": round(load_before[0], 2),
            "host_load_1m_after": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
            **results, "throughput_ratio_few_vs_all": round(ratio, 3),
        }, indent=1))
    finally:
        if manager is not None:
            manager.close()
        embedded.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
