"""The same script against running services (connect=...) gives the same ids as in-process."""

from __future__ import annotations

import pytest

from loraflow import AutoLoraModelForCausalLM
from loraflow.errors import FailedPrecondition
from tests.api.conftest import COMPILE, GENERATION_LEN, MAPPING, PROMPTS
from tests.api.test_auto_model import snippet


def test_connected_script_gives_the_in_process_ids(services, tiny_llama, api_adapters, hf_tokenizer, api_cache,
                                                   monkeypatch):
    adapters = api_adapters("llama")
    local, _, expected = snippet(tiny_llama, adapters, hf_tokenizer, api_cache)
    local.close()
    monkeypatch.setenv("LORAFLOW_COMPILER", services.compiler)
    remote, uri, out = snippet(tiny_llama, adapters, hf_tokenizer, api_cache, connect=services.inference)
    try:
        assert remote.client is not None and uri.startswith("file://")
        assert out.generated_ids == expected.generated_ids
        assert out.generated_texts == expected.generated_texts
        assert set(remote.active_adapter_to_id) == {"gsm8k", "code"}
        # Hot-add on the service, then the too-large adapter is refused with the recompile reason.
        remote.load_adapter(adapters["hot"], "hot")
        hot = remote.generate(hf_tokenizer, PROMPTS[:1], prompt_to_adapter_mapping=["hot"],
                              generation_len=GENERATION_LEN)
        with pytest.raises(FailedPrecondition, match="without recompiling"):
            remote.load_adapter(adapters["wide"], "wide")
        assert remote.unload_adapter("hot") is True
        with pytest.raises(KeyError, match="'hot' is not loaded"):
            remote.generate(hf_tokenizer, PROMPTS[:1], prompt_to_adapter_mapping=["hot"])
        # The same script run again, connected by the environment alone: the compile is a cache hit and
        # the adapters are already bound.
        monkeypatch.setenv("LORAFLOW_INFERENCE", services.inference)
        again = AutoLoraModelForCausalLM.from_pretrained(tiny_llama, cache_dir=api_cache)
        assert again.client is not None
        again.load_adapter(adapters["gsm8k"], "gsm8k")
        again.load_adapter(adapters["code"], "code")
        assert again.compile(**COMPILE) == uri
        again.load_adapter(adapters["hot"], "hot")  # bound on the service by the first run: served at once
        rerun = again.generate(hf_tokenizer, PROMPTS, prompt_to_adapter_mapping=MAPPING, generation_len=GENERATION_LEN)
        assert rerun.generated_ids == expected.generated_ids
        assert again.generate(hf_tokenizer, PROMPTS[:1], prompt_to_adapter_mapping=["hot"],
                              generation_len=GENERATION_LEN).generated_ids == hot.generated_ids
        again.close()
        # No free slot: refused rather than evicting an adapter the script still names.
        full = AutoLoraModelForCausalLM.from_pretrained(tiny_llama, cache_dir=api_cache, connect=services.inference)
        full.load_adapter(adapters["gsm8k"], "gsm8k")
        full.load_adapter(adapters["code"], "code")
        full.compile(**COMPILE, adapter_slots=2)
        with pytest.raises(FailedPrecondition, match="every adapter slot .* is taken"):
            full.load_adapter(adapters["hot"], "hot")
        full.close()
    finally:
        remote.close()
