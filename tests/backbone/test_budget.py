"""The memory estimators agree with what the code really allocates, and the budget refuses naming field,
estimate and limit."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from loraflow.errors import InvalidArgument, ResourceExhausted
from loraflow.options.budget import (
    MEMORY_BUDGET,
    MIN_MEMORY_BUDGET_BYTES,
    ResourceBudget,
    add_budget_arguments,
    bank_bytes,
    cgroup_memory_limit,
    estimate,
    kv_cache_bytes,
    parameter_count,
    parse_memory_budget,
    serving_estimate,
)
from loraflow.options.hf_config import HfModelConfig, read_config_file


def test_parameter_count_is_the_real_models(tiny_model_factory):
    import torch
    from transformers import AutoModelForCausalLM

    for arch in ("llama", "qwen2"):
        path = tiny_model_factory(arch)
        cfg = HfModelConfig.from_dict(read_config_file(path / "config.json", field="base_model"))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        real = sum(p.numel() for p in model.parameters())
        biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias"))
        assert parameter_count(cfg) == real - biases, arch  # Qwen2's q/k/v biases are the only difference


def test_bank_and_kv_estimates_match_the_arrays_the_runtime_allocates():
    from loraflow.artifact.kv_cache import SharedKvCache
    from loraflow.artifact.lora_bank import BankSpec, empty_banks

    modules = {"q_proj": (64, 64), "v_proj": (64, 32), "down_proj": (128, 64)}
    spec = BankSpec(num_layers=3, max_rank=8, adapter_slots=5, modules=modules)
    banks_a, banks_b = empty_banks(spec)
    real = sum(a.nbytes for a in banks_a.values()) + sum(b.nbytes for b in banks_b.values())
    assert bank_bytes(3, 5, 8, modules) == real

    cache = SharedKvCache(layers=3, slots=4, kv_heads=2, ctx_len=32, head_dim=16, dtype=np.float32)
    assert kv_cache_bytes(3, 4, 32, 2, 16) == cache.nbytes


def test_the_budget_names_field_estimate_and_limit():
    budget = ResourceBudget(1 << 30, "--memory-budget 1.0 GiB")
    needed = estimate("compile job", [("adapter banks", 51 << 30), ("weights", 1 << 20)])
    with pytest.raises(ResourceExhausted) as err:
        budget.check(needed, field="options.adapter_slots", value=1024)
    e = err.value
    assert e.reason == "OVER_MEMORY_BUDGET" and e.field == "options.adapter_slots"
    assert e.metadata["estimate_bytes"] == str(needed.total) and e.metadata["limit_bytes"] == str(1 << 30)
    assert "51.0 GiB" in e.message and "adapter banks 51.0 GiB" in e.message and "1.0 GiB" in e.message
    assert "--memory-budget" in e.message and "LORAFLOW_MEMORY_BUDGET" in e.message
    budget.check(estimate("x", [("a", 1 << 29)]), field="f")  # fits
    with pytest.raises(ResourceExhausted) as err:  # fits alone, not beside what is already held
        budget.check(estimate("x", [("a", 1 << 29)]), field="artifact_id", in_use=700 << 20,
                     in_use_what="2 loaded models")
    assert "2 loaded models" in err.value.message


@pytest.mark.parametrize(("text", "nbytes", "fraction"), [
    ("75%", None, 0.75), ("12GiB", 12 << 30, None), ("512M", 512 << 20, None), ("1.5G", 3 << 29, None),
    (str(1 << 30), 1 << 30, None),
])
def test_budget_spellings(text, nbytes, fraction):
    spec = parse_memory_budget(text)
    assert (spec.nbytes, spec.fraction) == (nbytes, fraction)


@pytest.mark.parametrize("text", ["0%", "150%", "nan%", "-1G", "lots", "1K", "2PiB0", ""])
def test_bad_budgets_are_refused(text):
    with pytest.raises(InvalidArgument):
        parse_memory_budget(text)


def test_flag_env_and_default(monkeypatch):
    parser = argparse.ArgumentParser()
    add_budget_arguments(parser)
    assert "LORAFLOW_MEMORY_BUDGET" in parser.format_help() and "default 75%" in parser.format_help()
    assert ResourceBudget.from_args(parser.parse_args(["--memory-budget", "2GiB"]), {}).memory_bytes == 2 << 30
    assert ResourceBudget.from_args(parser.parse_args([]), {"LORAFLOW_MEMORY_BUDGET": "1GiB"}).memory_bytes == 1 << 30
    default = ResourceBudget.from_args(parser.parse_args([]), {})
    assert MIN_MEMORY_BUDGET_BYTES <= default.memory_bytes and "75%" in default.source
    with pytest.raises(SystemExit):
        parser.parse_args(["--memory-budget", "lots"])
    with pytest.raises(InvalidArgument) as err:
        MEMORY_BUDGET.value(None, {"LORAFLOW_MEMORY_BUDGET": "lots"})
    assert err.value.field == "LORAFLOW_MEMORY_BUDGET"
    for flag, env in (("--preparation-threads", "LORAFLOW_PREPARATION_THREADS"),
                      ("--preparation-queue", "LORAFLOW_PREPARATION_QUEUE")):
        assert flag in parser.format_help() and env in parser.format_help()
    got = ResourceBudget.from_args(parser.parse_args(["--preparation-threads", "3"]),
                                   {"LORAFLOW_PREPARATION_QUEUE": "9"})
    assert (got.preparation_threads, got.preparation_queue) == (3, 9)
    assert (default.preparation_threads, default.preparation_queue) == (2, 4)
    for bad in (["--preparation-threads", "0"], ["--preparation-queue", "-1"], ["--preparation-threads", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_the_cgroup_limit_is_read_for_v1_and_v2(tmp_path):
    v2 = tmp_path / "v2"
    (v2 / "job").mkdir(parents=True)
    (v2 / "job" / "memory.max").write_text("4294967296\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/job\n")
    assert cgroup_memory_limit(str(proc), str(v2)) == 4 << 30
    (v2 / "job" / "memory.max").write_text("max\n")
    assert cgroup_memory_limit(str(proc), str(v2)) is None
    v1 = tmp_path / "v1"
    (v1 / "memory" / "pod").mkdir(parents=True)
    (v1 / "memory" / "pod" / "memory.limit_in_bytes").write_text(str(2 << 30))
    proc.write_text("4:memory:/pod\n1:cpu:/\n")
    assert cgroup_memory_limit(str(proc), str(v1)) == 2 << 30


def test_serving_estimate_of_a_manifest(tiny_artifact_manifest):
    manifest = tiny_artifact_manifest
    got = dict(serving_estimate(manifest).parts)
    g = manifest.graph
    slots = int(manifest.options["full_batch_size"])
    assert got["KV cache"] == 2 * g.layers * slots * int(manifest.options["ctx_len"]) * g.num_kv_heads * g.head_dim * 4
    assert got["graph weights"] == 1000 + 50_000  # model.onnx and its data; not the tokenizer, not adapters/
    assert dict(serving_estimate(manifest, device="ai100").parts) == {"adapter banks": got["adapter banks"]}


@pytest.fixture(scope="module")
def tiny_artifact_manifest():
    from loraflow.artifact.manifest import FileEntry, GraphSpec, LoraModuleSpec, Manifest

    graph = GraphSpec(file="model.onnx", target="onnxruntime", dtype="float32", layers=2, num_kv_heads=2, head_dim=16,
                      vocab_size=384, inputs=(), outputs=(),
                      lora_modules={"q_proj": LoraModuleSpec(64, 64), "v_proj": LoraModuleSpec(64, 32)})
    files = (FileEntry("model.onnx", "0" * 64, 1000), FileEntry("model.onnx.data", "1" * 64, 50_000),
             FileEntry("tokenizer/tokenizer.json", "2" * 64, 7000), FileEntry("adapters/a/x.onnx", "3" * 64, 9))
    from loraflow.artifact.manifest import BaseModelInfo

    return Manifest(artifact_id="a" * 32, compiler_version="t", created="now",
                    base_model=BaseModelInfo("m", "f", "llama", {}),
                    options={"ctx_len": 64, "full_batch_size": 3, "adapter_slots": 4, "max_rank": 8},
                    graph=graph, adapters=(), tokenizer_dir="tokenizer", chat_template=None,
                    generation_config={"eos_token_ids": [1]}, files=files)
