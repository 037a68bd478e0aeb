"""Class 5 of issue 20, gRPC side: an error echoing a hostile value stays within the trailer budget, so the
client gets the real status (INVALID_ARGUMENT naming the field) and not RESOURCE_EXHAUSTED from its own
8 KiB metadata limit. Every service's RPCs that echo a request value, on real servers."""

from __future__ import annotations

import grpc
import pytest

from loraflow.errors import MAX_MESSAGE_BYTES, InvalidArgument, clip_utf8
from loraflow.server.grpc_server import MAX_TRAILER_BYTES, error_info, status_for, trailer_bytes
from loraflow.v1 import (
    compiler_pb2,
    compiler_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    storage_pb2,
    storage_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)

EMOJI = "\U0001f600" * 900  # 3,600 bytes of UTF-8; 10,800 once percent-encoded in grpc-message
# What a bad value may honestly be (a base model that reads as a local path outside the allowed roots is
# PERMISSION_DENIED); RESOURCE_EXHAUSTED here would be the client's own trailer limit hiding the status.
CANONICAL_FOR_A_BAD_VALUE = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                             grpc.StatusCode.PERMISSION_DENIED}


def _calls(channel, service: str):
    jobs = jobs_pb2_grpc.JobServiceStub(channel)
    storage = storage_pb2_grpc.StorageServiceStub(channel)
    common = {
        "GetJob": lambda: jobs.GetJob(jobs_pb2.GetJobRequest(job_id=EMOJI), timeout=10),
        "CancelJob": lambda: jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id=EMOJI), timeout=10),
        "WatchJob": lambda: list(jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=EMOJI), timeout=10)),
        "ListJobs": lambda: jobs.ListJobs(jobs_pb2.ListJobsRequest(page_token=EMOJI), timeout=10),
        "GetDirectory": lambda: storage.GetDirectory(storage_pb2.GetDirectoryRequest(uri=EMOJI), timeout=10),
        "StatDirectory": lambda: storage.StatDirectory(storage_pb2.StatDirectoryRequest(
            kind=storage_pb2.DATA_KIND_MODEL, name=EMOJI), timeout=10),
    }
    if service == "trainer":
        trainer = trainer_pb2_grpc.TrainerServiceStub(channel)
        return {**common,
                "GetAdapter": lambda: trainer.GetAdapter(trainer_pb2.GetAdapterRequest(name=EMOJI), timeout=10),
                "DeleteAdapter": lambda: trainer.DeleteAdapter(trainer_pb2.DeleteAdapterRequest(name=EMOJI),
                                                               timeout=10),
                "SubmitTrainingJob": lambda: trainer.SubmitTrainingJob(trainer_pb2.SubmitTrainingJobRequest(
                    base_model=EMOJI, dataset_uri=EMOJI, adapter_name=EMOJI), timeout=10)}
    compiler = compiler_pb2_grpc.CompilerServiceStub(channel)
    return {**common,
            "GetArtifact": lambda: compiler.GetArtifact(compiler_pb2.GetArtifactRequest(artifact_id=EMOJI), timeout=10),
            "SubmitCompileJob": lambda: compiler.SubmitCompileJob(compiler_pb2.SubmitCompileJobRequest(
                base_model=EMOJI, adapters=[EMOJI]), timeout=10)}


@pytest.mark.parametrize("service", ["trainer", "compiler"])
def test_queue_services_answer_the_real_status_for_a_900_emoji_value(queue_stacks, service):
    for name, call in _calls(queue_stacks[service].channel, service).items():
        with pytest.raises(grpc.RpcError) as info:
            call()
        err = info.value
        assert err.code() in CANONICAL_FOR_A_BAD_VALUE, (name, err.code(), err.details()[:200])
        assert error_info(err) is not None and error_info(err).metadata.get("field"), name
        assert len(err.details().encode()) <= MAX_MESSAGE_BYTES, name


def test_inference_answers_the_real_status_for_a_900_emoji_value(inference_stack):
    stub = inference_pb2_grpc.InferenceServiceStub(inference_stack.channel)
    calls = {
        "LoadArtifact": lambda: stub.LoadArtifact(inference_pb2.LoadArtifactRequest(artifact_id=EMOJI), timeout=10),
        "UnloadModel": lambda: stub.UnloadModel(inference_pb2.UnloadModelRequest(model_id=EMOJI), timeout=10),
        "LoadAdapter": lambda: stub.LoadAdapter(inference_pb2.LoadAdapterRequest(model_id="m", adapter=EMOJI),
                                                timeout=10),
        "Generate": lambda: list(stub.Generate(inference_pb2.GenerateRequest(model_id="m", prompt="hi",
                                                                             adapter=EMOJI), timeout=10)),
        "Generate.request_id": lambda: list(stub.Generate(inference_pb2.GenerateRequest(
            model_id="m", prompt="hi", request_id=EMOJI), timeout=10)),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() in CANONICAL_FOR_A_BAD_VALUE, (name, info.value.code(), info.value.details()[:200])
        assert error_info(info.value).metadata.get("field"), name


def test_every_status_fits_the_trailer_budget_whatever_it_echoes():
    worst = InvalidArgument("\U0001f600" * 5000, field="\U0001f600" * 500, value="\U0001f600" * 5000,
                            metadata={f"k{i}": "\u00e9" * 1000 for i in range(20)})
    built = status_for(worst)
    proto = _status_proto_of(built)
    assert trailer_bytes(proto) <= MAX_TRAILER_BYTES
    assert proto.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    # Lone surrogates (a JSON "\ud800" reaching an error) are escaped, never a serialization failure.
    lone = status_for(InvalidArgument("bad \ud800 value", field="prompt", value="\ud800"))
    assert "\\ud800" in _status_proto_of(lone).message


def test_clipping_counts_bytes_and_keeps_whole_characters():
    text = "\u00e9" * 2000  # 4,000 bytes
    clipped = clip_utf8(text, 1024)
    assert len(clipped.encode()) <= 1024 and clipped.endswith("(4000 bytes)") and "\ufffd" not in clipped
    assert clip_utf8("short", 1024) == "short"


def _status_proto_of(status: grpc.Status):
    from google.rpc import status_pb2

    for key, value in status.trailing_metadata:
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError("no details in the status")
