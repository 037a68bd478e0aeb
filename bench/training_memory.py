"""How well the trainer's memory estimate (loraflow.options.budget.training_estimate) predicts a real training job.

Each configuration trains a few steps of a random tiny Llama in a child process, exactly as a world_size 1
worker does (services.trainer.training.build_trainer), and the child reports its peak RSS
(``VmHWM``) above its own RSS once torch and the trainer were imported: that is the job's own memory,
which the estimate is meant to bound. Prints one JSON object: per configuration the estimate, the
measured peak, their ratio (estimate / measured: at least 1 means the budget check is on the safe side)
and the estimate's parts, plus the host load before and after.

    python bench/training_memory.py [--steps 3] [--only NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name: (hidden, layers, batch, seq, rank, gradient checkpointing); the vocabulary is the test tokenizer's.
CONFIGS: dict[str, tuple[int, int, int, int, int, bool]] = {
    "h256-l4-b8-s128": (256, 4, 8, 128, 8, False),
    "h512-l8-b8-s256": (512, 8, 8, 256, 16, False),
    "h512-l8-b8-s256-ckpt": (512, 8, 8, 256, 16, True),
    "h1024-l8-b4-s512": (1024, 8, 4, 512, 16, False),
    "h1024-l8-b4-s512-ckpt": (1024, 8, 4, 512, 16, True),
    "h768-l12-b16-s256": (768, 12, 16, 256, 8, False),
}


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """This process's RSS high-water mark (VmHWM). Not ru_maxrss: Linux carries that across execve, so a child
    of a large process (pytest, the bench itself) would report its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_child(model_dir: str, dataset: str, batch: int, seq: int, rank: int, ckpt: bool, steps: int) -> dict:
    """One job in this process; the peak above the RSS after imports."""
    import peft  # noqa: F401  (everything imported before the baseline is read)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from services.trainer.dataset import build_splits, parse_jsonl
    from services.trainer.training import LoraSettings, TrainingSettings, build_trainer

    baseline = _rss_bytes()
    lora = LoraSettings(r=rank, target_modules=("all-linear",))
    training = TrainingSettings(max_steps=steps, batch_size=batch, max_seq_len=seq, learning_rate=1e-3,
                                checkpoint_every_steps=10_000_000, lr_scheduler="constant",
                                gradient_checkpointing=ckpt)
    records = parse_jsonl(Path(dataset).read_bytes())
    with tempfile.TemporaryDirectory() as work:
        trainer = build_trainer(model_dir, lambda tok: build_splits(tok, records, max_seq_len=seq, eval_fraction=0.0,
                                                                    seed=0), lora, training, work_dir=work)
        trainer.train()
    peak = _peak_rss_bytes()
    return {"baseline_bytes": baseline, "peak_bytes": peak, "job_bytes": peak - baseline}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--only", choices=sorted(CONFIGS), action="append", help="run just these configurations")
    p.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        model_dir, dataset, batch, seq, rank, ckpt, steps = args.child
        print(json.dumps(run_child(model_dir, dataset, int(batch), int(seq), int(rank), ckpt == "1", int(steps))))
        return

    from loraflow.options.hf_config import HfModelConfig
    from services.trainer.job_memory import estimate_training
    from services.trainer.training import LoraSettings, TrainingSettings
    from tests.support.tiny_models import make_tiny_model_dir

    load_before = _uptime()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        words = "the quick brown fox jumps over the lazy dog and keeps running far away".split()
        dataset = tmp / "data.jsonl"
        dataset.write_text("".join(json.dumps({"text": " ".join(words[(i + k) % len(words)] for k in range(600))})
                                   + "\n" for i in range(64)))
        for name in args.only or list(CONFIGS):
            hidden, layers, batch, seq, rank, ckpt = CONFIGS[name]
            model_dir = make_tiny_model_dir(tmp / name, hidden_size=hidden, intermediate_size=hidden * 4,
                                            num_hidden_layers=layers,
                                            num_attention_heads=max(4, hidden // 64),
                                            num_key_value_heads=max(2, hidden // 256),
                                            max_position_embeddings=max(512, seq))
            config = json.loads((Path(model_dir) / "config.json").read_text())
            estimate = estimate_training(
                HfModelConfig.from_dict(config, field="base_model"),
                LoraSettings(r=rank, target_modules=("all-linear",)),
                TrainingSettings(max_steps=args.steps, batch_size=batch, max_seq_len=seq, gradient_checkpointing=ckpt))
            out = subprocess.run([sys.executable, __file__, "--child", str(model_dir), str(dataset), str(batch),
                                  str(seq), str(rank), "1" if ckpt else "0", str(args.steps)],
                                 capture_output=True, text=True, cwd=REPO,
                                 env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if out.returncode != 0:
                raise SystemExit(f"{name} failed:\n{out.stderr[-4000:]}")
            measured = json.loads(out.stdout.strip().splitlines()[-1])
            rows[name] = {
                "hidden": hidden, "layers": layers, "vocab": config["vocab_size"], "batch": batch, "seq": seq, "rank": rank,
                "gradient_checkpointing": ckpt,
                "estimate_mib": round(estimate.total / 2**20, 1),
                "measured_job_mib": round(measured["job_bytes"] / 2**20, 1),
                "measured_peak_rss_mib": round(measured["peak_bytes"] / 2**20, 1),
                "estimate_over_measured": round(estimate.total / max(1, measured["job_bytes"]), 2),
                "parts_mib": {k: round(v / 2**20, 1) for k, v in estimate.parts},
            }
            print(json.dumps({name: rows[name]}), file=sys.stderr)
    ratios = [r["estimate_over_measured"] for r in rows.values()]
    print(json.dumps({"uptime_before": load_before, "uptime_after": _uptime(), "steps": args.steps,
                      "min_estimate_over_measured": min(ratios), "max_estimate_over_measured": max(ratios),
                      "configs": rows}, indent=2))


if __name__ == "__main__":
    main()
