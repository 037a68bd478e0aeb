"""The trainer's memory estimate (loraflow.options.budget.training_estimate, calibrated by bench/training_memory.py)
bounds what a real training job takes: a small job runs in a child process and its peak RSS above its
imports must not exceed the estimate the API and the worker check against the budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_training_estimate_bounds_a_real_jobs_peak_memory(tmp_path, checkpointing):
    from loraflow.options.hf_config import HfModelConfig
    from services.trainer.job_memory import estimate_training
    from services.trainer.training import LoraSettings, TrainingSettings
    from tests.support.tiny_models import make_tiny_model_dir

    batch, seq, rank = 8, 128, 8
    model_dir = make_tiny_model_dir(tmp_path / "model", hidden_size=256, intermediate_size=1024,
                                    num_hidden_layers=4, max_position_embeddings=256)
    dataset = tmp_path / "data.jsonl"
    words = "the quick brown fox jumps over the lazy dog".split()
    dataset.write_text("".join(json.dumps({"text": " ".join(words[(i + k) % len(words)] for k in range(200))})
                               + "\n" for i in range(32)))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "training_memory.py"), "--child", str(model_dir),
                          str(dataset), str(batch), str(seq), str(rank), "1" if checkpointing else "0", "2"],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"},
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    config = HfModelConfig.from_dict(json.loads((model_dir / "config.json").read_text()), field="base_model")
    estimate = estimate_training(config, LoraSettings(r=rank, target_modules=("all-linear",)),
                                 TrainingSettings(max_steps=2, batch_size=batch, max_seq_len=seq,
                                                  gradient_checkpointing=checkpointing))
    assert measured["job_bytes"] > 0
    assert estimate.total >= measured["job_bytes"], (estimate.describe(), measured)
    # ...and not so loose that it refuses jobs that would fit several times over.
    assert estimate.total <= 4 * measured["job_bytes"], (estimate.describe(), measured)
