"""The memory budget: what a job or a loaded model will take, estimated before anything is allocated.

Every model-sized thing a request asks for is sized from numbers that are already checked (a strict
config.json, loraflow.options.hf_config; resolved compile options; an artifact's manifest) and compared with the
process's budget *before* work starts:

* training: fp32 weights + LoRA weights, gradients and Adam state + activations + logits, per local rank;
* compiling: the ONNX Runtime session that verifies the graph (weights at the artifact's dtype, adapter
  banks, KV cache) + the PyTorch reference's embedding, head and one layer + its KV cache + the adapters read;
* serving: the graph's weight files + KV cache (2 x layers x slots x KV heads x ctx x head_dim) + adapter
  banks (layers x (slots + 1) x rank x sum(in + out) per adapted module), for every model loaded at once.

A request over the budget is RESOURCE_EXHAUSTED (reason ``OVER_MEMORY_BUDGET``) naming the field, the
estimate and its parts, and the limit; a malformed size never gets this far (INVALID_ARGUMENT from
hf_config). The budget is ``--memory-budget`` (env ``LORAFLOW_MEMORY_BUDGET``): bytes, or a percentage of
the memory this process may use (its cgroup limit, else physical RAM); default 75%. An API process that
runs no worker checks requests against the same flag, so give it the workers' budget.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraflow.errors import InvalidArgument, ResourceExhausted
from loraflow.options.hf_config import HfModelConfig
from loraflow.options.settings import Setting, bounded_int, declare

log = logging.getLogger(__name__)

DEFAULT_MEMORY_BUDGET = "75%"
# A budget below this is a mistake (no model loads in it); above 1 PiB a typo.
MIN_MEMORY_BUDGET_BYTES = 64 << 20
MAX_MEMORY_BUDGET_BYTES = 1 << 50
_UNLIMITED_CGROUP = 1 << 60  # cgroup files say "max" (v2) or ~2^63 (v1) for "no limit"

BYTES_PER_VALUE = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2}
# Bytes per weight of the artifact's base weights (MatMulNBits blocks carry a scale per 32 values).
WEIGHT_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.125, "int4": 0.625}
# Training memory, calibrated by bench/training_memory.py (random Llama shapes, fp32, all-linear LoRA, peak RSS
# of a real job above its imports; 2026-12-06): activations kept for backward cost 150-230 bytes per token,
# hidden unit and layer (Korthikanti's 34 per fp16 layer assumed 4x less: eager CPU attention, LoRA's
# per-module inputs and the allocator's unreturned blocks); with checkpointing 95 (recomputation still
# leaves more than a layer's input behind); both rounded up for a >= 1.1x margin. Loading holds the
# checkpoint's tensors beside the model, and a job carries ~160 MiB besides (data, autograd, arenas).
ACTIVATION_BYTES_PER_TOKEN_HIDDEN = 180
CHECKPOINTED_ACTIVATION_BYTES = 95
TRAINING_WEIGHT_COPIES = 2
TRAINING_OVERHEAD_BYTES = 160 << 20
# Adam on LoRA weights: the fp32 weight, its gradient and two moments.
TRAINABLE_BYTES_PER_PARAM = 16


# ------------------------------------------------------------------------------------------ settings

@dataclass(frozen=True)
class MemoryBudgetSpec:
    """What --memory-budget says: a fixed number of bytes, or a fraction of the memory available."""

    nbytes: int | None = None
    fraction: float | None = None

    def __str__(self) -> str:
        return f"{self.fraction * 100:g}%" if self.fraction is not None else format_bytes(self.nbytes or 0)


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGTP]?)(i?B)?", re.IGNORECASE)


def parse_memory_budget(text: str) -> MemoryBudgetSpec:
    """"75%" (of the memory available), "12GiB", "512M", "8589934592"."""
    text = str(text).strip()
    if text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError:
            percent = math.nan
        if not 1 <= percent <= 100:  # NaN fails too
            raise InvalidArgument(f"memory budget must be 1%..100% or a number of bytes, got {text!r}",
                                  field="memory_budget", value=text)
        return MemoryBudgetSpec(fraction=percent / 100)
    match = _SIZE.fullmatch(text)
    if not match:
        raise InvalidArgument(f"memory budget must be a percentage (75%) or bytes (12GiB, 512M), got {text!r}",
                              field="memory_budget", value=text)
    nbytes = int(float(match.group(1)) * (1 << (10 * " KMGTP".index((match.group(2) or " ").upper()))))
    if not MIN_MEMORY_BUDGET_BYTES <= nbytes <= MAX_MEMORY_BUDGET_BYTES:
        raise InvalidArgument(f"memory budget must be {format_bytes(MIN_MEMORY_BUDGET_BYTES)}.."
                              f"{format_bytes(MAX_MEMORY_BUDGET_BYTES)}, got {text!r}", field="memory_budget",
                              value=text)
    return MemoryBudgetSpec(nbytes=nbytes)


MEMORY_BUDGET = declare(Setting(
    name="memory_budget", flag="--memory-budget", env="LORAFLOW_MEMORY_BUDGET", default=DEFAULT_MEMORY_BUDGET,
    help="memory a training or compile job, or all loaded models together, may take by estimate (from the "
         "model's config.json, the options, the artifact manifest), checked before work starts: bytes (12GiB) "
         "or a percentage of this process's cgroup limit, else of physical RAM; an API without a worker checks "
         "against the same value, so give it the workers' budget",
    parse=parse_memory_budget))
PREPARATION_THREADS = declare(Setting(
    name="preparation_threads", flag="--preparation-threads", env="LORAFLOW_PREPARATION_THREADS", default="2",
    help="requests whose model-sized preparation (a compile plan fetching and hashing the base model, a "
         "trainer's meta-device model build) runs at once, on threads of their own, never the RPC threads",
    parse=bounded_int(1, 64)))
PREPARATION_QUEUE = declare(Setting(
    name="preparation_queue", flag="--preparation-queue", env="LORAFLOW_PREPARATION_QUEUE", default="4",
    help="requests that may wait for a preparation thread; beyond them a submit is RESOURCE_EXHAUSTED (retry "
         "later), so waiting submits never hold every unary RPC thread",
    parse=bounded_int(0, 1024)))
BUDGET_SETTINGS: tuple[Setting, ...] = (MEMORY_BUDGET, PREPARATION_THREADS, PREPARATION_QUEUE)


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags behind ResourceBudget (each with its LORAFLOW_* variable)."""
    group = parser.add_argument_group("resource budget")
    for setting in BUDGET_SETTINGS:
        setting.add_to(group)


# ------------------------------------------------------------------------------------------ memory

def format_bytes(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 0 < value < _UNLIMITED_CGROUP else None


def cgroup_memory_limit(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """This process's cgroup memory limit (v2 memory.max or v1 memory.limit_in_bytes), None if unlimited."""
    limits: list[int] = []
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        lines = []
    base = Path(root)
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        rel = path.lstrip("/")
        if controllers == "":  # cgroup v2
            candidates = [base / rel / "memory.max", base / "memory.max"]
        elif "memory" in controllers.split(","):
            candidates = [base / "memory" / rel / "memory.limit_in_bytes", base / "memory" / "memory.limit_in_bytes"]
        else:
            continue
        for candidate in candidates:
            value = _read_limit(candidate)
            if value is not None:
                limits.append(value)
                break
    return min(limits) if limits else None


def physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def available_memory() -> tuple[int, str]:
    """(bytes this process may use, where that number came from)."""
    ram = physical_memory()
    limit = cgroup_memory_limit()
    if limit is not None and limit < ram:
        return limit, f"the cgroup memory limit ({format_bytes(limit)})"
    return ram, f"physical memory ({format_bytes(ram)})"


# ------------------------------------------------------------------------------------------ estimates

@dataclass(frozen=True)
class MemoryEstimate:
    """What something will take, by part (name -> bytes)."""

    what: str
    parts: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        return sum(n for _, n in self.parts)

    def describe(self) -> str:
        shown = [f"{name} {format_bytes(n)}" for name, n in self.parts if n]
        return " + ".join(shown) or "nothing"


def estimate(what: str, parts: Iterable[tuple[str, float]]) -> MemoryEstimate:
    return MemoryEstimate(what, tuple((name, int(math.ceil(n))) for name, n in parts))


def layer_parameters(cfg: HfModelConfig) -> int:
    """Weights of one decoder layer: attention projections, (experts x) gated MLP, two norms."""
    shapes = cfg.linear_shapes()
    attention = sum(i * o for m, (i, o) in shapes.items() if m in ("q_proj", "k_proj", "v_proj", "o_proj"))
    mlp = sum(i * o for m, (i, o) in shapes.items() if m in ("gate_proj", "up_proj", "down_proj"))
    router = cfg.hidden_size * cfg.num_experts if cfg.num_experts > 1 else 0
    return attention + mlp * cfg.num_experts + router + 2 * cfg.hidden_size


def embedding_parameters(cfg: HfModelConfig) -> int:
    """Input embedding plus, unless tied, the output head."""
    table = cfg.vocab_size * cfg.hidden_size
    return table if cfg.tie_word_embeddings else 2 * table


def parameter_count(cfg: HfModelConfig) -> int:
    return cfg.num_hidden_layers * layer_parameters(cfg) + embedding_parameters(cfg) + cfg.hidden_size


def module_shape(cfg: HfModelConfig, module: str) -> tuple[int, int]:
    """(in, out) of a LoRA target; a name outside the Llama family's counts as the widest projection."""
    shapes = cfg.linear_shapes()
    if module in shapes:
        return shapes[module]
    wide = max(cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim)
    return cfg.hidden_size, wide


def lora_parameters(cfg: HfModelConfig, rank: int, modules: Iterable[str]) -> int:
    return cfg.num_hidden_layers * rank * sum(sum(module_shape(cfg, m)) for m in modules)


def bank_bytes(num_layers: int, adapter_slots: int, max_rank: int, modules: Mapping[str, tuple[int, int]],
               bytes_per_value: int = 4) -> int:
    """lora_a [L, slots+1, in, R] + lora_b [L, slots+1, R, out] for every adapted module."""
    per_rank = sum(fin + fout for fin, fout in modules.values())
    return num_layers * (adapter_slots + 1) * max_rank * per_rank * bytes_per_value


def kv_cache_bytes(num_layers: int, slots: int, ctx_len: int, kv_heads: int, head_dim: int,
                   bytes_per_value: int = 4) -> int:
    """Keys and values of every layer for `slots` sequences of `ctx_len` tokens."""
    return 2 * num_layers * slots * ctx_len * kv_heads * head_dim * bytes_per_value


def training_estimate(cfg: HfModelConfig, *, rank: int, target_modules: Iterable[str], batch_size: int,
                      max_seq_len: int, gradient_checkpointing: bool = False, local_ranks: int = 1,
                      device: str = "cpu") -> MemoryEstimate:
    """Host memory of one training job on this machine (fp32, as services.trainer.training loads it)."""
    weights = 4 * parameter_count(cfg)
    lora = TRAINABLE_BYTES_PER_PARAM * lora_parameters(cfg, rank, list(target_modules))
    tokens = batch_size * max_seq_len
    if device.startswith(("cuda", "qaic")):
        # The weights pass through host memory on their way to the accelerator; the rest lives there.
        return estimate("training job", [("fp32 weights", weights * local_ranks)])
    per_layer = ACTIVATION_BYTES_PER_TOKEN_HIDDEN * tokens * cfg.hidden_size
    if gradient_checkpointing:
        activations = CHECKPOINTED_ACTIVATION_BYTES * tokens * cfg.hidden_size * cfg.num_hidden_layers + per_layer
    else:
        activations = per_layer * cfg.num_hidden_layers
    logits = 3 * 4 * tokens * cfg.vocab_size  # logits, their softmax and its gradient, fp32
    parts = [("fp32 weights while loading", TRAINING_WEIGHT_COPIES * weights), ("LoRA weights + Adam", lora),
             ("activations", activations), ("logits", logits), ("job overhead", TRAINING_OVERHEAD_BYTES)]
    if local_ranks > 1:
        parts = [(f"{name} x {local_ranks} ranks", n * local_ranks) for name, n in parts]
    return estimate("training job", parts)


def compile_estimate(cfg: HfModelConfig, *, dtype: str, adapter_slots: int, max_rank: int,
                     target_modules: Iterable[str], ctx_len: int, full_batch_size: int,
                     adapter_bytes: int = 0) -> MemoryEstimate:
    """Peak of a compile job: the verifying ONNX Runtime session beside the PyTorch reference."""
    modules = {m: module_shape(cfg, m) for m in target_modules}
    graph_value = BYTES_PER_VALUE.get(dtype, 4)
    kv = kv_cache_bytes(cfg.num_hidden_layers, full_batch_size, ctx_len, cfg.num_key_value_heads, cfg.head_dim)
    return estimate("compile job", [
        (f"{dtype} graph weights", WEIGHT_BYTES.get(dtype, 4.0) * parameter_count(cfg)),
        ("adapter banks", bank_bytes(cfg.num_hidden_layers, adapter_slots, max_rank, modules)),
        ("KV caches", kv + kv * graph_value // 4),
        ("reference embedding + layer", 4 * (embedding_parameters(cfg) + layer_parameters(cfg))),
        ("adapters read", adapter_bytes),
    ])


def serving_estimate(manifest, *, device: str = "cpu", adapter_slots: int | None = None) -> MemoryEstimate:
    """A loaded artifact (a loraflow.artifact.manifest.Manifest): graph weights + KV cache + adapter banks
    (``adapter_slots`` of them: the count the runtime chose, None = the compiled one).

    On an AI 100 card the weights and the KV cache live on the card; the host keeps the banks it binds."""
    g = manifest.graph
    value = 2 if g.dtype == "float16" else 4
    options = manifest.options
    slots = int(options.get("full_batch_size") or options.get("batch_size") or 1)
    kv = kv_cache_bytes(g.layers, slots, int(options["ctx_len"]), g.num_kv_heads, g.head_dim, value)
    slots_n = manifest.adapter_slots if adapter_slots is None else adapter_slots
    banks = bank_bytes(g.layers, slots_n, manifest.max_rank,
                       {m: (s.in_features, s.out_features) for m, s in g.lora_modules.items()}, value)
    tokenizer = manifest.tokenizer_dir.rstrip("/") + "/"
    weights = sum(f.size for f in manifest.files
                  if not f.path.startswith(("adapters/", tokenizer)) and f.path.endswith((".onnx", ".data", ".onnx_data")))
    if device == "ai100":
        return estimate(f"artifact {manifest.artifact_id}", [("adapter banks", banks)])
    return estimate(f"artifact {manifest.artifact_id}", [("graph weights", weights), ("KV cache", kv),
                                                          ("adapter banks", banks)])


def adapter_dir_limit(num_layers: int, max_rank: int, modules: Mapping[str, tuple[int, int]]) -> int:
    """The most bytes a PEFT adapter directory that fits one bank slot can hold: its weights at full rank on
    every adapted module in up to 8 bytes a value, plus 16 MiB for adapter_config.json, a README, a plot."""
    return 2 * bank_bytes(num_layers, 0, max_rank, modules) + (16 << 20)


# ------------------------------------------------------------------------------------------ the budget

@dataclass(frozen=True)
class ResourceBudget:
    """The memory this process lets jobs or loaded models take; ``source`` says where the number came from.
    preparation_threads / preparation_queue bound model-sized request preparation (loraflow.server.preparation)."""

    memory_bytes: int
    source: str
    preparation_threads: int = 2
    preparation_queue: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.memory_bytes, int) or self.memory_bytes <= 0:
            raise InvalidArgument(f"memory_bytes must be a positive integer, got {self.memory_bytes!r}",
                                  field="memory_budget", value=self.memory_bytes)

    @classmethod
    def from_spec(cls, spec: MemoryBudgetSpec, **others: int) -> ResourceBudget:
        if spec.nbytes is not None:
            return cls(spec.nbytes, f"--memory-budget {format_bytes(spec.nbytes)}", **others)
        available, where = available_memory()
        return cls(max(MIN_MEMORY_BUDGET_BYTES, int(available * spec.fraction)),
                   f"--memory-budget {spec}: {spec} of {where}", **others)

    @classmethod
    def from_args(cls, args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None
                  ) -> ResourceBudget:
        return cls.from_spec(MEMORY_BUDGET.value(args, env),
                             preparation_threads=PREPARATION_THREADS.value(args, env),
                             preparation_queue=PREPARATION_QUEUE.value(args, env))

    def check(self, needed: MemoryEstimate, *, field: str, value: Any = None, in_use: int = 0,
              in_use_what: str = "") -> None:
        """ResourceExhausted naming `field`, the estimate (with its parts) and the limit, when `needed` (on
        top of `in_use`) does not fit."""
        limit = self.memory_bytes - in_use
        if needed.total <= limit:
            return
        held = f", {format_bytes(in_use)} of it already held by {in_use_what}" if in_use else ""
        raise ResourceExhausted(
            f"{field}: the {needed.what} needs an estimated {format_bytes(needed.total)} of memory "
            f"({needed.describe()}), more than the {format_bytes(limit)} this process allows ({self.source}"
            f"{held}); ask for less (smaller options, a smaller model) or raise --memory-budget "
            f"(env {MEMORY_BUDGET.env})",
            field=field, value=value if value is not None else field, reason="OVER_MEMORY_BUDGET",
            metadata={"estimate_bytes": str(needed.total), "limit_bytes": str(limit),
                      "budget_bytes": str(self.memory_bytes)})


_process_budget: ResourceBudget | None = None


def configure_process_budget(budget: ResourceBudget) -> ResourceBudget:
    """Set the budget that servicers and handlers built without one use (a service's __main__ calls it)."""
    global _process_budget
    _process_budget = budget
    log.info("memory budget %s (%s)", format_bytes(budget.memory_bytes), budget.source)
    return budget


def process_budget() -> ResourceBudget:
    """The configured budget, else the one LORAFLOW_MEMORY_BUDGET (or its default) gives."""
    global _process_budget
    if _process_budget is None:
        _process_budget = ResourceBudget.from_args(None)
    return _process_budget
