"""The QEfficient snippet on tiny Llama/Mistral/Qwen2 models, in-process: every row's greedy ids equal PEFT
with that row's adapter alone; compile is content-addressed; hot-add after compile; QEfficient's errors."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest

from loraflow import AutoLoraModelForCausalLM
from loraflow.artifact.model_families import SUPPORTED_MODEL_FAMILIES
from loraflow.compat.qefficient import QEffAutoLoraModelForCausalLM
from loraflow.errors import FailedPrecondition, InvalidArgument
from tests.api.conftest import COMPILE, GENERATION_LEN, MAPPING, PROMPTS


def reference_ids(peft, tokenizer, prompts, mapping, n=GENERATION_LEN):
    return [peft.generate(tokenizer(p)["input_ids"], "" if a == "base" else a, n)
            for p, a in zip(prompts, mapping, strict=True)]


def snippet(model_dir, adapters, tokenizer, cache, cls=AutoLoraModelForCausalLM, **kw):
    model = cls.from_pretrained(model_dir, cache_dir=cache, **kw)
    model.load_adapter(adapters["gsm8k"], "gsm8k")
    model.load_adapter(adapters["code"], "code")
    path = model.compile(**COMPILE)
    out = model.generate(tokenizer, PROMPTS, prompt_to_adapter_mapping=MAPPING, generation_len=GENERATION_LEN)
    return model, path, out


@pytest.fixture(scope="module")
def llama_model(tiny_llama, api_adapters, hf_tokenizer, api_cache):
    model, path, out = snippet(tiny_llama, api_adapters("llama"), hf_tokenizer, api_cache,
                               cls=QEffAutoLoraModelForCausalLM)
    yield model, path, out
    model.close()


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_snippet_rows_equal_peft_with_each_adapter_alone(arch, tiny_model_factory, api_adapters, peft_for,
                                                         api_cache):
    from transformers import AutoTokenizer

    model_dir = tiny_model_factory(arch)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model, _, out = snippet(model_dir, api_adapters(arch), tokenizer, api_cache)
    try:
        expected = reference_ids(peft_for(arch), tokenizer, PROMPTS, MAPPING)
        assert out.generated_ids == expected
        assert len({tuple(ids) for ids in expected}) >= 3  # the adapters really change the tokens
    finally:
        model.close()


def test_llama_snippet_through_the_qefficient_name(llama_model, peft_for, hf_tokenizer):
    model, path, out = llama_model
    assert QEffAutoLoraModelForCausalLM is AutoLoraModelForCausalLM
    assert out.generated_ids == reference_ids(peft_for("llama"), hf_tokenizer, PROMPTS, MAPPING)
    assert out.generated_texts == [hf_tokenizer.decode(i, skip_special_tokens=True) for i in out.generated_ids]
    assert out.batch_size == 4
    perf = out.perf_metrics
    assert perf.total_time > 0 and perf.prefill_time > 0 and perf.prefill_time <= perf.total_time
    assert perf.decode_perf > 0 and perf.total_perf > 0
    assert model.active_adapter_to_id == {"gsm8k": 1, "code": 2}
    manifest = json.loads((model.cache_dir / "artifacts" / path.rsplit("/", 1)[-1] / "manifest.json").read_text())
    assert [a["name"] for a in manifest["adapters"]] == ["gsm8k", "code"]
    assert manifest["options"]["max_rank"] == 8 and len(manifest["options"]["target_modules"]) == 7


def test_compile_is_content_addressed(llama_model, tiny_llama, api_adapters, api_cache):
    model, path, _ = llama_model
    manifest = model.cache_dir / "artifacts" / path.rsplit("/", 1)[-1] / "manifest.json"
    built = manifest.stat().st_mtime_ns
    again = AutoLoraModelForCausalLM.from_pretrained(tiny_llama, cache_dir=api_cache)
    try:
        again.load_adapter(api_adapters("llama")["gsm8k"], "gsm8k")
        again.load_adapter(api_adapters("llama")["code"], "code")
        assert again.compile(**COMPILE) == path
        assert manifest.stat().st_mtime_ns == built  # returned, not rebuilt
        again.unload_adapter("code")
        assert again.compile(**COMPILE) != path  # other inputs, other artifact
    finally:
        again.close()


def test_ai100_only_options_are_recorded_and_ignored_by_onnxruntime(llama_model, tiny_llama, api_adapters,
                                                                    api_cache, caplog):
    _, path, _ = llama_model
    model = AutoLoraModelForCausalLM.from_pretrained(tiny_llama, cache_dir=api_cache)
    try:
        model.load_adapter(api_adapters("llama")["gsm8k"], "gsm8k")
        model.load_adapter(api_adapters("llama")["code"], "code")
        with caplog.at_level(logging.INFO, logger="loraflow.api"):
            assert model.compile(**COMPILE, num_cores=4, mxfp6_matmul=True, mos=1) == path
        assert model.compile_ignored == {"num_cores": 4, "mxfp6_matmul": True, "mos": 1}
        assert "ONNX Runtime ignores them" in caplog.text
        with pytest.raises(TypeError, match="unexpected keyword argument.*'no_such_option'"):
            model.compile(**COMPILE, no_such_option=1)
        with pytest.raises(InvalidArgument, match="options.dtype"):
            model.compile(**COMPILE, dtype="bf16")
        int4 = model.compile(**COMPILE, dtype="int4")  # the weight-only dtype reaches the compiler too
        assert int4 != path and json.loads((Path(int4) / "manifest.json").read_text())["options"]["dtype"] == "int4"
    finally:
        model.close()


def test_adapter_added_after_compile_is_served_without_recompiling(tiny_llama, api_adapters, peft_for, hf_tokenizer,
                                                                   api_cache):
    adapters = api_adapters("llama")
    model = AutoLoraModelForCausalLM.from_pretrained(tiny_llama, cache_dir=api_cache)
    try:
        model.load_adapter(adapters["gsm8k"], "gsm8k")
        model.load_adapter(adapters["code"], "code")
        path = model.compile(**COMPILE)
        assert model.load_adapter(adapters["hot"], "hot") == 3
        assert model.artifact_path == path
        prompts, mapping = PROMPTS[:3], ["hot", "base", "gsm8k"]
        out = model.generate(hf_tokenizer, prompts, prompt_to_adapter_mapping=mapping, generation_len=GENERATION_LEN)
        assert out.generated_ids == reference_ids(peft_for("llama"), hf_tokenizer, prompts, mapping)
        assert model.active_adapter_to_id == {"gsm8k": 1, "code": 2, "hot": 3}
        # Rank 16 does not fit banks compiled at rank 8: kept for the next compile, and says so.
        with pytest.raises(FailedPrecondition, match=r"does not fit the compiled artifact .*compile\(\) again"):
            model.load_adapter(adapters["wide"], "wide")
        with pytest.raises(FailedPrecondition, match="call compile"):
            model.generate(hf_tokenizer, ["x"], prompt_to_adapter_mapping=["wide"], generation_len=2)
        assert model.compile(**COMPILE) != path  # recompiled with "wide" in it
        out = model.generate(hf_tokenizer, ["math prompt"], prompt_to_adapter_mapping=["wide"],
                             generation_len=GENERATION_LEN)
        assert out.generated_ids == reference_ids(peft_for("llama"), hf_tokenizer, ["math prompt"], ["wide"])
    finally:
        model.close()


def test_qefficient_errors(llama_model, tiny_llama, api_adapters, hf_tokenizer, api_cache, tmp_path):
    model, _, _ = llama_model
    with pytest.raises(TypeError, match="Required adapter name argument in string format"):
        model.load_adapter(api_adapters("llama")["gsm8k"])
    with pytest.raises(RuntimeError, match=r"len\(prompts\) = 2, len\(prompt_to_adapter_mapping\) = 3"):
        model.generate(hf_tokenizer, PROMPTS[:2], prompt_to_adapter_mapping=MAPPING[:3])
    for error in (KeyError, ValueError):
        with pytest.raises(error, match=r"'nope' is not loaded; loaded adapters: \['code', 'gsm8k'\]"):
            model.generate(hf_tokenizer, PROMPTS[:2], prompt_to_adapter_mapping=["gsm8k", "nope"])
    with pytest.raises(NotImplementedError, match="no hub"):
        model.download_adapter("predibase/gsm8k")

    fresh = AutoLoraModelForCausalLM.from_pretrained(tiny_llama, cache_dir=api_cache)
    with pytest.raises(TypeError, match="Please run compile API first"):
        fresh.generate(hf_tokenizer, ["x"])
    fresh.load_adapter(api_adapters("llama")["gsm8k"], "gsm8k")
    fresh.load_adapter(api_adapters("llama")["code"], "code")
    assert fresh.unload_adapter("gsm8k") is True
    assert fresh.unload_adapter("gsm8k") is False
    assert fresh.active_adapter_to_id == {"code": 1}  # renumbered, as QEfficient does
    with pytest.raises(ValueError, match="already loaded from"):
        fresh.load_adapter(api_adapters("llama")["hot"], "code")
    with pytest.raises(TypeError, match="full_batch_size"):
        AutoLoraModelForCausalLM.from_pretrained(tiny_llama, continuous_batching=True,
                                                 cache_dir=api_cache).compile(ctx_len=64)

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    # Every supported family listed (the families grow: services/compiler/families).
    with pytest.raises(NotImplementedError, match=r"'gpt2'.*" + re.escape(str(list(SUPPORTED_MODEL_FAMILIES)))):
        AutoLoraModelForCausalLM.from_pretrained(gpt2, cache_dir=api_cache)
    with pytest.raises(FileNotFoundError, match="no hub"):
        AutoLoraModelForCausalLM.from_pretrained("mistralai/Mistral-7B-v0.1", cache_dir=api_cache)
    with pytest.raises(FileNotFoundError, match="loraflow models import smollm2-135m-instruct"):
        AutoLoraModelForCausalLM.from_pretrained("smollm2-135m-instruct", cache_dir=tmp_path / "empty-cache")
    with pytest.raises(InvalidArgument, match="adapter_config.json"):
        fresh.load_adapter(tiny_llama, "not-an-adapter")
    with pytest.raises(TypeError, match="sampling takes"):
        model.generate(hf_tokenizer, ["x"], temprature=0.5)


def test_config_overrides_and_sampling(tiny_llama, api_adapters, hf_tokenizer, api_cache):
    model = AutoLoraModelForCausalLM.from_pretrained(tiny_llama, cache_dir=api_cache, rms_norm_eps=1e-3)
    try:
        config = json.loads((model.base_dir / "config.json").read_text())
        assert config["rms_norm_eps"] == 1e-3 and model.base_dir != tiny_llama
        model.load_adapter(api_adapters("llama")["gsm8k"], "gsm8k")
        model.compile(**COMPILE)
        kwargs = dict(prompt_to_adapter_mapping=["gsm8k", "gsm8k"], generation_len=8, temperature=1.0, top_k=20,
                      seed=7, ignore_eos=True)
        first = model.generate(hf_tokenizer, ["generic", "generic"], **kwargs)
        again = model.generate(hf_tokenizer, ["generic", "generic"], **kwargs)
        assert first.generated_ids == again.generated_ids and all(len(i) == 8 for i in first.generated_ids)
    finally:
        model.close()
    with pytest.raises(TypeError, match="no_such_key"):
        AutoLoraModelForCausalLM.from_pretrained(tiny_llama, cache_dir=api_cache, no_such_key=1)


class ListStreamer:
    """The transformers streamer protocol (put(ids), end())."""

    def __init__(self):
        self.puts: list[list[int]] = []
        self.ended = 0

    def put(self, value) -> None:
        self.puts.append([int(v) for v in value])

    def end(self) -> None:
        self.ended += 1


def test_streamer_store_uri_adapter_and_the_artifacts_own_tokenizer(tiny_llama, api_adapters, hf_tokenizer,
                                                                    api_cache, tmp_path):
    from loraflow.storage.store import open_store

    store = open_store((tmp_path / "store").as_uri())
    uri = store.publish_dir("adapters/gsm8k/job-a1", api_adapters("llama")["gsm8k"])
    model = AutoLoraModelForCausalLM.from_pretrained(tiny_llama, cache_dir=api_cache)
    try:
        model.load_adapter(uri, "gsm8k")  # a store URI, as the trainer service publishes adapters
        model.load_adapter(api_adapters("llama")["code"], "code")
        model.compile(**COMPILE)
        streamer = ListStreamer()
        out = model.generate(hf_tokenizer, PROMPTS[:2], prompt_to_adapter_mapping=["gsm8k", "code"],
                             generation_len=GENERATION_LEN, streamer=streamer)
        prompt = hf_tokenizer(PROMPTS[0])["input_ids"]
        assert streamer.puts[0] == prompt and streamer.ended == 1
        assert [t for put in streamer.puts[1:] for t in put] == out.generated_ids[0]
        # tokenizer=None: the artifact's own tokenizer encodes and decodes the same way.
        own = model.generate(None, PROMPTS[:2], prompt_to_adapter_mapping=["gsm8k", "code"],
                             generation_len=GENERATION_LEN)
        assert own.generated_ids == out.generated_ids and own.generated_texts == out.generated_texts
    finally:
        model.close()


def test_hot_add_never_evicts_a_loaded_adapter(tiny_llama, api_adapters, hf_tokenizer, api_cache):
    adapters = api_adapters("llama")
    model = AutoLoraModelForCausalLM.from_pretrained(tiny_llama, cache_dir=api_cache)
    try:
        model.load_adapter(adapters["gsm8k"], "gsm8k")
        model.load_adapter(adapters["code"], "code")
        model.compile(**COMPILE, adapter_slots=2)  # no room left to hot-add
        with pytest.raises(FailedPrecondition, match="all 2 adapter slots .* are taken"):
            model.load_adapter(adapters["hot"], "hot")
        assert model.active_adapter_to_id == {"gsm8k": 1, "code": 2}
        out = model.generate(hf_tokenizer, PROMPTS[:2], prompt_to_adapter_mapping=["gsm8k", "code"], generation_len=3)
        assert all(len(ids) for ids in out.generated_ids)
    finally:
        model.close()
