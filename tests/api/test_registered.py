"""A folder of PEFT adapters registered with the Python API and served on first use: in-process (the engine loads
each from its directory when a prompt first names it) and against running services (registered with the trainer,
loaded by the inference service from the store). Greedy ids equal PEFT with each row's adapter alone."""

from __future__ import annotations

import shutil

import pytest

from loraflow import AutoLoraModelForCausalLM, register_adapters
from loraflow.api import UnknownAdapterError
from loraflow.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from tests.api.conftest import COMPILE, GENERATION_LEN, PROMPTS
from tests.api.test_auto_model import reference_ids

# Prompts naming three registered adapters and the base; two slots, so the third one evicts an idle one.
MAPPING = ["code", "gsm8k", "base", "hot"]


@pytest.fixture
def adapters_folder(api_adapters, tmp_path):
    """PEFT's layout for several adapters: one sub-directory each, named after it (plus a stray file)."""
    folder = tmp_path / "adapters"
    folder.mkdir()
    for name in ("code", "gsm8k", "hot"):
        shutil.copytree(api_adapters("llama")[name], folder / name)
    (folder / "README.md").write_text("three adapters\n")
    return folder


def test_in_process_registered_folder_is_served_on_first_use(adapters_folder, tiny_llama, api_adapters, peft_for,
                                                             hf_tokenizer, api_cache):
    model = AutoLoraModelForCausalLM.from_pretrained(tiny_llama, cache_dir=api_cache)
    try:
        assert model.register_adapters(adapters_folder) == ["code", "gsm8k", "hot"]
        assert model.registered_adapters == ["code", "gsm8k", "hot"] and model.active_adapter_to_id == {}
        model.register_adapters(adapters_folder)  # the same again: a no-op
        model.compile(**COMPILE, adapter_slots=2)
        manifest = model._backend.manifest
        # Nothing compiled in; banks wide enough for every registered adapter.
        assert manifest.adapters == () and manifest.adapter_slots == 2 and manifest.max_rank == 8
        assert set(manifest.graph.lora_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"}
        out = model.generate(hf_tokenizer, PROMPTS, prompt_to_adapter_mapping=MAPPING,
                             generation_len=GENERATION_LEN)
        assert out.generated_ids == reference_ids(peft_for("llama"), hf_tokenizer, PROMPTS, MAPPING)
        served = model._backend.slot_ids()
        assert len(served) == 2 and set(served) <= {"code", "gsm8k", "hot"}

        # The refusals: an unknown name lists the registered ones; a name both loaded and registered; an
        # adapter wider than the compiled banks; a directory that is not an adapter.
        with pytest.raises(UnknownAdapterError, match="'nope' is not loaded.*'hot'"):
            model.generate(hf_tokenizer, PROMPTS[:1], prompt_to_adapter_mapping=["nope"])
        with pytest.raises(ValueError, match="is registered"):
            model.load_adapter(adapters_folder / "hot", "hot")
        with pytest.raises(FailedPrecondition, match="rank 16 > max_rank 8.*compile\\(\\) again"):
            model.register_adapter(api_adapters("llama")["wide"], "wide")
        assert "wide" not in model.registered_adapters
        with pytest.raises(InvalidArgument, match="not a PEFT adapter dir"):
            model.register_adapter(adapters_folder.parent, "folder")
        empty = adapters_folder.parent / "empty"
        empty.mkdir()
        with pytest.raises(FileNotFoundError, match="holds no PEFT adapter"):
            model.register_adapters(empty)
        shutil.copytree(adapters_folder / "hot", empty / "bad name")
        with pytest.raises(ValueError, match="'bad name'.*not valid adapter names"):
            model.register_adapters(empty)
        assert model.registered_adapters == ["code", "gsm8k", "hot"]
        assert model.unload_adapter("hot") is True
        with pytest.raises(UnknownAdapterError):
            model.generate(hf_tokenizer, PROMPTS[:1], prompt_to_adapter_mapping=["hot"])
    finally:
        model.close()


def test_connected_registration_goes_to_the_trainer_and_inference_loads_on_first_use(
        services, adapters_folder, tiny_llama, peft_for, hf_tokenizer, api_cache, redis_url):
    import redis

    from loraflow.jobs.registry import Registry

    connect = {"inference": services.inference, "compiler": services.compiler, "trainer": services.trainer}
    model = AutoLoraModelForCausalLM.from_pretrained(tiny_llama, cache_dir=api_cache, connect=connect)
    registry = Registry(redis.Redis.from_url(redis_url))
    try:
        assert model.register_adapters(adapters_folder) == ["code", "gsm8k", "hot"]
        records = {name: registry.get_adapter(name) for name in ("code", "gsm8k", "hot")}
        assert {r.base_model for r in records.values()} == {str(tiny_llama.resolve())}
        assert all("/registered." in r.uri and r.job_id == "" for r in records.values())
        model.compile(**COMPILE, adapter_slots=2)
        out = model.generate(hf_tokenizer, PROMPTS, prompt_to_adapter_mapping=MAPPING,
                             generation_len=GENERATION_LEN)
        assert out.generated_ids == reference_ids(peft_for("llama"), hf_tokenizer, PROMPTS, MAPPING)
        artifact = model.client.get_artifact(model._backend.artifact_id)
        assert list(artifact.adapters) == [] and artifact.options.adapter_slots == 2

        # The service half alone, for a script that only registers: the same folder again writes nothing, and
        # other files under a registered name are refused.
        again = register_adapters(adapters_folder, str(tiny_llama.resolve()), connect=services.trainer)
        assert {n: a.uri for n, a in again.items()} == {n: r.uri for n, r in records.items()}
        shutil.rmtree(adapters_folder / "hot")
        shutil.copytree(adapters_folder / "code", adapters_folder / "hot")
        with pytest.raises(AlreadyExists, match="'hot' is already registered"):
            register_adapters({"hot": adapters_folder / "hot"}, str(tiny_llama.resolve()), connect=services.trainer)
    finally:
        model.close()
        registry.redis.close()
