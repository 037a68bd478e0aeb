"""Hostile inputs through the real TrainerService (real gRPC, real Redis, a file store): every local path a
request names must lie under the allowed roots, be a bounded regular file, and no error may carry a byte
of what was read. The marker planted in secret files must never come back in the status message, the
ErrorInfo or any trailing metadata."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import grpc
import pytest

from loraflow.jobs.registry import AdapterRecord
from loraflow.server.grpc_server import error_info
from loraflow.v1 import jobs_pb2, trainer_pb2
from services.trainer.dataset import MAX_DATASET_BYTES
from tests.trainer.conftest import TrainerStack, memorisable_lines

MARKER = "SECRET-MARKER-c0ffee42"


def _request(base_model, dataset, name="adder"):
    return trainer_pb2.SubmitTrainingJobRequest(
        base_model=str(base_model), dataset_uri=str(dataset), adapter_name=name,
        lora=trainer_pb2.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        training=trainer_pb2.TrainingConfig(max_steps=2, batch_size=4, max_seq_len=32))


def _everything_sent(err: grpc.RpcError) -> str:
    """The status message, the decoded ErrorInfo and every trailing metadata value (binary ones too)."""
    parts = [err.details() or ""]
    info = error_info(err)
    if info is not None:
        parts += [info.reason, *info.metadata.keys(), *info.metadata.values()]
    for key, value in err.trailing_metadata() or ():
        parts.append(key)
        parts.append(value.decode("latin-1") if isinstance(value, bytes) else value)
    return "\n".join(parts)


def _refused(call) -> tuple[grpc.StatusCode, str | None, str]:
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert time.monotonic() - start < 10, "a refusal must not hang"
    info = error_info(e.value)
    return e.value.code(), (info.metadata.get("field") if info else None), _everything_sent(e.value)


@pytest.fixture
def secrets(tmp_path_factory):
    """A directory OUTSIDE the allowed root (the session temp dir) with files holding MARKER."""
    import tempfile

    outside = Path(tempfile.mkdtemp(prefix="loraflow-outside-", dir="/var/tmp"))
    (outside / "secret.jsonl").write_text(json.dumps({"text": MARKER}) + "\n")
    (outside / "secret.txt").write_text(f"root:{MARKER}:19000:0:99999:7:::\n")
    yield outside
    for p in outside.iterdir():
        p.unlink()
    outside.rmdir()


def _first_line(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(200).split(b"\n")[0].split(b"\0")[0].decode("latin-1")
    except OSError:
        return ""


@pytest.mark.parametrize("dataset", ["/proc/self/environ", "/etc/shadow", "/proc/self/mem", "/dev/zero",
                                     "/etc/passwd", "/sys/kernel/notes"])
def test_host_files_are_permission_denied_and_never_echoed(stack, tiny_llama, dataset):
    code, field, sent = _refused(lambda: stack.trainer.SubmitTrainingJob(_request(tiny_llama, dataset)))
    assert code == grpc.StatusCode.PERMISSION_DENIED and field == "dataset_uri", sent
    first = _first_line(dataset)
    if len(first) >= 8:
        assert first not in sent


def test_files_outside_the_roots_are_denied_alike_whether_or_not_they_exist(stack, tiny_llama, secrets):
    sent = {}
    for name in ("secret.jsonl", "absent.jsonl"):  # same length, so even binary details must match byte for byte
        path = str(secrets / name)
        code, field, sent[name] = _refused(lambda path=path: stack.trainer.SubmitTrainingJob(_request(tiny_llama,
                                                                                                        path)))
        assert code == grpc.StatusCode.PERMISSION_DENIED and field == "dataset_uri"
        assert MARKER not in sent[name]
    assert sent["secret.jsonl"].replace("secret.jsonl", "X") == sent["absent.jsonl"].replace("absent.jsonl", "X")


def test_dotdot_and_symlinks_cannot_escape_the_root(stack, tiny_llama, secrets, tmp_path):
    (tmp_path / "link.jsonl").symlink_to(secrets / "secret.jsonl")
    (tmp_path / "model-link").symlink_to(secrets)
    depth = len(tmp_path.parts)
    dotdot = str(tmp_path) + "/.." * depth + str(secrets / "secret.jsonl")
    for base, data, want_field in ((tiny_llama, tmp_path / "link.jsonl", "dataset_uri"),
                                   (tiny_llama, dotdot, "dataset_uri"),
                                   (tiny_llama, f"file://{tmp_path / 'link.jsonl'}", "dataset_uri"),
                                   (tmp_path / "model-link", tmp_path / "link.jsonl", "base_model"),
                                   (f"{tmp_path}/../../../../../../etc", tmp_path / "link.jsonl", "base_model")):
        code, field, sent = _refused(lambda b=base, d=data: stack.trainer.SubmitTrainingJob(_request(b, d)))
        assert code == grpc.StatusCode.PERMISSION_DENIED and field == want_field, sent
        assert MARKER not in sent


def test_a_fifo_under_the_root_is_invalid_and_does_not_hang(stack, tiny_llama, tmp_path):
    os.mkfifo(tmp_path / "pipe.jsonl")
    code, field, sent = _refused(lambda: stack.trainer.SubmitTrainingJob(_request(tiny_llama,
                                                                                   tmp_path / "pipe.jsonl")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and field == "dataset_uri" and "FIFO" in sent


def test_an_oversized_dataset_is_refused_before_it_is_read(stack, tiny_llama, tmp_path):
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as f:
        f.truncate(MAX_DATASET_BYTES + 1)  # sparse: no disk used
    code, field, sent = _refused(lambda: stack.trainer.SubmitTrainingJob(_request(tiny_llama, big)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and field == "dataset_uri"
    assert str(MAX_DATASET_BYTES) in sent


@pytest.mark.parametrize("content, field_part", [
    (f"{MARKER}\n", "dataset line 1: json"),
    (json.dumps({MARKER: "x"}) + "\n", "dataset line 1: keys"),
    (json.dumps({"messages": [{"role": MARKER, "content": "c"}]}) + "\n", "dataset line 1: messages[0].role"),
    (json.dumps({"messages": [{"role": "user", "content": "c", MARKER: 1}]}) + "\n", "dataset line 1: messages[0]"),
    (json.dumps({"text": "ok"}) + "\n" + json.dumps([MARKER]) + "\n", "dataset line 2: json"),
])
def test_dataset_errors_name_line_and_field_but_never_quote_the_file(stack, tiny_llama, tmp_path, content,
                                                                      field_part):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    code, field, sent = _refused(lambda: stack.trainer.SubmitTrainingJob(_request(tiny_llama, path)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and field == field_part, sent
    assert MARKER not in sent


def test_a_model_config_linked_out_of_its_directory_is_refused(stack, tiny_llama, tmp_path, secrets, dataset_file):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").symlink_to(secrets / "secret.txt")
    code, field, sent = _refused(lambda: stack.trainer.SubmitTrainingJob(_request(model, dataset_file)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and field == "base_model" and "config.json" in sent, sent
    assert MARKER not in sent
    (model / "config.json").unlink()
    (model / "config.json").write_text(f"{{{MARKER}")  # not JSON: the error names the file, not its bytes
    code, field, sent = _refused(lambda: stack.trainer.SubmitTrainingJob(_request(model, dataset_file)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and field == "base_model" and MARKER not in sent, sent


def test_s3_inputs_from_another_bucket_are_denied(stack, tiny_llama, dataset_file):
    code, field, _ = _refused(lambda: stack.trainer.SubmitTrainingJob(
        _request(tiny_llama, "s3://someone-elses-bucket/data.jsonl")))
    assert code == grpc.StatusCode.PERMISSION_DENIED and field == "dataset_uri"
    code, field, _ = _refused(lambda: stack.trainer.SubmitTrainingJob(
        _request("s3://someone-elses-bucket/model", dataset_file)))
    assert code == grpc.StatusCode.PERMISSION_DENIED and field == "base_model"


def test_a_service_without_roots_reads_no_local_path_and_says_which_flag(redis_url, tmp_path, tiny_llama,
                                                                          dataset_file):
    bare = TrainerStack(redis_url, tmp_path)  # a standalone service's default: no --allow-local-paths
    try:
        code, field, sent = _refused(lambda: bare.trainer.SubmitTrainingJob(_request(tiny_llama, dataset_file)))
        assert code == grpc.StatusCode.PERMISSION_DENIED and field == "base_model"
        assert "--allow-local-paths" in sent and "LORAFLOW_ALLOW_LOCAL_PATHS" in sent
    finally:
        bare.close()


def test_the_worker_rechecks_a_planted_job_payload(stack, secrets, tmp_path):
    """A job put straight into Redis (bypassing the API) naming a model outside the roots fails, unread."""
    (secrets / "config.json").write_text(json.dumps({"model_type": "llama", "note": MARKER}))
    key = stack.store.put_bytes("datasets/planted.jsonl", "\n".join(memorisable_lines(4)).encode())
    assert key
    lora = {"r": 4, "lora_alpha": 8.0, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0, "bias": "none",
            "use_rslora": False}
    from services.trainer.training import TrainingSettings

    job = stack.queue.submit({"adapter_name": "planted", "base_model": str(secrets), "dataset_uri": "x",
                              "dataset_key": "datasets/planted.jsonl", "dataset_records": 4, "model_type": "llama",
                              "lora": lora, "training": TrainingSettings(max_steps=1).to_dict()})
    stack.start_worker()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        got = stack.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.id))
        if got.state in (jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_SUCCEEDED):
            break
        time.sleep(0.1)
    assert got.state == jobs_pb2.JOB_STATE_FAILED, got
    assert "not under a directory this service allows" in got.error and MARKER not in got.error, got.error
    (secrets / "config.json").unlink()


def test_delete_adapter_never_leaves_the_store_whatever_redis_says(stack, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    (stack.store_dir / "adapters").mkdir(parents=True)
    (stack.store_dir / "adapters" / "linked").symlink_to(victim)
    for name, uri in (("planted", str(victim)), ("planted-uri", victim.as_uri()),
                      ("planted-dotdot", f"{stack.store_dir}/adapters/../../victim"),
                      ("planted-link", str(stack.store_dir / "adapters" / "linked")),
                      ("planted-root", stack.store.uri(""))):
        stack.registry.put_adapter(AdapterRecord(name=name, uri=uri, base_model="m"))
        code, field, sent = _refused(lambda n=name: stack.trainer.DeleteAdapter(trainer_pb2.DeleteAdapterRequest(
            name=n)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and field == "name", sent
        assert (victim / "precious.txt").read_text() == "keep me"
        assert stack.registry.find_adapter(name) is not None  # nothing deleted, not even the record
