"""JSON output shapes: proto field names, defaults present, enums by name, int64 as numbers."""

from __future__ import annotations

from loraflow import errors
from loraflow.client import make_generate_request
from loraflow.console import formatting as fmt
from loraflow.v1 import compiler_pb2, inference_pb2, jobs_pb2


def test_to_dict_keeps_every_field_and_numbers():
    artifact = compiler_pb2.Artifact(artifact_id="abc", size_bytes=12_345_678_901,
                                     adapters=[compiler_pb2.ArtifactAdapter(slot=1, name="a", r=8)])
    data = fmt.to_dict(artifact)
    assert data["size_bytes"] == 12_345_678_901  # protobuf's JSON would quote int64
    assert data["adapters"] == [{"slot": 1, "name": "a", "digest": "", "r": 8}]
    assert data["options"]["ctx_len"] is None and data["base_model"] == ""  # optional, unset
    assert fmt.to_dict(compiler_pb2.CompileOptions(ctx_len=0))["ctx_len"] == 0
    event = jobs_pb2.JobEvent(job_id="train-1", seq=7, state=jobs_pb2.JOB_STATE_RUNNING, metrics={"loss": 0.5})
    data = fmt.to_dict(event)
    assert data["seq"] == 7 and data["state"] == "JOB_STATE_RUNNING" and data["metrics"] == {"loss": 0.5}
    model = inference_pb2.Model(model_id="m", memory_bytes=3 << 30)
    assert fmt.to_dict(model)["memory_bytes"] == 3 << 30


def test_error_dict_names_code_field_and_value():
    exc = errors.InvalidArgument("lora.r must be > 0, got 0", field="lora.r", value=0)
    detail = fmt.error_dict(exc)["error"]
    assert detail == {"code": "INVALID_ARGUMENT", "message": "lora.r must be > 0, got 0",
                      "reason": "INVALID_ARGUMENT", "field": "lora.r", "value": "0",
                      "metadata": {"field": "lora.r", "value": "0"}}
    other = errors.LoraflowError("slow")
    other.code = "DEADLINE_EXCEEDED"
    assert fmt.error_dict(other)["error"]["code"] == "DEADLINE_EXCEEDED"


def test_generate_request_from_text_tokens_and_sampling():
    req = make_generate_request("hi", "m1", "a", True, max_new_tokens=5, stop=["\n"], seed=3)
    assert req.prompt == "hi" and req.chat and req.adapter == "a"
    assert req.sampling.max_new_tokens == 5 and list(req.sampling.stop) == ["\n"] and req.sampling.seed == 3
    req = make_generate_request([1, 2, 3], "m1")
    assert req.WhichOneof("input") == "prompt_token_ids" and list(req.prompt_token_ids.ids) == [1, 2, 3]
    try:
        make_generate_request("hi", "m1", temprature=0.5)
    except errors.InvalidArgument as exc:
        assert exc.field == "sampling.temprature"
    else:
        raise AssertionError("a misspelt sampling parameter must be refused")


def test_to_dict_fills_unset_submessages_and_keeps_oneof_sides_apart():
    data = fmt.to_dict(compiler_pb2.Artifact(artifact_id="abc"))
    assert data["create_time"] is None and data["options"]["target"] == ""
    job = jobs_pb2.Job(id="compile-1", compile_result=jobs_pb2.CompileResult(artifact_id="x", cache_hit=True))
    data = fmt.to_dict(job)
    assert data["compile_result"] == {"artifact_id": "x", "artifact_uri": "", "cache_hit": True}
    assert "train_result" not in data and data["start_time"] is None
