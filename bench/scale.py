"""Real model sizes: compile and serve random-weight checkpoints of real shapes against onnxruntime-genai.

Makes bf16 checkpoints of real shapes (Llama-3.2-1B, Mistral-7B; SmolLM2-135M's tokenizer, vocab 49152)
written tensor by tensor, so making them needs one tensor of memory, and PEFT adapters for them, then
measures in one run, each heavy step in a child process of its own inside a memory-capped cgroup (v1):

  compile   loraflow's build_artifact (graph + verification) and onnxruntime-genai's builder on the same
            checkpoint: wall time, peak RSS (the child's VmHWM), the cgroup's peak (page cache
            included), artifact size, or how it failed (OOM-killed at the cap);
  open      what opening the artifact for serving costs: the serving process's RSS after the runtime is
            built, beside the weights file and the KV cache;
  serve     8 rows x 8 adapters, greedy, through the inference engine (2 adapters compiled in, 1
            hot-added, 5 loaded on first use), against onnxruntime-genai base-only on the same prompts;
            and the bandwidth bound: rows x this host's memory bandwidth / weight bytes read per decode step.

Run model-sized work one job at a time on a shared host: ``flock /tmp/loraflow-heavy.lock python
bench/scale.py ...``. Prints a JSON object and a markdown table (the README's). Usage:

  python bench/scale.py --shapes llama-3.2-1b,mistral-7b --dtypes fp32,int4 --cap-gib 8 [--work-dir DIR]
  python bench/scale.py --shapes mistral-7b --dtypes int4 --ai100   # also the fp16 AI 100 bundle
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from loraflow.options.settings import ORT_SPINNING  # noqa: E402  (after the path: run as a script)

# Real shapes; the vocabulary is SmolLM2's tokenizer (49152), since the hub's tokenizers are not reachable.
SHAPES = {
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    },
    "mistral-7b": {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 32768,
        "sliding_window": 4096, "tie_word_embeddings": False, "hidden_act": "silu",
    },
}
VOCAB = 49152
INIT_STD = 0.02  # transformers' initializer_range for these families
SHARD_BYTES = 5 << 30  # Hugging Face's default max_shard_size
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
ADAPTERS = 8
COMPILED_ADAPTERS = 2  # the rest: one hot-added, the others loaded on first use
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
PROMPTS = ["Write a haiku about the sea.", "What is the capital of France?", "Explain photosynthesis in one sentence.",
           "List three prime numbers.", "Translate 'good morning' into Spanish.", "Why is the sky blue?",
           "Give me a name for a pet turtle.", "What does a compiler do?"]


def say(message: str) -> None:
    print(f"[scale] {message}", file=sys.stderr, flush=True)


def uptime() -> str:
    return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


# --- checkpoints and adapters, written tensor by tensor ---------------------------------------------------
def make_checkpoint(shape: str, out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A random bf16 checkpoint of ``shape`` in ``out`` (kept if already complete)."""
    import torch

    from services.compiler.modeling.checkpoint import write_safetensors
    from services.compiler.modeling.config import DecoderConfig
    from services.compiler.modeling.weights import hf_tensor_shapes

    cfg = {**SHAPES[shape], "vocab_size": VOCAB, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
           "pad_token_id": 2}
    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensor_shapes(DecoderConfig.from_hf_dict(cfg))
    shards, current, size = [], [], 0
    for name, shp in tensors:
        n = math.prod(shp) * 2
        if current and size + n > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shp))
        size += n
    shards.append(current)
    gen = torch.Generator().manual_seed(seed)

    def make(name: str, shp: tuple[int, ...]) -> bytes:
        if name.endswith("norm.weight"):
            t = torch.ones(shp, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shp, generator=gen) * INIT_STD).to(torch.bfloat16)
        return t.view(torch.int16).numpy().tobytes()

    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        say(f"{shape}: writing {fname} ({len(shard)} tensors)")
        write_safetensors(out / fname, shard, make)
        weight_map |= {name: fname for name, _ in shard}
    total = sum(math.prod(s) * 2 for _, s in tensors)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out / name)
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2,
                                                            "pad_token_id": 2}))
    (out / "config.json").write_text(json.dumps(cfg, indent=1))  # last: the checkpoint is complete
    return out


def make_adapters(model_dir: Path, out: Path, n: int, rank: int, seed: int = 100) -> list[tuple[str, Path]]:
    """``n`` PEFT LoRA adapters on TARGETS, random A and small B, written straight as PEFT files."""
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((model_dir / "config.json").read_text())
    h, d = cfg["hidden_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    dims = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
    adapters = []
    for j in range(n):
        name, path = f"scale-{j}", out / f"scale-{j}"
        if not (path / "adapter_model.safetensors").is_file():
            path.mkdir(parents=True, exist_ok=True)
            gen = torch.Generator().manual_seed(seed + j)
            tensors = {}
            for i in range(cfg["num_hidden_layers"]):
                for m in TARGETS:
                    fin, fout = dims[m]
                    key = f"base_model.model.model.layers.{i}.self_attn.{m}"
                    tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fin, generator=gen) / math.sqrt(fin)
                    tensors[f"{key}.lora_B.weight"] = torch.randn(fout, rank, generator=gen) * 0.02
            save_file(tensors, str(path / "adapter_model.safetensors"))
            (path / "adapter_config.json").write_text(json.dumps({
                "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
                "target_modules": list(TARGETS), "lora_dropout": 0.0, "bias": "none",
                "base_model_name_or_path": str(model_dir)}))
        adapters.append((name, path))
    return adapters


# --- children in memory-capped cgroups ---------------------------------------------------------------------
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


class CappedGroup:
    """A fresh memory cgroup (v1) capped at ``cap_gib`` that a child enters before exec; ``close`` reports its
    peak (page cache included) and OOM kills and removes it. Uncapped where the host offers no writable v1 root."""

    def __init__(self, label: str, cap_gib: float | None):
        self.path = CGROUP_ROOT / f"loraflow-scale-{os.getpid()}-{label}"
        self.cap_gib = cap_gib
        self.capped = cap_gib is not None and CGROUP_ROOT.is_dir() and os.access(CGROUP_ROOT, os.W_OK)
        if self.capped:
            self.path.mkdir(exist_ok=True)
            (self.path / "memory.limit_in_bytes").write_text(str(int(cap_gib * (1 << 30))))
            try:
                (self.path / "memory.memsw.limit_in_bytes").write_text(str(int(cap_gib * (1 << 30))))
            except OSError:
                pass  # no swap accounting: the host has no swap either

    def enter(self) -> None:
        if self.capped:
            (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def close(self) -> dict:
        if not self.capped:
            return {}
        record = {"cgroup_peak_gib": round(int((self.path / "memory.max_usage_in_bytes").read_text()) / (1 << 30), 2),
                  "cap_gib": self.cap_gib}
        oom = (self.path / "memory.oom_control").read_text()
        record["oom_kills"] = int(next((line.split()[1] for line in oom.splitlines() if line.startswith("oom_kill ")),
                                       "0"))
        try:
            self.path.rmdir()
        except OSError:
            pass
        return record


def _finish_record(record: dict, status: int, usage, group: CappedGroup, result: dict | None, label: str) -> dict:
    """How a child ended: exit or signal, its peak RSS (its own VmHWM where it reported one), the cgroup's."""
    # ru_maxrss is carried across execve on Linux (the forking parent's RSS counts): only a fallback for a child
    # killed before it reported its own VmHWM.
    record["ru_maxrss_gib"] = round(usage.ru_maxrss / (1 << 20), 2)
    if os.WIFSIGNALED(status):
        record["killed_by"] = signal.Signals(os.WTERMSIG(status)).name
    record["exit"] = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    record.update(group.close())
    if result is not None:
        record["result"] = result
    hwm = result.get("vmhwm_gib") if isinstance(result, dict) else None
    record["peak_rss_gib"] = hwm if hwm is not None else record["ru_maxrss_gib"]
    record["peak_rss_source"] = "VmHWM" if hwm is not None else "ru_maxrss"
    record["ok"] = record.get("exit") == 0 and "result" in record
    say(f"{label}: {record}")
    return record


def run_child(argv: list[str], *, cap_gib: float | None, label: str, timeout_s: float) -> dict:
    """Run ``argv`` in a fresh memory cgroup capped at ``cap_gib``; wall time, the child's peak RSS, the
    cgroup's peak and how it ended. Its last stdout line, when JSON, is returned as ``result``."""
    group = CappedGroup(label, cap_gib)
    # The previous child's writes (a 4.3 GB fp32 artifact leaves ~2.2 GB dirty) go to disk first, untimed: neither
    # side's time then includes writing back the other's.
    os.sync()
    say(f"{label}: {' '.join(argv[:6])} ... (cap {cap_gib if group.capped else 'none'} GiB, {uptime()})")
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=None, preexec_fn=group.enter, text=True)  # noqa: PLW1509
    deadline = started + timeout_s
    out_lines: list[str] = []
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.send_signal(signal.SIGKILL)
            time.sleep(0.5)
    finally:
        if proc.stdout is not None:
            out_lines = proc.stdout.read().splitlines()
    result = None
    if out_lines:
        try:
            result = json.loads(out_lines[-1])
        except ValueError:
            pass
    return _finish_record({"wall_s": round(time.perf_counter() - started, 1)}, status, usage, group, result, label)


class ServingChild:
    """A serving child kept open so that two runtimes' rounds alternate on the host (``--child serve`` /
    ``genai-serve``): it opens its model, warms up and prints one JSON line; then each ``round`` line on its
    stdin runs one measured round and prints its JSON line, and ``done`` prints the summary and exits."""

    def __init__(self, argv: list[str], *, cap_gib: float | None, label: str, timeout_s: float):
        self.label, self.group = label, CappedGroup(label, cap_gib)
        say(f"{label}: {' '.join(argv[:6])} ... (cap {cap_gib if self.group.capped else 'none'} GiB, {uptime()})")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, text=True,  # noqa: PLW1509
                                     preexec_fn=self.group.enter)
        # Past its time the child is killed, as run_child does: its pipe then ends, and so does any wait for a reply.
        self._deadline = threading.Timer(timeout_s, self.proc.kill)
        self._deadline.daemon = True
        self._deadline.start()
        self.rounds: list[dict] = []
        self.opened = self._reply()

    @property
    def alive(self) -> bool:
        return self.opened is not None and self.proc.poll() is None

    def _reply(self) -> dict | None:
        """The child's next JSON line (None when it ended first: killed, or failed)."""
        for line in self.proc.stdout:
            try:
                reply = json.loads(line)
            except ValueError:
                continue  # not ours (a library's print)
            if isinstance(reply, dict):
                return reply
        return None

    def _send(self, command: str) -> bool:
        """Whether the command reached a live child (one killed meanwhile, e.g. at its cap, closed the pipe)."""
        if not self.alive:
            return False
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return False
        return True

    def round(self) -> None:
        reply = self._reply() if self._send("round") else None
        if reply is not None:
            self.rounds.append(reply)

    def finish(self) -> dict:
        result = self._reply() if self._send("done") else None
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        _, status, usage = os.wait4(self.proc.pid, 0)
        self._deadline.cancel()
        if result is not None:
            result = {**self.opened, **result, "rounds": self.rounds}
        return _finish_record({"wall_s": round(time.perf_counter() - self.started, 1)}, status, usage, self.group,
                              result, self.label)


def median_record(records: list[dict]) -> dict:
    """The run of median wall time among ``records`` (the lower middle of an even count), with every run's wall
    time and the largest peak RSS beside it; the first failed run where one failed."""
    failed = [r for r in records if not r["ok"]]
    if failed:
        return {**failed[0], "runs": len(records)}
    ordered = sorted(records, key=lambda r: r["wall_s"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["walls_s"] = [r["wall_s"] for r in records]
    chosen["peak_rss_gib"] = max(r["peak_rss_gib"] for r in records)
    return chosen


def serve_interleaved(children: list[ServingChild], repeats: int) -> None:
    """``repeats`` rounds of each child, alternating (the first child first in even rounds, last in odd ones), so a
    change in the host's load falls on every side."""
    for r in range(repeats):
        for child in children if r % 2 == 0 else children[::-1]:
            child.round()


def _commands() -> Iterator[str]:
    """The parent's commands on stdin, one at a time, up to ``done``."""
    for line in sys.stdin:
        command = line.strip()
        if command == "done":
            return
        if command != "round":
            raise SystemExit(f"unknown command {command!r} (round, done)")
        yield command


# --- child entry points ------------------------------------------------------------------------------------
def child_compile(args) -> None:
    from services.compiler.artifact import build_artifact
    from services.compiler.options import CompileOptions

    adapters = [(p.name, p) for p in map(Path, args.adapters)]
    opts = CompileOptions(target=args.target, dtype=args.dtype, batch_size=args.rows, full_batch_size=args.rows,
                          prefill_seq_len=32, ctx_len=args.ctx_len, max_rank=args.rank, adapter_slots=ADAPTERS,
                          ai100_stage="export" if args.target == "ai100" else None)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    stages = {}
    manifest = build_artifact(Path(args.model_dir), adapters, opts, out,
                              progress=lambda stage, frac, msg: (stages.__setitem__(stage, msg),
                                                                 say(f"compile {stage}: {msg}")))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(json.dumps({"artifact_bytes": size, "timings": manifest.extra.get("timings"),
                      "verify": manifest.extra.get("verify"), "vmhwm_gib": vmhwm_gib()}))


_GENAI_WRAPPER = """
import runpy, sys
from pathlib import Path
peak_file = sys.argv.pop(1)
sys.argv[0] = "onnxruntime_genai.models.builder"
try:
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
finally:
    kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    Path(peak_file).write_text(str(round(kib / (1 << 20), 2)))
"""


def child_genai_build(args) -> None:
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    peak_file = out.parent / f"{out.name}.vmhwm"
    # The builder runs in a process of its own: its VmHWM is written at exit (the peak is the builder's).
    cmd = [sys.executable, "-c", _GENAI_WRAPPER, str(peak_file), "-i", args.model_dir, "-o", str(out), "-p",
           args.dtype, "-e", "cpu", "-c", str(out.parent / f"{out.name}.hf-cache")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        say(f"genai builder failed ({done.returncode}): {done.stderr[-1500:]}")
        sys.exit(done.returncode if done.returncode > 0 else 1)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    peak = float(peak_file.read_text())
    peak_file.unlink()
    print(json.dumps({"artifact_bytes": size, "vmhwm_gib": peak}))


def vmhwm_gib() -> float:
    """This process's peak RSS (GiB) from /proc/self/status (VmHWM: this process's own, unlike ru_maxrss)."""
    return _rss()["VmHWM"]


def _rss() -> dict[str, float]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / (1 << 20), 3)  # GiB
    return fields


def memory_bandwidth_gbs(threads: int) -> float:
    """Read bandwidth of this host (GB/s): a 2 GiB float32 sum over ``threads`` threads, best of 5."""
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(1 << 29)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - started)
    return a.numel() * 4 / best / 1e9


def child_serve(args) -> None:
    """Open the artifact (its RSS), then per ``round`` command (ServingChild) greedy 8 rows x 8 adapters and 8
    base rows, one after the other; the summary (medians) on ``done``."""

    from inference import run_engine  # bench/inference.py: streams each row, times prefill and decode

    from loraflow.artifact.manifest import Manifest
    from services.inference.model_manager import open_model
    from services.inference.on_demand_adapters import AdapterOrigin

    artifact = Path(args.out)
    manifest = Manifest.load(artifact)
    paths = {p.name: p for p in map(Path, args.adapters)}
    before = _rss()
    started = time.perf_counter()
    model = open_model(artifact, num_threads=args.threads, model_id="scale", spinning=args.ort_spinning,
                       resolve_adapter=lambda name: AdapterOrigin(source=f"path:{paths[name]}",
                                                                  fetch=lambda: paths[name], kind="path")
                       if name in paths else None)
    open_s = time.perf_counter() - started
    opened = _rss()
    kv_bytes = 2 * manifest.graph.layers * int(manifest.options["full_batch_size"]) * manifest.graph.num_kv_heads \
        * int(manifest.options["ctx_len"]) * manifest.graph.head_dim * 4
    weights = sum(f.size for f in manifest.files if f.path.endswith((".onnx.data",)))
    names = sorted(paths)
    hot = names[COMPILED_ADAPTERS]
    model.adapters.load(hot, AdapterOrigin(source=f"path:{paths[hot]}", fetch=lambda: paths[hot], kind="path"))
    prompts = [model.tokenizer.encode_chat(t) for t in PROMPTS[: args.rows]]
    mixed = [names[j % len(names)] for j in range(args.rows)]
    run_engine(model, prompts, mixed, 2)  # warm-up: the first-use loads happen here
    print(json.dumps({"open_s": round(open_s, 1)}), flush=True)
    rounds, base = [], []
    for _ in _commands():
        rounds.append(run_engine(model, prompts, mixed, args.tokens))
        base.append(run_engine(model, prompts, [""] * args.rows, args.tokens))
        print(json.dumps({key: {"tok_s": round(r["tok_s"], 2), "decode_tok_s": round(r["decode_tok_s"], 2)}
                          for key, r in (("mixed", rounds[-1]), ("base", base[-1]))}), flush=True)
    served = _rss()
    cfg = manifest.base_model.config
    # A decode step reads every weight once, except an untied embedding table (only its rows are gathered).
    step_bytes = weights - (0 if cfg["tie_word_embeddings"] else cfg["vocab_size"] * cfg["hidden_size"] * 4)
    bandwidth = memory_bandwidth_gbs(args.threads)
    in_slots = len(model.runtime.adapter_names())
    kernel = model.runtime.lora_kernel
    # Under 'auto', steps taken by the sleeping session mean other processes contended for the cores.
    steps_by_spinning = dict(getattr(model.runtime, "steps_by_spinning", {}))
    model.close()
    print(json.dumps({
        "open_s": round(open_s, 1), "rss_before_gib": before["VmRSS"], "rss_opened_gib": opened["VmRSS"],
        "rss_anon_opened_gib": opened.get("RssAnon"), "rss_file_opened_gib": opened.get("RssFile"),
        "rss_served_gib": served["VmRSS"], "weights_gib": round(weights / (1 << 30), 3),
        "kv_cache_gib": round(kv_bytes / (1 << 30), 3),
        "open_cost_over_weights_and_kv_gib": round(opened["VmRSS"] - before["VmRSS"] - (weights + kv_bytes) / (1 << 30),
                                                   3),
        "mixed_tok_s": round(statistics.median(r["tok_s"] for r in rounds), 2),
        "mixed_decode_tok_s": round(statistics.median(r["decode_tok_s"] for r in rounds), 2),
        "mixed_prefill_s": round(statistics.median(r["prefill_seconds"] for r in rounds), 2),
        "base_tok_s": round(statistics.median(r["tok_s"] for r in base), 2),
        "base_decode_tok_s": round(statistics.median(r["decode_tok_s"] for r in base), 2),
        "adapters_in_slots": in_slots, "lora_kernel": kernel, "ort_spinning": args.ort_spinning,
        "steps_by_spinning": steps_by_spinning,
        "bandwidth_gbs": round(bandwidth, 1), "vmhwm_gib": vmhwm_gib(),
        "decode_bytes_per_step_gib": round(step_bytes / (1 << 30), 3),
        "bandwidth_bound_tok_s": round(args.rows * bandwidth * 1e9 / step_bytes, 1),
    }))


def child_genai_serve(args) -> None:
    import onnxruntime_genai as og
    from inference import run_genai  # bench/inference.py: base-only greedy generation, decode timed apart

    from services.inference.tokenization import TextTokenizer

    out = Path(args.out)
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    opts.update(intra_op_num_threads=args.threads, inter_op_num_threads=1)
    cfg_path.write_text(json.dumps(cfg, indent=4))
    tok = TextTokenizer(Path(args.model_dir), chat_template=(Path(args.model_dir) / "chat_template.jinja").read_text()
                        if (Path(args.model_dir) / "chat_template.jinja").is_file() else None, eos_ids=(2,))
    prompts = [tok.encode_chat(t) for t in PROMPTS[: args.rows]]
    before = _rss()
    model = og.Model(str(out))
    opened = _rss()
    pad = int(cfg["model"].get("pad_token_id", 0))
    run_genai(model, prompts[:2], 2, pad)  # warm-up
    print(json.dumps({"opened": True}), flush=True)
    runs = []
    for _ in _commands():
        runs.append(run_genai(model, prompts, args.tokens, pad))
        print(json.dumps({"base": {"tok_s": round(runs[-1]["tok_s"], 2),
                                   "decode_tok_s": round(runs[-1]["decode_tok_s"], 2)}}), flush=True)
    print(json.dumps({"base_tok_s": round(statistics.median(r["tok_s"] for r in runs), 2),
                      "base_decode_tok_s": round(statistics.median(r["decode_tok_s"] for r in runs), 2),
                      "rss_before_gib": before["VmRSS"], "rss_opened_gib": opened["VmRSS"], "vmhwm_gib": vmhwm_gib()}))


# --- the run -----------------------------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="llama-3.2-1b,mistral-7b", help=f"comma-separated, of {sorted(SHAPES)}")
    p.add_argument("--dtypes", default="fp32,int4", help="loraflow dtypes to compile and serve (fp32, int4)")
    p.add_argument("--ai100", action="store_true", help="also write and verify the fp16 AI 100 bundle")
    p.add_argument("--cap-gib", type=float, default=8.0, help="memory cap of each loraflow compile child (cgroup v1)")
    p.add_argument("--genai-cap-gib", type=float, default=18.0, help="memory cap of onnxruntime-genai's builder")
    p.add_argument("--serve-cap-gib", type=float, default=16.0, help="memory cap of each serving child")
    p.add_argument("--work-dir", default=None, help="checkpoints, adapters and artifacts (kept between runs)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="serving rounds per side (the sides alternate)")
    p.add_argument("--compile-repeats", type=int, default=2,
                   help="compiles per side (loraflow's and genai's builder alternate; the median is reported)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--ctx-len", type=int, default=512)
    p.add_argument("--timeout-s", type=float, default=3600)
    p.add_argument("--ort-spinning", choices=("auto", "on", "off"), default=ORT_SPINNING.default,
                   help=f"the serving child's ONNX Runtime threading policy (default: the engine's, "
                        f"{ORT_SPINNING.default!r}; onnxruntime-genai always spins)")
    p.add_argument("--skip-genai", action="store_true")
    p.add_argument("--skip-serve", action="store_true")
    p.add_argument("--child", choices=["compile", "genai-build", "serve", "genai-serve"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--target", default="onnxruntime", help=argparse.SUPPRESS)
    p.add_argument("--adapters", nargs="*", default=[], help=argparse.SUPPRESS)
    args = p.parse_args()
    for name in ("threads", "rows", "tokens", "repeats", "compile_repeats", "rank"):
        if not 1 <= getattr(args, name) <= 4096:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be in 1..4096")
    if args.rows > len(PROMPTS):
        p.error(f"--rows={args.rows} must be at most {len(PROMPTS)}")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.child:
        if args.child == "compile":
            from services.compiler.huge_pages import prefer_huge_pages

            prefer_huge_pages()  # as services/compiler/__main__.py does, before torch is imported
        import torch

        torch.set_num_threads(args.threads)
        {"compile": child_compile, "genai-build": child_genai_build, "serve": child_serve,
         "genai-serve": child_genai_serve}[args.child](args)
        return 0

    from loraflow.storage.models_import import import_model

    shapes = [s for s in args.shapes.split(",") if s]
    dtypes = [d for d in args.dtypes.split(",") if d]
    unknown = [s for s in shapes if s not in SHAPES] + [d for d in dtypes if d not in ("fp32", "int4")]
    if unknown:
        p.error(f"unknown shape or dtype {unknown}")
    tokenizer_dir = Path(import_model("smollm2-135m-instruct"))
    work = Path(args.work_dir or tokenizer_dir.parent.parent / "bench" / "scale")
    work.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--threads", str(args.threads), "--rows", str(args.rows), "--tokens", str(args.tokens),
              "--repeats", str(args.repeats), "--rank", str(args.rank), "--ctx-len", str(args.ctx_len)]
    common += ["--ort-spinning", args.ort_spinning]
    result: dict = {"uptime_before": uptime(), "threads": args.threads, "rows": args.rows, "new_tokens": args.tokens,
                    "adapters": ADAPTERS, "compiled_adapters": COMPILED_ADAPTERS, "targets": list(TARGETS),
                    "rank": args.rank, "ctx_len": args.ctx_len, "cap_gib": args.cap_gib, "ort_spinning": args.ort_spinning,
                    "shapes": {}}
    for shape in shapes:
        model_dir = make_checkpoint(shape, work / shape / "checkpoint", tokenizer_dir)
        adapters = make_adapters(model_dir, work / shape / "adapters", ADAPTERS, args.rank)
        compiled = [str(path) for _, path in adapters[:COMPILED_ADAPTERS]]
        everyone = [str(path) for _, path in adapters]
        rows: dict = {"checkpoint_gib": round(sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / (1 << 30),
                                              2)}
        for dtype in dtypes:
            out, gout = work / shape / f"artifact-{dtype}", work / shape / f"genai-{dtype}"
            compiles, builds = [], []
            for rep in range(args.compile_repeats):  # the two compilers alternate, so the host's changes fall on both
                if not compiles or compiles[-1]["ok"]:
                    compiles.append(run_child(
                        [*me, "--child", "compile", "--model-dir", str(model_dir), "--out", str(out), "--dtype", dtype,
                         "--adapters", *compiled, *common], cap_gib=args.cap_gib,
                        label=f"{shape}-{dtype}-compile-{rep}", timeout_s=args.timeout_s))
                if not args.skip_genai and (not builds or builds[-1]["ok"]):  # one that failed (OOM) is not retried
                    builds.append(run_child(
                        [*me, "--child", "genai-build", "--model-dir", str(model_dir), "--out", str(gout), "--dtype",
                         dtype, *common], cap_gib=args.genai_cap_gib, label=f"{shape}-{dtype}-genai-build-{rep}",
                        timeout_s=args.timeout_s))
            rows[f"loraflow_{dtype}_compile"] = median_record(compiles)
            if builds:
                rows[f"genai_{dtype}_build"] = median_record(builds)
            if not args.skip_serve:
                sides = {}
                if rows[f"loraflow_{dtype}_compile"]["ok"]:
                    sides["loraflow"] = ServingChild([*me, "--child", "serve", "--out", str(out), "--adapters",
                                                      *everyone, *common], cap_gib=args.serve_cap_gib,
                                                     label=f"{shape}-{dtype}-serve", timeout_s=args.timeout_s)
                if builds and rows[f"genai_{dtype}_build"]["ok"]:
                    sides["genai"] = ServingChild([*me, "--child", "genai-serve", "--model-dir", str(model_dir),
                                                   "--out", str(gout), *common], cap_gib=args.serve_cap_gib,
                                                  label=f"{shape}-{dtype}-genai-serve", timeout_s=args.timeout_s)
                serve_interleaved([child for child in sides.values() if child.alive], args.repeats)
                for side, child in sides.items():
                    rows[f"{side}_{dtype}_serve"] = child.finish()
                if len(sides) == 2 and all(child.rounds for child in sides.values()):
                    # Round by round: each loraflow mixed round against the genai round beside it.
                    ratios = [ours["mixed"]["tok_s"] / theirs["base"]["tok_s"]
                              for ours, theirs in zip(sides["loraflow"].rounds, sides["genai"].rounds, strict=False)]
                    rows[f"{dtype}_mixed_vs_genai_base"] = {"per_round": [round(r, 3) for r in ratios],
                                                            "median": round(statistics.median(ratios), 3)}
            if rows[f"loraflow_{dtype}_compile"]["ok"]:
                shutil.rmtree(gout, ignore_errors=True)  # disk: keep one copy at a time
        if args.ai100:
            out = work / shape / "ai100-fp16"
            rows["loraflow_ai100_fp16_compile"] = run_child(
                [*me, "--child", "compile", "--model-dir", str(model_dir), "--out", str(out), "--dtype", "fp16",
                 "--target", "ai100", "--adapters", *compiled, *common], cap_gib=args.cap_gib,
                label=f"{shape}-ai100-compile", timeout_s=args.timeout_s)
            shutil.rmtree(out, ignore_errors=True)
        result["shapes"][shape] = rows
    result["uptime_after"] = uptime()
    print(json.dumps(result, indent=1))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    """The README's table: one row per model, tool and dtype."""
    lines = ["| model | tool | dtype | compile | peak RSS | cgroup peak | artifact | served, tok/s (8 rows x 8 adapters) |",
             "|---|---|---|---|---|---|---|---|"]
    for shape, rows in result["shapes"].items():
        for key, rec in rows.items():
            if not key.endswith(("_compile", "_build")) or not isinstance(rec, dict):
                continue
            tool = "loraflow" if key.startswith("loraflow") else "onnxruntime-genai builder"
            dtype = key.split("_")[1] if tool == "loraflow" and "ai100" not in key else key.split("_")[1]
            if "ai100" in key:
                tool, dtype = "loraflow (AI 100 bundle)", "fp16"
            if rec.get("ok"):
                walls = rec.get("walls_s", [rec["wall_s"]])
                compile_s = f"{rec['wall_s']:.1f} s" + (f" ({', '.join(f'{w:.1f}' for w in walls)})" if len(walls) > 1
                                                         else "")
                size = f"{rec['result']['artifact_bytes'] / (1 << 30):.2f} GiB"
            else:
                compile_s = f"failed after {rec['wall_s']:.0f} s ({rec.get('killed_by') or 'exit ' + str(rec['exit'])}" \
                            f"{', OOM at ' + str(rec.get('cap_gib')) + ' GiB' if rec.get('oom_kills') else ''})"
                size = "-"
            serve = rows.get(key.replace("_compile", "_serve").replace("_build", "_serve"), {})
            served = "-"
            if serve.get("ok"):
                r = serve["result"]
                served = (f"mixed {r['mixed_tok_s']} ({r['mixed_decode_tok_s']} decode), base {r['base_tok_s']} "
                          f"({r['base_decode_tok_s']} decode); bound {r['bandwidth_bound_tok_s']}"
                          if "mixed_tok_s" in r else f"base {r['base_tok_s']} ({r['base_decode_tok_s']} decode)")
                ratio = rows.get(f"{dtype}_mixed_vs_genai_base")
                if "mixed_tok_s" in r and ratio:
                    served += f"; mixed / genai base, round by round: {ratio['median']}x {ratio['per_round']}"
            lines.append(f"| {shape} | {tool} | {dtype} | {compile_s} | {rec['peak_rss_gib']} GiB | "
                         f"{rec.get('cgroup_peak_gib', '-')} GiB | {size} | {served} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
