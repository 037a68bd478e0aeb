"""The strict config.json reader: every malformed or absurd size is INVALID_ARGUMENT naming the key."""

from __future__ import annotations

import pytest

from loraflow.errors import InvalidArgument
from loraflow.options.hf_config import (
    MAX_JSON_DEPTH,
    MAX_LAYERS,
    HfModelConfig,
    parse_config_bytes,
    read_config_file,
)

LLAMA = {"model_type": "llama", "vocab_size": 384, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
         "max_position_embeddings": 256, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
         "tie_word_embeddings": False, "rms_norm_eps": 1e-5}


def refused(cfg) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as err:
        HfModelConfig.from_dict(cfg, field="base_model")
    return err.value


def test_a_real_config_reads_with_its_sizes(tiny_llama):
    cfg = HfModelConfig.from_dict(read_config_file(tiny_llama / "config.json", field="base_model"))
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim) == \
        ("llama", 2, 64, 2, 16)
    assert cfg.max_position_embeddings == 256 and cfg.num_experts == 1


@pytest.mark.parametrize(("key", "value", "field", "why"), [
    ("num_hidden_layers", "2", "base_model.num_hidden_layers", "must be an integer (not a string)"),
    ("num_hidden_layers", 2.0, "base_model.num_hidden_layers", "must be an integer (not a number)"),
    ("num_hidden_layers", True, "base_model.num_hidden_layers", "must be an integer (not a boolean)"),
    ("num_hidden_layers", 1_000_000, "base_model.num_hidden_layers", f"must be in 1..{MAX_LAYERS}"),
    ("num_hidden_layers", 0, "base_model.num_hidden_layers", "must be in 1.."),
    ("hidden_size", -64, "base_model.hidden_size", "must be in 1.."),
    ("vocab_size", 10**12, "base_model.vocab_size", "must be in 1.."),
    ("max_position_embeddings", 0, "base_model.max_position_embeddings", "must be in 1.."),
    ("num_key_value_heads", 3, "base_model.num_key_value_heads", "must divide num_attention_heads=4"),
    ("head_dim", [16], "base_model.head_dim", "must be an integer (not an array)"),
    ("tie_word_embeddings", "yes", "base_model.tie_word_embeddings", "must be true or false"),
    ("rms_norm_eps", -1.0, "base_model.rms_norm_eps", "finite number > 0"),
    ("rope_scaling", "fast please", "base_model.rope_scaling", "must be an object or null"),
    ("rope_scaling", {"rope_type": "warp-drive", "factor": 2}, "base_model.rope_scaling.rope_type", "must be one of"),
    ("rope_scaling", {"type": "linear"}, "base_model.rope_scaling.factor", "needs a scaling factor"),
    ("rope_scaling", {"rope_type": "linear", "factor": -8}, "base_model.rope_scaling.factor", "finite number > 0"),
    ("rope_scaling", {"rope_type": "linear", "factor": {"x": 1}}, "base_model.rope_scaling.factor", "must be a number"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "base_model.rope_scaling.low_freq_factor", "needs it"),
    ("rope_parameters", {"full_attention": {"rope_type": "yarn"}}, "base_model.rope_parameters.full_attention.factor",
     "needs a scaling factor"),
    ("layer_types", ["full_attention"] * 5, "base_model.layer_types", "one per layer"),
    ("num_local_experts", 10**6, "base_model.num_local_experts", "must be in 1.."),
    ("model_type", 7, "base_model.model_type", "model type string"),
])
def test_malformed_and_absurd_values_name_the_key(key, value, field, why):
    err = refused({**LLAMA, key: value})
    assert err.field == field and why in err.message, err.message


def test_required_sizes_and_legacy_aliases():
    cfg = dict(LLAMA)
    del cfg["num_hidden_layers"]
    assert refused(cfg).field == "base_model.num_hidden_layers"
    gpt2 = {"model_type": "gpt2", "n_layer": 3, "n_embd": 48, "n_head": 4, "vocab_size": 100, "n_positions": 64,
            "n_inner": None}
    read = HfModelConfig.from_dict(gpt2)
    assert (read.num_hidden_layers, read.hidden_size, read.intermediate_size, read.max_position_embeddings) == \
        (3, 48, 192, 64)
    err = refused({**gpt2, "n_layer": "3"})
    assert err.field == "base_model.n_layer"  # the key the file used


def test_a_multimodal_wrapper_is_read_from_its_text_config():
    cfg = HfModelConfig.from_dict({"model_type": "gemma3", "text_config": {**LLAMA, "model_type": "gemma3_text"}})
    assert cfg.model_type == "gemma3" and cfg.num_hidden_layers == 2
    assert refused({"model_type": "gemma3", "text_config": {**LLAMA, "num_hidden_layers": "2"}}).field == \
        "base_model.num_hidden_layers"


@pytest.mark.parametrize(("raw", "why"), [
    (b"{nope", "is not valid JSON at line 1 column 2"),
    (b"[1, 2]", "is not a JSON object (it is an array)"),
    (b'"llama"', "is not a JSON object (it is a string)"),
    (b'{"hidden_size": NaN}', "is not valid JSON"),
    (b'{"hidden_size": Infinity}', "is not valid JSON"),
    (b'{"n": ' + b"9" * 5000 + b"}", "is not valid JSON"),  # past Python's int-digits limit
    (b"[" * 100_000 + b"]" * 100_000, "is not valid JSON"),  # recursion, not a crash
    (b'{"a": ' + b"[" * 70 + b"]" * 70 + b"}", f"nests deeper than {MAX_JSON_DEPTH}"),
    (b"\xff\xfe{}", "is not valid JSON"),
])
def test_the_file_must_be_one_bounded_json_object(raw, why):
    with pytest.raises(InvalidArgument) as err:
        parse_config_bytes(raw, field="base_model")
    assert err.value.field == "base_model" and why in err.value.message, err.value.message
    assert b"nope" not in err.value.message.encode()  # the position, never the bytes


def test_an_oversized_file_is_refused_before_parsing(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b'{"pad": "' + b"x" * (2 << 20) + b'"}')
    with pytest.raises(InvalidArgument) as err:
        read_config_file(path, field="base_model", shown="config.json")
    assert "limit" in err.value.message and err.value.field == "base_model"
