"""What computing the LM head only at loss positions buys: step time and peak memory, full vs selected.

Each variant runs in its own subprocess (so peak RSS is its own) on the same random Llama config,
the same LoRA and the same batches (prompt-heavy: the completion is the last ``--completion-frac`` of
each row, as in instruction tuning). Prints one JSON object.

    python bench/trainer_lm_head.py [--vocab 32000 --hidden 256 --layers 2 --seq 256 --batch 8 --steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_variant(args) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(REPO))
    from services.trainer.dataset import IGNORE_INDEX
    from services.trainer.training import LoraSettings, full_logits_loss, selected_token_loss

    torch.manual_seed(0)
    device = torch.device(args.device)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 4,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=args.seq)
    model = LlamaForCausalLM(config).to(device)
    model = get_peft_model(model, LoraSettings(r=16, target_modules=("all-linear",)).to_peft())
    causal_lm = model.get_base_model()
    model.train()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)  # [B, T]
    labels = ids.clone()  # [B, T]
    prompt_len = int(args.seq * (1 - args.completion_frac))
    labels[:, :prompt_len] = IGNORE_INDEX  # loss only on the completion
    mask = torch.ones_like(ids)
    loss_fn = selected_token_loss if args.variant == "selected" else full_logits_loss
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        loss, n = loss_fn(causal_lm, input_ids=ids, attention_mask=mask, labels=labels)
        (loss / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()) / n

    step()  # warm-up (allocator, kernels)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _peak_rss_mib()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out = {"variant": args.variant, "step_seconds_median": sorted(times)[len(times) // 2],
           "step_seconds_mean": sum(times) / len(times), "peak_rss_mib": _peak_rss_mib(),
           "rss_at_warmup_mib": rss_before, "final_loss": loss}
    if device.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--completion-frac", type=float, default=0.25)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variant", choices=("full", "selected"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    results = {}
    base = [a for a in sys.argv[1:]]
    for variant in ("full", "selected"):
        proc = subprocess.run([sys.executable, __file__, *base, "--variant", variant], capture_output=True,
                              text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    full, sel = results["full"], results["selected"]
    summary = {
        "config": {k: getattr(args, k) for k in ("vocab", "hidden", "layers", "seq", "batch", "steps",
                                                 "completion_frac", "device")},
        "full_logits": full, "selected_positions": sel,
        "speedup": full["step_seconds_median"] / sel["step_seconds_median"],
        "peak_rss_saved_mib": full["peak_rss_mib"] - sel["peak_rss_mib"],
        "loss_match": abs(full["final_loss"] - sel["final_loss"]) < 1e-3 * max(1.0, abs(full["final_loss"])),
    }
    if "peak_cuda_mib" in full:
        summary["peak_cuda_saved_mib"] = full["peak_cuda_mib"] - sel["peak_cuda_mib"]
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
