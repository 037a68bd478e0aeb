"""The training loop on a tiny random Llama: learning, PEFT output, LoRA variants, resume, loss equivalence."""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch

from loraflow.errors import FailedPrecondition, InvalidArgument
from services.trainer.dataset import build_splits, parse_jsonl
from services.trainer.training import (
    LoraSettings,
    TrainingCallback,
    TrainingSettings,
    build_trainer,
    collate,
    full_logits_loss,
    resolve_device,
    selected_token_loss,
)
from tests.trainer.conftest import memorisable_lines

RECORDS = parse_jsonl("\n".join(memorisable_lines()))


def _trainer(model_dir, tmp_path, lora=None, callback=None, stop=None, **training):
    settings = TrainingSettings(**{"batch_size": 4, "learning_rate": 3e-3, "max_seq_len": 32, "eval_fraction": 0.25,
                                   "checkpoint_every_steps": 1000, "lr_scheduler": "constant", **training})
    return build_trainer(
        model_dir, lambda tok: build_splits(tok, RECORDS, max_seq_len=settings.max_seq_len,
                                            eval_fraction=settings.eval_fraction, seed=settings.seed),
        lora or LoraSettings(r=8), settings, work_dir=tmp_path / "work", callback=callback, stop=stop)


def test_training_lowers_eval_loss_and_writes_peft_dir(tiny_llama, tmp_path):
    seen = []

    class Record(TrainingCallback):
        def on_step(self, progress):
            seen.append(progress)

    trainer = _trainer(tiny_llama, tmp_path, callback=Record(), max_steps=24, eval_every_steps=12, learning_rate=1e-2)
    outcome = trainer.train()
    assert outcome.completed and outcome.step == 24
    m = outcome.metrics
    assert m["eval_loss"] < 0.8 * m["initial_eval_loss"], m
    assert [p.step for p in seen] == list(range(1, 25))
    assert all(p.tokens_per_second > 0 and p.learning_rate == pytest.approx(1e-2) for p in seen)
    assert [p.step for p in seen if p.eval_loss is not None] == [12, 24]
    assert seen[-1].eta_seconds == 0

    out = trainer.save_adapter(tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.json", "loss_curve.png"} <= {
        p.name for p in out.iterdir()}
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"]["eval_loss"] == m["eval_loss"] and len(saved["train_history"]) == 24

    # Vanilla PEFT loads it unchanged, and it changes the base model's outputs the way training did.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 33, 60, 2, 9]])
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        base_logits = base(ids).logits
        peft = PeftModel.from_pretrained(base, out).eval()
        peft_logits = peft(ids).logits
        trainer.model.eval()
        trained_logits = trainer.model(ids).logits
    assert not torch.allclose(base_logits, peft_logits, atol=1e-3)
    torch.testing.assert_close(peft_logits, trained_logits, atol=1e-5, rtol=1e-5)


def test_all_linear_and_rslora(tiny_llama, tmp_path):
    lora = LoraSettings(r=4, lora_alpha=8, target_modules=("all-linear",), use_rslora=True, lora_dropout=0.1)
    trainer = _trainer(tiny_llama, tmp_path, lora=lora, max_steps=2, eval_fraction=0)
    trainer.train()
    out = trainer.save_adapter(tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    # Explicit short names, not PEFT's full module paths: what the compiler's adapter validation accepts.
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"])
    assert config["use_rslora"] is True and config["r"] == 4
    q = trainer.causal_lm.model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # rsLoRA: alpha / sqrt(r)
    assert not hasattr(trainer.causal_lm.lm_head, "lora_A")  # all-linear leaves the output head alone


def test_resume_continues_from_saved_step_and_matches_uninterrupted(tiny_llama, tmp_path):
    lora = LoraSettings(r=4, lora_dropout=0.1)  # dropout: the RNG state must be restored too
    common = dict(max_steps=6, checkpoint_every_steps=3, lr_scheduler="cosine", warmup_steps=2, batch_size=3)
    straight = _trainer(tiny_llama, tmp_path / "a", lora=lora, **common)
    straight.train()

    checkpoints = []
    stop = threading.Event()

    class StopAfterCheckpoint(TrainingCallback):
        def on_checkpoint(self, step, directory):
            checkpoints.append((step, directory))
            stop.set()

    first = _trainer(tiny_llama, tmp_path / "b", lora=lora, callback=StopAfterCheckpoint(), stop=stop, **common)
    outcome = first.train()
    assert not outcome.completed and outcome.step == 3 and checkpoints[0][0] == 3

    steps = []

    class Steps(TrainingCallback):
        def on_step(self, progress):
            steps.append(progress.step)

    resumed = _trainer(tiny_llama, tmp_path / "c", lora=lora, callback=Steps(), seed=0, **common)
    assert resumed.resume_from(checkpoints[0][1]) == 3
    assert resumed.train().completed
    assert steps == [4, 5, 6]  # continued, not restarted
    assert [s for s, _ in resumed.train_history] == [1, 2, 3, 4, 5, 6]
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    assert resumed.metrics()["eval_loss"] == pytest.approx(straight.metrics()["eval_loss"], rel=1e-5)

    other = _trainer(tiny_llama, tmp_path / "d", lora=LoraSettings(r=8), **common)
    with pytest.raises(FailedPrecondition, match="different settings"):
        other.resume_from(checkpoints[0][1])


def test_selected_head_loss_equals_full_logits_loss(tiny_llama, tmp_path):
    trainer = _trainer(tiny_llama, tmp_path, max_steps=1, gradient_checkpointing=True)
    batch = collate(trainer.splits.train[:4], trainer.pad_id, trainer.device)
    losses, grads = [], []
    for fn in (selected_token_loss, full_logits_loss):
        trainer.model.zero_grad()
        loss, n = fn(trainer.causal_lm, **batch)
        (loss / n).backward()
        losses.append((loss.item(), n))
        grads.append([p.grad.clone() for p in trainer.model.parameters() if p.requires_grad])
    assert losses[0][1] == losses[1][1] > 0
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-5)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_gradient_accumulation_matches_one_big_batch(tiny_llama, tmp_path):
    one = _trainer(tiny_llama, tmp_path / "a", max_steps=1, batch_size=4, eval_fraction=0)
    acc = _trainer(tiny_llama, tmp_path / "b", max_steps=1, batch_size=2, gradient_accumulation_steps=2,
                   eval_fraction=0)
    one.train()
    acc.train()
    assert one.train_history[0][1] == pytest.approx(acc.train_history[0][1], rel=1e-5)
    for a, b in zip(one.model.parameters(), acc.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_unknown_target_module_lists_the_models_linear_modules(tiny_llama, tmp_path):
    with pytest.raises(InvalidArgument) as e:
        _trainer(tiny_llama, tmp_path, lora=LoraSettings(target_modules=("q_proj", "qkv_proj")), max_steps=1)
    assert e.value.field == "lora.target_modules[1]" and e.value.value == "qkv_proj"
    assert "gate_proj" in str(e.value) and "down_proj" in str(e.value)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"r": 0}, "lora.r"), ({"r": -3}, "lora.r"), ({"lora_alpha": -1.0}, "lora.lora_alpha"),
    ({"lora_alpha": float("nan")}, "lora.lora_alpha"), ({"lora_dropout": 1.0}, "lora.lora_dropout"),
    ({"lora_dropout": -0.1}, "lora.lora_dropout"), ({"bias": "some"}, "lora.bias"),
    ({"bias": "all"}, "lora.bias"), ({"bias": "lora_only"}, "lora.bias"),
    ({"target_modules": ()}, "lora.target_modules"), ({"target_modules": ("all-linear", "q_proj")}, "lora.target_modules"),
    ({"target_modules": ("../x",)}, "lora.target_modules[0]"), ({"target_modules": ("q_proj", "q_proj")}, "lora.target_modules"),
])
def test_lora_settings_validation(kwargs, field):
    with pytest.raises(InvalidArgument) as e:
        LoraSettings(**kwargs)
    assert e.value.field == field


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"max_steps": -1}, "training.max_steps"), ({"batch_size": 0}, "training.batch_size"),
    ({"gradient_accumulation_steps": 0}, "training.gradient_accumulation_steps"),
    ({"learning_rate": 0.0}, "training.learning_rate"), ({"learning_rate": float("inf")}, "training.learning_rate"),
    ({"max_seq_len": 1}, "training.max_seq_len"), ({"eval_fraction": 0.6}, "training.eval_fraction"),
    ({"checkpoint_every_steps": 0}, "training.checkpoint_every_steps"), ({"device": "tpu"}, "training.device"),
    ({"lr_scheduler": "step"}, "training.lr_scheduler"), ({"num_epochs": 0.0}, "training.num_epochs"),
    ({"weight_decay": -1.0}, "training.weight_decay"), ({"seed": -5}, "training.seed"),
])
def test_training_settings_validation(kwargs, field):
    with pytest.raises(InvalidArgument) as e:
        TrainingSettings(**kwargs)
    assert e.value.field == field


def test_unavailable_devices_fail_precondition():
    with pytest.raises(FailedPrecondition, match="torch_qaic"):
        resolve_device("qaic")
    if not torch.cuda.is_available():
        with pytest.raises(FailedPrecondition, match="CUDA"):
            resolve_device("cuda")
    assert resolve_device("cpu").type == "cpu"


def test_epochs_set_total_steps(tiny_llama, tmp_path):
    trainer = _trainer(tiny_llama, tmp_path, num_epochs=2.0, batch_size=6, eval_fraction=0)
    assert trainer.steps_per_epoch == 4 and trainer.total_steps == 8


def test_all_linear_adapter_compiles_into_an_artifact(tiny_llama, tmp_path):
    from services.compiler.artifact import build_artifact
    from services.compiler.options import CompileOptions

    trainer = _trainer(tiny_llama, tmp_path, lora=LoraSettings(r=4, target_modules=("all-linear",)), max_steps=2,
                       eval_fraction=0)
    trainer.train()
    out = trainer.save_adapter(tmp_path / "adapter")
    options = CompileOptions(batch_size=1, full_batch_size=1, prefill_seq_len=8, ctx_len=32, max_rank=4,
                             adapter_slots=1)
    manifest = build_artifact(tiny_llama, [("trained", out)], options, tmp_path / "artifact")
    assert [a.name for a in manifest.adapters] == ["trained"]
    assert set(manifest.adapters[0].target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"}


@pytest.mark.parametrize("module", ["lm_head", "embed_tokens"])
def test_targets_the_compiler_cannot_serve_are_refused_before_training(module):
    with pytest.raises(InvalidArgument) as e:
        LoraSettings(target_modules=("q_proj", module))
    assert e.value.field == "lora.target_modules[1]" and e.value.value == module
    assert "q_proj" in str(e.value) and "down_proj" in str(e.value) and "all-linear" in str(e.value)


@pytest.mark.parametrize("targets", [("all-linear",), ("qkv_proj", "down_proj")])
def test_a_phi3_adapter_trains_on_its_packed_projections_and_compiles(tmp_path, targets):
    from services.compiler.artifact import build_artifact
    from services.compiler.options import CompileOptions
    from tests.support.tiny_models import make_tiny_model_dir

    phi3 = make_tiny_model_dir(tmp_path / "phi3", "phi3")
    trainer = _trainer(phi3, tmp_path, lora=LoraSettings(r=4, target_modules=targets), max_steps=2, eval_fraction=0)
    trainer.train()
    out = trainer.save_adapter(tmp_path / "adapter")
    saved = set(json.loads((out / "adapter_config.json").read_text())["target_modules"])
    expected = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"} if targets == ("all-linear",) else set(targets)
    assert saved == expected
    options = CompileOptions(batch_size=1, full_batch_size=1, prefill_seq_len=8, ctx_len=32, max_rank=4,
                             adapter_slots=1)
    manifest = build_artifact(phi3, [("trained", out)], options, tmp_path / "artifact")  # verified against PEFT
    assert set(manifest.adapters[0].target_modules) == expected
    # RegisterAdapter's check (the base's shapes built on the meta device) accepts it as well.
    from loraflow.artifact import lora_bank
    from services.trainer.adapter_registration import base_bank_spec

    adapter = lora_bank.read_adapter("trained", out)
    base = json.loads((phi3 / "config.json").read_text())
    lora_bank.check_fits(adapter, base_bank_spec(base, max_rank=adapter.max_module_rank))
