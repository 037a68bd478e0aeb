"""loraflow.finetune in-process: a PEFT adapter PEFT loads and that changes outputs; apply_peft; LoraConfig
translation refusing what the compiler cannot serve; finetune as a job on a running trainer service."""

from __future__ import annotations

import json

import pytest
from peft import LoraConfig

import loraflow
from loraflow import AutoLoraModelForCausalLM
from loraflow.errors import InvalidArgument
from tests.api.conftest import COMPILE

ROWS = [{"prompt": f"reverse {w} ->", "completion": f" {w[::-1]}"}
        for w in ("abc", "hello", "fox", "dog", "lazy", "quick", "brown", "jumps")]
TRAIN = dict(max_steps=12, batch_size=4, learning_rate=5e-2, max_seq_len=32, seed=0)


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetuned") / "reverse"
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    return loraflow.finetune(str(tiny_llama), ROWS, lora_config=config, adapter_name="reverse", output_dir=out,
                             progress=False, **TRAIN)


def test_finetune_writes_an_adapter_peft_loads_and_that_changes_outputs(trained, tiny_llama, hf_tokenizer,
                                                                       api_cache):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = trained.adapter_path
    assert (path / "adapter_model.safetensors").is_file() and (path / "loss_curve.png").stat().st_size > 0
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert trained.metrics["steps"] == 12 and trained.metrics["train_loss"] < trained.metrics["first_train_loss"]

    prompt = hf_tokenizer("reverse hello ->")["input_ids"]
    ids = torch.tensor([prompt])
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        base_ids = base.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
        tuned = PeftModel.from_pretrained(base, path).eval()
        tuned_ids = tuned.generate(input_ids=ids, max_new_tokens=6, do_sample=False,
                                   attention_mask=torch.ones_like(ids))
    assert tuned_ids[0, len(prompt):].tolist() != base_ids[0, len(prompt):].tolist()

    # The result is a path, and the name finetune gave it resolves in this process too.
    model = AutoLoraModelForCausalLM.from_pretrained(tiny_llama, cache_dir=api_cache)
    try:
        model.load_adapter(trained, "by-path")
        model.load_adapter("reverse", "by-name")
        model.compile(**COMPILE)
        out = model.generate(hf_tokenizer, ["reverse hello ->"] * 2, prompt_to_adapter_mapping=["by-path", "by-name"],
                             generation_len=6)
        assert out.generated_ids == [tuned_ids[0, len(prompt):].tolist()] * 2
    finally:
        model.close()


def test_apply_peft_returns_the_model_the_trainer_trains(tiny_llama):
    peft_model = loraflow.apply_peft(str(tiny_llama), LoraConfig(r=2, lora_alpha=4, target_modules=["up_proj"]))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "up_proj" in n for n in trainable)
    assert peft_model.peft_config["default"].r == 2


@pytest.mark.parametrize(("config", "field"), [
    (LoraConfig(r=4, target_modules=["lm_head"]), "lora.target_modules[0]"),
    (LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), "lora_config.use_dora"),
    (LoraConfig(r=4, target_modules=["q_proj"], bias="all"), "lora.bias"),
    (LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 8}), "lora_config.rank_pattern"),
])
def test_lora_configs_the_compiler_cannot_serve_are_refused(tiny_llama, config, field):
    with pytest.raises(InvalidArgument) as info:
        loraflow.finetune(str(tiny_llama), ROWS, lora_config=config, progress=False, **TRAIN)
    assert info.value.field == field


def test_unknown_training_option_is_a_type_error(tiny_llama):
    with pytest.raises(TypeError, match="'epochz'"):
        loraflow.finetune(str(tiny_llama), ROWS, progress=False, epochz=1)


def test_finetune_against_a_running_trainer(services, tiny_llama, tmp_path_factory):
    data = tmp_path_factory.mktemp("api-data") / "reverse.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    result = loraflow.finetune(str(tiny_llama), data, lora_config=LoraConfig(r=4, target_modules=["q_proj"]),
                               adapter_name="served", connect={"trainer": services.trainer}, progress=False,
                               **{**TRAIN, "max_steps": 3})
    assert result.adapter_name == "served" and result.adapter_uri.startswith("file://")
    assert result.adapter_path is None and result.metrics["steps"] == 3
