"""Fixtures of the inference suite: a tiny model, PEFT adapters, an artifact built by the compiler,
and greedy reference tokens from PEFT/HF ``generate`` (torch appears only here, never in the code under test)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from services.inference.tokenization import TextTokenizer
from tests.support.peft_reference import PeftReference

# name -> (seed, r, lora_alpha, target_modules, use_rslora); "hot" is not compiled in, it is hot-added.
ADAPTERS = {
    "alpha": (1, 4, 8, ["q_proj", "v_proj"], False),
    "beta": (2, 8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False),
    "gamma": (3, 2, 4, ["k_proj", "o_proj", "down_proj"], True),
    "hot": (4, 6, 12, ["q_proj", "up_proj", "down_proj"], False),
}
COMPILED = ("alpha", "beta", "gamma")
PROMPTS = ["the quick brown fox", "reverse the word: hello ->", "add 2 and 3 ->", "héllo wörld ✓"]


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_llama) -> TextTokenizer:
    return TextTokenizer(tiny_llama)


def _make_adapter(model_dir: Path, out: Path, seed: int, r: int, alpha: int, targets, rslora: bool) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
                        init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # scale so adapters change greedy tokens clearly but keep logits sane
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(0.5)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_adapters(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: _make_adapter(tiny_llama, root / name, *spec) for name, spec in ADAPTERS.items()}


@pytest.fixture(scope="session")
def tiny_artifact(tiny_llama, tiny_adapters, tmp_path_factory):
    """(artifact_dir, manifest): 3 adapters compiled in, 4 adapter slots, 4 KV slots, ctx 64."""
    from services.compiler.artifact import build_artifact
    from services.compiler.options import CompileOptions

    out = tmp_path_factory.mktemp("artifact")
    options = CompileOptions(batch_size=2, full_batch_size=4, prefill_seq_len=8, ctx_len=64, max_rank=8,
                             adapter_slots=4)
    manifest = build_artifact(tiny_llama, [(n, tiny_adapters[n]) for n in COMPILED], options, out)
    return out, manifest


@pytest.fixture(scope="session")
def peft_reference(tiny_llama, tiny_adapters) -> PeftReference:
    return PeftReference(tiny_llama, tiny_adapters)


@dataclass(frozen=True)
class PublishedStore:
    """The tiny artifact and the "hot" adapter published in a fresh store and registered in a flushed Redis."""

    root: Path
    store: object
    registry: object
    artifact_id: str


@pytest.fixture(scope="module")
def published_store(tiny_artifact, tiny_adapters, redis_server, tmp_path_factory) -> PublishedStore:
    import redis

    from loraflow.jobs.registry import AdapterRecord, ArtifactRecord, Registry
    from loraflow.storage.store import artifact_key, open_store

    artifact_dir, manifest = tiny_artifact
    root = tmp_path_factory.mktemp("published")
    store = open_store((root / "store").as_uri())
    artifact_uri = store.publish_dir(artifact_key(manifest.artifact_id), artifact_dir)
    adapter_uri = store.publish_dir("adapters/hot", tiny_adapters["hot"])
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    registry = Registry(client)
    base = manifest.base_model.source
    registry.put_artifact(ArtifactRecord(artifact_id=manifest.artifact_id, uri=artifact_uri, base_model=base))
    registry.put_adapter(AdapterRecord(name="hot", uri=adapter_uri, base_model=base))
    return PublishedStore(root=root, store=store, registry=registry, artifact_id=manifest.artifact_id)
