"""What one first-use adapter load costs in CPU, by tier and phase (issue 22: Zipf traffic over 1,000 adapters).

Builds, without downloading or compiling anything, what a loaded SmolLM2-135M-shaped fp32 model's adapter path
holds (its banks: 30 layers, all seven linears, max_rank 16, --slots resident slots; the host adapter cache; a
file store with registered adapters, fetched into a local cache dir as ModelManager fetches them) and drives
OnDemandAdapters (the path a request's first use takes) over a fixed sequence of --per-combo adapters for each of
rank 4/8/16 x targets q,v / q,k,v,o / all seven linears, fp16 safetensors as PEFT writes them:

* pass 1 "store": every adapter's first load (store copy with sha256 into the local dir, PEFT read, bank write;
  the first --slots loads fill empty slots, "store_empty_slot", the rest evict the least recently used one into
  the host cache);
* pass 2 "host_cache": the same sequence again, every load a host-cache hit evicting another adapter;
* pass 3 "store_warm": host cache emptied and off, the same sequence: the local dir is already fetched (no copy).

Per load: the loading thread's CPU (time.thread_time) and wall, split into phases by wrapping the methods the
load calls (fetch: origin.fetch, the store -> local dir; read: AdapterSlots.tensors_of, PEFT read + validation,
and before 42d64d5 the slot layout too, which now happens in write; evict: AdapterSlots.copy, the evicted slot
into the host cache; write: AdapterSlots.write; other: the rest). Prints one JSON object: per tier, the mean ms per load overall and per (rank, targets), phases
included, plus the host load and peak RSS.

CPU ms per load (defaults and --repeats 2; 2 cores at load 2.4, the code before
(125b9c7) and after alternating three times in one lock hold, a 10 GiB cgroup):

| tier | before | after |
|---|---|---|
| store, evicting (fetch with sha256, read, evict copy, write) | 41.5 / 35.4 / 31.7 | 14.3 / 14.7 / 15.1 |
| host cache, evicting | 20.9 / 17.9 / 13.9 | 3.3 / 3.7 / 3.4 |
| store, local dir already fetched | 14.6 / 17.9 / 22.0 | 6.0 / 6.2 / 6.3 |
| store, into an empty slot (first touch of its pages) | 27.7 / 36.5 / 49.7 | 20.4 / 12.2 / 24.1 |

peak RSS 1712 -> 1074 MB (host-cache entries rank-trimmed). On a quieter host before the changes (load 2.0):
store 29.8 (fetch 3.6, read 14.2, evict 7.6, write 4.0), host cache 9.8 (evict 4.4, write 5.2).

Usage: .venv/bin/python bench/adapter_loads.py [--per-combo 6] [--slots 16] [--repeats 1] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYERS, HIDDEN, INTER, Q_OUT, KV_OUT = 30, 576, 1536, 576, 192  # SmolLM2-135M (9 heads, 3 KV heads, head_dim 64)
SHAPES = {"q_proj": (HIDDEN, Q_OUT), "k_proj": (HIDDEN, KV_OUT), "v_proj": (HIDDEN, KV_OUT), "o_proj": (Q_OUT, HIDDEN),
          "gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER), "down_proj": (INTER, HIDDEN)}
ALL_LINEAR = tuple(SHAPES)
TARGET_SETS = {"qv": ("q_proj", "v_proj"), "qkvo": ("q_proj", "k_proj", "v_proj", "o_proj"), "all": ALL_LINEAR}
RANKS = (4, 8, 16)
MAX_RANK = 16


def write_adapter(out: Path, rank: int, targets: tuple[str, ...], seed: int) -> None:
    """A random PEFT LoRA adapter as bench/loadgen.py writes them (fp16 safetensors, alpha = 2r)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(LAYERS):
        for module in targets:
            fin, fout = SHAPES[module]
            block = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, fin)) / np.sqrt(fin)).astype(np.float16)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((fout, rank)) * 0.02).astype(np.float16)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none"}))


def fake_manifest(slots: int) -> SimpleNamespace:
    """The manifest fields AdapterSlots (BankSpec.from_manifest) reads, for a fused fp32 SmolLM2-shaped artifact."""
    modules = {m: SimpleNamespace(in_features=fin, out_features=fout) for m, (fin, fout) in SHAPES.items()}
    return SimpleNamespace(artifact_id="bench", adapter_slots=slots, max_rank=MAX_RANK,
                           graph=SimpleNamespace(layers=LAYERS, lora_modules=modules),
                           base_model=SimpleNamespace(architecture="LlamaForCausalLM"))


class Phases:
    """Thread CPU and wall seconds spent inside wrapped callables, by phase, reset per load."""

    def __init__(self):
        self.cpu: dict[str, float] = defaultdict(float)

    def wrap(self, phase: str, fn):
        def timed(*args, **kwargs):
            c0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.cpu[phase] += time.thread_time() - c0
        return timed


class _Runtime:
    """The two things OnDemandAdapters asks of a runtime: its slot table and acquire."""

    def __init__(self, slots):
        self.adapters = slots

    def acquire_adapter(self, name: str) -> int:
        return self.adapters.acquire(name)

    def adapter_names(self) -> dict[str, int]:
        return self.adapters.names()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-combo", type=int, default=6, help="adapters per (rank, targets) combination")
    p.add_argument("--slots", type=int, default=16, help="resident adapter slots")
    p.add_argument("--repeats", type=int, default=1, help="times the three passes run (fresh banks and cache dir)")
    p.add_argument("--work-dir", default=None, help="where the adapters are written (default: a temporary dir)")
    args = p.parse_args(argv)

    from loraflow.storage.model_source import InputPolicy
    from loraflow.storage.store import FileStore
    from services.inference.adapter_cache import HostAdapterCache
    from services.inference.adapter_slots import AdapterSlots
    from services.inference.model_manager import ModelManager, adapter_limit
    from services.inference.on_demand_adapters import AdapterOrigin, OnDemandAdapters

    load_before = os.getloadavg()
    combos = [(r, t) for r in RANKS for t in TARGET_SETS]
    # Interleaved combos: the adapter a load evicts (loaded --slots loads earlier) is of another combination.
    order = [(i, r, t) for i in range(args.per_combo) for r, t in combos]
    tmp = tempfile.TemporaryDirectory(prefix="adapter-loads-")
    work = Path(args.work_dir or tmp.name)
    store = FileStore(work / "store")
    uris = {}
    for i, r, t in order:
        name = f"r{r}-{t}-{i}"
        src = work / "src" / name
        if not (src / "adapter_model.safetensors").is_file():
            write_adapter(src, r, TARGET_SETS[t], seed=hash((i, r, t)) & 0xFFFF)
        key = f"adapters/{name}/registered.0"
        uris[name] = store.uri(key) if store.dir_exists(key) else store.publish_dir(key, src, progress=False)

    manifest = fake_manifest(args.slots)
    limit = adapter_limit(manifest)
    samples: list[dict] = []
    for repeat in range(args.repeats):
        cache_dir = work / f"cache-{repeat}"
        shutil.rmtree(cache_dir, ignore_errors=True)  # pass 1 fetches every adapter from the store
        # ModelManager._fetch_adapter_uri reads only these three attributes.
        manager = SimpleNamespace(inputs=InputPolicy(), store=store, cache_dir=cache_dir)
        phases = Phases()
        slots = AdapterSlots(manifest, np.dtype(np.float32), adapter_slots=args.slots)
        for method, phase in (("tensors_of", "read"), ("copy", "evict"), ("write", "write")):
            setattr(slots, method, phases.wrap(phase, getattr(slots, method)))

        def resolve(name: str) -> AdapterOrigin:
            uri = uris[name]
            fetch = phases.wrap("fetch", lambda: ModelManager._fetch_adapter_uri(manager, uri, limit))  # noqa: B023
            return AdapterOrigin(uri, fetch, "store")

        cache = HostAdapterCache(4 << 30)
        adapters = OnDemandAdapters(_Runtime(slots), model_id="bench", artifact_id="bench", resolve=resolve,
                                    cache=cache)
        for tier in ("store", "host_cache", "store_warm"):
            if tier == "store_warm":
                # No host cache at all: an adapter evicted in this pass would be a cache hit later in it.
                cache.forget_artifact("bench")
                cache.max_bytes = 0
            for k, (i, r, t) in enumerate(order):
                name = f"r{r}-{t}-{i}"
                label = "store_empty_slot" if tier == "store" and k < args.slots else tier
                phases.cpu.clear()
                w0, c0 = time.perf_counter(), time.thread_time()
                slot = adapters.acquire_adapter(name)
                cpu, wall = time.thread_time() - c0, time.perf_counter() - w0
                slots.release(slot)
                parts = dict(phases.cpu)
                parts["other"] = cpu - sum(parts.values())
                samples.append({"tier": label, "rank": r, "targets": t, "cpu": cpu, "wall": wall, "phases": parts})

    def summary(rows: list[dict]) -> dict:
        phase_names = sorted({k for s in rows for k in s["phases"]})
        return {"loads": len(rows),
                "cpu_ms": round(1000 * float(np.mean([s["cpu"] for s in rows])), 2),
                "wall_ms": round(1000 * float(np.mean([s["wall"] for s in rows])), 2),
                "phases_cpu_ms": {k: round(1000 * float(np.mean([s["phases"].get(k, 0.0) for s in rows])), 2)
                                  for k in phase_names}}

    result = {"model": f"SmolLM2-135M shape ({LAYERS} layers, max_rank {MAX_RANK}, fp32 banks, all seven linears)",
              "slots": args.slots, "per_combo": args.per_combo, "repeats": args.repeats, "tiers": {}}
    for tier in ("store_empty_slot", "store", "host_cache", "store_warm"):
        rows = [s for s in samples if s["tier"] == tier]
        result["tiers"][tier] = {"all": summary(rows),
                                 "by_combo": {f"r{r}-{t}": summary([s for s in rows
                                                                    if s["rank"] == r and s["targets"] == t])
                                              for r, t in combos
                                              if any(s["rank"] == r and s["targets"] == t for s in rows)}}
    result["host_load_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
