"""Data-parallel scaling of one training job: tokens/s at world_size 1 (the one-process loop) and 2
(torchrun ranks, gloo), same model, same data, same global batch. Prints one JSON object.

world_size 1 runs services.trainer.training in a subprocess, with torch's default intra-op threads and
again with one thread (the share each of two ranks gets on two cores);
world_size 2 runs the worker's own launcher (services.trainer.rank_group: torchrun, c10d rendezvous on
loopback, one OMP thread per core share). ``tokens_per_second`` is the trainer's global figure
(tokens of the global batches / training seconds, start-up excluded); ``wall_seconds`` includes
process start, model load and rendezvous. The host's load average (``uptime``) is recorded before
and after, because on a small shared machine it bounds what a second rank can add.

    python bench/trainer_scaling.py [--hidden 256 --layers 4 --seq 128 --batch 8 --grad-accum 2 --steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _settings(args) -> tuple[dict, dict]:
    from services.trainer.training import LoraSettings, TrainingSettings

    lora = LoraSettings(r=16, target_modules=("all-linear",))
    training = TrainingSettings(max_steps=args.steps, batch_size=args.batch, gradient_accumulation_steps=args.grad_accum,
                                learning_rate=1e-3, max_seq_len=args.seq, checkpoint_every_steps=10_000_000,
                                lr_scheduler="constant")
    return lora.to_dict(), training.to_dict()


def run_single(model_dir: str, dataset: str, args) -> dict:
    """The one-process loop, as the worker runs a world_size 1 job."""
    from services.trainer.dataset import build_splits, parse_jsonl
    from services.trainer.training import LoraSettings, TrainingSettings, build_trainer

    lora_d, training_d = _settings(args)
    lora, training = LoraSettings(**lora_d), TrainingSettings(**training_d)
    records = parse_jsonl(Path(dataset).read_bytes())
    with tempfile.TemporaryDirectory() as work:
        trainer = build_trainer(model_dir, lambda tok: build_splits(tok, records, max_seq_len=training.max_seq_len,
                                                                    eval_fraction=0.0, seed=0),
                                lora, training, work_dir=work)
        trainer.train()
        import torch

        return {**trainer.metrics(), "torch_threads": float(torch.get_num_threads())}


def run_ranks(model_dir: str, dataset: str, world_size: int, args, work: Path) -> dict:
    from services.trainer.rank_group import RankGroup
    from services.trainer.rank_main import RankSpec

    lora_d, training_d = _settings(args)
    training_d["world_size"] = world_size
    work.mkdir(parents=True)
    RankSpec(model_dir=model_dir, dataset_file=dataset, base_model=model_dir, lora=lora_d, training=training_d,
             resume_dir=None, resumed_step=0, out_dir=str(work / "adapter"), worker_pid=os.getpid()).write(work)
    group = RankGroup(work, world_size, rdzv_id=f"bench-{world_size}")
    group.start()
    try:
        rc = group.proc.wait(1800)
        done = [e for e in group.read_events() if e["kind"] == "done"]
        if rc != 0 or not done:
            raise SystemExit(f"world_size {world_size} failed (rc {rc}):\n{group.log_tail()}")
        return done[0]["metrics"]
    finally:
        group.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="examples per micro-batch")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--single", nargs=2, metavar=("MODEL_DIR", "DATASET"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.single:
        print(json.dumps(run_single(*args.single, args)))
        return

    from tests.support.tiny_models import make_tiny_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = make_tiny_model_dir(tmp / "model", hidden_size=args.hidden, intermediate_size=args.hidden * 4,
                                        num_hidden_layers=args.layers, max_position_embeddings=max(256, args.seq))
        words = "the quick brown fox jumps over the lazy dog and keeps running far away".split()
        dataset = tmp / "data.jsonl"
        dataset.write_text("".join(json.dumps({"text": " ".join(words[(i + k) % len(words)] for k in range(args.seq))})
                                   + "\n" for i in range(args.examples)))
        load_before = _uptime()
        base = [a for a in sys.argv[1:]]

        def single_process(threads: int | None) -> tuple[dict, float]:
            env = {**os.environ, "PYTHONWARNINGS": "ignore"}
            if threads:
                env["OMP_NUM_THREADS"] = str(threads)
            t0 = time.monotonic()
            out = subprocess.run([sys.executable, __file__, *base, "--single", str(model_dir), str(dataset)],
                                 capture_output=True, text=True, check=True, cwd=REPO, env=env)
            return json.loads(out.stdout.strip().splitlines()[-1]), time.monotonic() - t0

        single, single_wall = single_process(None)  # torch's default: one thread per core
        one_thread, one_thread_wall = single_process(1)  # what each of the 2 ranks gets
        t0 = time.monotonic()
        double = run_ranks(str(model_dir), str(dataset), 2, args, tmp / "ranks")
        double_wall = time.monotonic() - t0
        load_after = _uptime()

    def row(m: dict, wall: float) -> dict:
        return {"tokens_per_second": m["tokens_per_second"], "tokens": m["tokens"],
                "torch_threads": m.get("torch_threads", 1.0),
                "train_seconds": m["train_seconds"], "wall_seconds": wall, "final_loss": m["train_loss"]}

    summary = {
        "config": {k: getattr(args, k) for k in ("hidden", "layers", "seq", "batch", "grad_accum", "steps",
                                                 "examples")},
        "cpu_count": os.cpu_count(), "uptime_before": load_before, "uptime_after": load_after,
        "world_size_1": row(single, single_wall), "world_size_1_one_thread": row(one_thread, one_thread_wall),
        "world_size_2": row(double, double_wall),
        "speedup_tokens_per_second": double["tokens_per_second"] / single["tokens_per_second"],
        "speedup_vs_one_thread": double["tokens_per_second"] / one_thread["tokens_per_second"],
        "same_tokens": single["tokens"] == double["tokens"],
        "final_loss_delta": abs(single["train_loss"] - double["train_loss"]),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
