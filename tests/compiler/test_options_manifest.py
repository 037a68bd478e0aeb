"""CompileOptions validation/defaults, manifest round-trip, artifact id stability and sensitivity."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loraflow.artifact.manifest import (
    AdapterEntry,
    BaseModelInfo,
    FileEntry,
    GraphSpec,
    LoraModuleSpec,
    Manifest,
    TensorSpec,
    compute_artifact_id,
)
from loraflow.errors import InvalidArgument
from services.compiler.options import CompileOptions


@pytest.mark.parametrize("kwargs,field,value", [
    (dict(ctx_len=16, prefill_seq_len=32), "options.ctx_len", 16),
    (dict(adapter_slots=0), "options.adapter_slots", 0),
    (dict(adapter_slots=-1), "options.adapter_slots", -1),
    (dict(max_rank=0), "options.max_rank", 0),
    (dict(max_rank=-4), "options.max_rank", -4),
    (dict(target="tpu"), "options.target", "tpu"),
    (dict(dtype="bf16"), "options.dtype", "bf16"),
    (dict(target_modules=("q_proj", "lm_head")), "options.target_modules", ["lm_head"]),
    (dict(target="ai100", dtype="int8"), "options.dtype", "int8"),
    (dict(target="ai100", dtype="int4"), "options.dtype", "int4"),  # ai100 bundles hold fp32 or fp16 weights
    (dict(mxfp6_matmul=True), "options.mxfp6_matmul", True),
    (dict(num_cores=4), "options.num_cores", 4),
    (dict(batch_size=4, full_batch_size=2), "options.full_batch_size", 2),
    (dict(ctx_len=10**7), "options.ctx_len", 10**7),
])
def test_bad_options_name_field_and_value(kwargs, field, value):
    with pytest.raises(InvalidArgument) as err:
        CompileOptions(**kwargs).validate(num_adapters=1)
    assert err.value.field == field and err.value.value == value
    assert field in str(err.value) and repr(value) in str(err.value)


def test_fewer_slots_than_adapters_is_rejected():
    with pytest.raises(InvalidArgument, match=r"options.adapter_slots=1 .* number of adapters \(2\)"):
        CompileOptions(adapter_slots=1).validate(num_adapters=2)


def test_defaults_resolve_from_adapter_set_and_proto_zeros():
    opts = CompileOptions.from_proto_values(target="", batch_size=0, ctx_len=0, max_rank=0, adapter_slots=0,
                                            dtype="", target_modules=[], mxfp6_matmul=False)
    r = opts.validate(num_adapters=2).resolve(adapter_ranks=[4, 16],
                                              adapter_targets=[("v_proj", "q_proj"), ("down_proj",)])
    assert (r.target, r.batch_size, r.full_batch_size, r.prefill_seq_len, r.ctx_len) == ("onnxruntime", 1, 1, 32, 512)
    assert (r.max_rank, r.adapter_slots, r.dtype, r.num_cores) == (16, 4, "fp32", None)
    assert r.target_modules == ("q_proj", "v_proj", "down_proj")
    assert CompileOptions().resolve().max_rank == 8 and len(CompileOptions().resolve().target_modules) == 7
    assert CompileOptions(target="ai100").resolve().num_cores == 16
    assert CompileOptions.from_dict(r.to_dict()) == r
    json.dumps(r.to_dict())
    with pytest.raises(InvalidArgument, match="options.bogus"):
        CompileOptions.from_dict({"bogus": 1})


def _manifest(**kw) -> Manifest:
    base = dict(
        artifact_id="abc", compiler_version="v", created="2026-01-01T00:00:00Z",
        base_model=BaseModelInfo(source="/m", fingerprint="f" * 64, architecture="llama", config={"num_layers": 2}),
        options=CompileOptions().resolve().to_dict(),
        graph=GraphSpec(file="model.onnx", target="onnxruntime", dtype="float32", layers=2, num_kv_heads=2,
                        head_dim=16, vocab_size=384,
                        inputs=(TensorSpec("input_ids", "int64", ("B", "S")),),
                        outputs=(TensorSpec("logits", "float32", ("B", 1, 384)),),
                        lora_modules={"q_proj": LoraModuleSpec(64, 64)}),
        adapters=(AdapterEntry(slot=1, name="a", digest="d", r=4, lora_alpha=8.0, use_rslora=False,
                               target_modules=("q_proj",), path="adapters/a"),),
        tokenizer_dir="tokenizer", chat_template="{{x}}", generation_config={"eos_token_ids": [2]},
        files=(FileEntry("model.onnx", "0" * 64, 10),), specializations=({"batch_size": 1, "seq_len": 32},),
    )
    base.update(kw)
    return Manifest(**base)


def test_manifest_round_trip(tmp_path):
    m = _manifest()
    m.save(tmp_path)
    loaded = Manifest.load(tmp_path)
    assert loaded == m
    assert json.loads((tmp_path / "manifest.json").read_text())["graph"]["lora_modules"] == {
        "q_proj": {"in": 64, "out": 64}}
    assert loaded.adapter("a").slot == 1 and loaded.adapter("zz") is None
    assert loaded.max_rank == 8 and loaded.adapter_slots == 2
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["format_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(InvalidArgument, match="format_version 99"):
        Manifest.load(tmp_path)


def test_manifest_with_an_unknown_kv_layout_is_refused_and_an_old_one_means_time_major(tmp_path):
    _manifest().save(tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    del data["graph"]["kv_layout"]  # written before the fused graph existed
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    assert Manifest.load(tmp_path).graph.kv_layout == "time-major"
    data["graph"]["kv_layout"] = "paged"
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(InvalidArgument) as info:
        Manifest.load(tmp_path)
    assert info.value.field == "graph.kv_layout" and info.value.value == "paged"
    assert "recompile" in str(info.value)


def test_artifact_id_is_stable_across_processes_and_sensitive_to_every_input():
    opts = CompileOptions().resolve(adapter_ranks=[4], adapter_targets=[("q_proj",)]).to_dict()
    args = ("fp", ["d1", "d2"], opts, "v1")
    aid = compute_artifact_id(*args, adapter_names=["a", "b"])
    code = ("from loraflow.artifact.manifest import compute_artifact_id; from services.compiler.options import "
            "CompileOptions; o = CompileOptions().resolve(adapter_ranks=[4], adapter_targets=[('q_proj',)])"
            ".to_dict(); print(compute_artifact_id('fp', ['d1', 'd2'], o, 'v1', adapter_names=['a', 'b']))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == aid and len(aid) == 32
    variants = [
        compute_artifact_id("fp2", ["d1", "d2"], opts, "v1", adapter_names=["a", "b"]),
        compute_artifact_id("fp", ["d2", "d1"], opts, "v1", adapter_names=["a", "b"]),
        compute_artifact_id("fp", ["d1", "d2"], {**opts, "ctx_len": 1024}, "v1", adapter_names=["a", "b"]),
        compute_artifact_id("fp", ["d1", "d2"], opts, "v2", adapter_names=["a", "b"]),
        compute_artifact_id("fp", ["d1", "d2"], opts, "v1", adapter_names=["a", "c"]),
    ]
    assert len({aid, *variants}) == 6
