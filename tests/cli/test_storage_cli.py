"""`loraflow models|adapters|datasets push|pull`, and `train`/`compile` given local paths, against real
trainer and compiler APIs that — like services in containers — may read no host path at all: the only
way in is the StorageService upload. Real gRPC servers with token auth, real Redis, a real file store."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from loraflow import errors
from loraflow.client import Client
from loraflow.jobs.job_service import SERVICE_NAME as JOB_SERVICE_NAME
from loraflow.jobs.job_service import add_job_service
from loraflow.jobs.queue import JobQueue
from loraflow.jobs.registry import Registry
from loraflow.security.settings import SecuritySettings
from loraflow.server.grpc_server import GrpcServer
from loraflow.storage.model_source import InputPolicy
from loraflow.storage.storage_service import SERVICE_NAME as STORAGE_SERVICE_NAME
from loraflow.storage.storage_service import add_storage_service
from loraflow.storage.store import open_store

TOKEN = "cli-storage-token-0123456789abc"


@dataclass
class Remote:
    trainer: str
    compiler: str
    train_queue: JobQueue
    compile_queue: JobQueue
    store: object
    registry: Registry


def _start(host: str, redis_url: str, tmp_path: Path, allow_unauthenticated: bool = False):
    """Trainer and compiler APIs wired as `python -m services.<name> api` wires them (StorageService included),
    on one shared store, with an InputPolicy that allows no local path."""
    from loraflow.v1 import compiler_pb2, compiler_pb2_grpc, trainer_pb2_grpc
    from services.compiler.inputs import CompileInputs
    from services.compiler.server import CompilerServiceServicer
    from services.trainer.server import SERVICE_NAME as TRAINER_NAME
    from services.trainer.server import TrainerServiceServicer

    tokens = tmp_path / "tokens"
    tokens.write_text(f"cli:{TOKEN}\n")
    os.chmod(tokens, 0o600)
    security = SecuritySettings(auth_tokens_file=str(tokens))
    client = redis.Redis.from_url(redis_url)
    registry = Registry(client)
    store = open_store((tmp_path / "store").as_uri())
    no_paths = InputPolicy()
    train_queue, compile_queue = JobQueue(client, "train"), JobQueue(client, "compile")
    trainer = GrpcServer(f"{host}:0", [TRAINER_NAME, JOB_SERVICE_NAME, STORAGE_SERVICE_NAME], security=security)
    trainer.add(trainer_pb2_grpc.add_TrainerServiceServicer_to_server,
                TrainerServiceServicer(train_queue, registry, store, inputs=no_paths))
    add_job_service(trainer, {"train": train_queue})
    add_storage_service(trainer, store, tmp_path / "tcache")
    compiler_name = compiler_pb2.DESCRIPTOR.services_by_name["CompilerService"].full_name
    compiler = GrpcServer(f"{host}:0", [compiler_name, JOB_SERVICE_NAME, STORAGE_SERVICE_NAME], security=security)
    compiler.add(compiler_pb2_grpc.add_CompilerServiceServicer_to_server,
                 CompilerServiceServicer(compile_queue, registry, store,
                                         CompileInputs(store, registry, tmp_path / "ccache", policy=no_paths)))
    add_job_service(compiler, {"compile": compile_queue})
    add_storage_service(compiler, store, tmp_path / "ccache2")
    trainer.start()
    compiler.start()
    remote = Remote(trainer.address, compiler.address, train_queue, compile_queue, store, registry)

    def stop():
        trainer.stop(0).wait(5)
        compiler.stop(0).wait(5)
        client.close()

    return remote, stop


@pytest.fixture
def remote(redis_url, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLOW_TOKEN", TOKEN)
    stack, stop = _start("127.0.0.1", redis_url, tmp_path)
    yield stack
    stop()


@pytest.fixture
def workdir(tmp_path, tiny_llama, tiny_dataset, monkeypatch):
    """A working directory holding ./model, ./data.jsonl and ./peft-dir, as a user's would."""
    from tests.compiler.conftest import save_peft_adapter

    work = tmp_path / "work"
    work.mkdir()
    (work / "model").symlink_to(tiny_llama, target_is_directory=True)
    (work / "data.jsonl").write_bytes(tiny_dataset.read_bytes())
    save_peft_adapter(tiny_llama, work / "peft-dir", r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"))
    monkeypatch.chdir(work)
    return work


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("flag", ["--upload", None])
def test_train_with_local_paths_uploads_them_for_a_service_that_sees_no_host_path(remote, workdir, cli, flag):
    """On loopback the paths go first; a service that refuses them (a container's trainer: PERMISSION_DENIED
    for a host path) gets them pushed and the request again, with no flag. --no-upload keeps the refusal."""
    code, _, err = cli("train", "./model", "./data.jsonl", "--name", "plain", "--steps", "1", "--no-upload",
                       "-o", "json", trainer=remote.trainer, compiler=remote.compiler)
    assert code == 1 and "PERMISSION_DENIED" in err

    code, out, err = cli("train", "./model", "./data.jsonl", "--name", "uploaded", "--steps", "1",
                         *([flag] if flag else []), "-o", "json", trainer=remote.trainer, compiler=remote.compiler)
    assert code == 0, err
    job = json.loads(out)
    payload = remote.train_queue.get(job["id"]).payload
    assert payload["base_model"].startswith(remote.store.uri("uploads/models/model/"))
    assert payload["dataset_uri"].startswith(remote.store.uri("uploads/datasets/data.jsonl/"))
    assert payload["dataset_uri"].endswith("/data.jsonl")
    said = err.replace("\n", "")
    assert f"uploaded model -> {payload['base_model']}" in said
    assert f"uploaded data.jsonl -> {payload['dataset_uri']}" in said
    # The refused first send created no job: exactly one, the one that names the pushed copies.
    assert [j.id for j in remote.train_queue.list()[0]] == [job["id"]]


@pytest.mark.parametrize("flag", ["--upload", None])
def test_compile_with_a_local_model_and_peft_dir_uploads_both(remote, workdir, cli, flag):
    code, out, err = cli("compile", "./model", "--adapters", "./peft-dir", "--ctx-len", "32", "--prefill-seq-len",
                         "8", *([flag] if flag else []), "-o", "json", trainer=remote.trainer,
                         compiler=remote.compiler)
    assert code == 0, err
    payload = remote.compile_queue.get(json.loads(out)["id"]).payload
    assert payload["base_model"].startswith(remote.store.uri("uploads/models/model/"))
    assert [a.split("/uploads/")[1].split("/")[:2] for a in payload["adapters"]] == [["adapters", "peft-dir"]]
    adapter_key = remote.store.key_of(payload["adapters"][0])
    assert remote.store.dir_exists(adapter_key)
    assert remote.store.get_bytes(adapter_key + "/adapter_config.json") == \
        (workdir / "peft-dir" / "adapter_config.json").read_bytes()


def test_push_and_pull_commands_round_trip(remote, workdir, cli, cli_json):
    addresses = {"trainer": remote.trainer, "compiler": remote.compiler}
    first = cli_json("models", "push", "./model", "--name", "tiny", **addresses)
    assert first["uploaded_files"] == first["files"] > 0 and not first["already_published"]
    again = cli_json("models", "push", "./model", "--name", "tiny", "--service", "compiler", **addresses)
    assert again["uri"] == first["uri"] and again["uploaded_files"] == 0 and again["already_published"]

    pulled = cli_json("models", "pull", first["uri"], str(workdir / "model-copy"), **addresses)
    assert pulled["files"] == first["files"]
    assert _files(workdir / "model-copy") == _files(workdir / "model")

    adapter = cli_json("adapters", "push", "./peft-dir", **addresses)
    assert adapter["name"] == "peft-dir" and "/uploads/adapters/peft-dir/" in adapter["uri"]
    cli_json("adapters", "pull", adapter["uri"], str(workdir / "peft-copy"), **addresses)
    assert _files(workdir / "peft-copy") == _files(workdir / "peft-dir")
    # A trained adapter, by its registered name (published where the trainer worker publishes).
    from loraflow.jobs.registry import AdapterRecord
    from loraflow.storage.store import adapter_key

    trained_uri = remote.store.publish_dir(adapter_key("badge", "train-1", 1), workdir / "peft-dir")
    remote.registry.put_adapter(AdapterRecord(name="badge", uri=trained_uri, base_model="m"))
    by_name = cli_json("adapters", "pull", "badge", str(workdir / "badge"), **addresses)
    assert by_name["uri"] == trained_uri and _files(workdir / "badge") == _files(workdir / "peft-dir")

    dataset = cli_json("datasets", "push", "./data.jsonl", "--name", "reverse", **addresses)
    assert dataset["target"] == dataset["file_uri"] == dataset["uri"] + "/data.jsonl"
    assert "/uploads/datasets/reverse/" in dataset["uri"]
    code, out, err = cli("models", "push", "./model", "--name", "tiny", **addresses)
    assert code == 0 and "already published, nothing sent" in out and first["uri"] in err.replace("\n", "")

    code, _, err = cli("models", "push", "./data.jsonl", "-o", "json", **addresses)
    assert code == 1 and json.loads(err)["error"]["field"] == "path"


def _non_loopback_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip


def test_the_client_uploads_by_itself_when_the_service_is_remote(redis_url, tmp_path, tiny_llama, tiny_dataset):
    ip = _non_loopback_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address to serve on")
    stack, stop = _start(ip, redis_url, tmp_path)
    seen = []
    client = Client(trainer=stack.trainer, compiler=stack.compiler, token=TOKEN, timeout=30, progress=False,
                    on_upload=seen.append)
    try:
        job = client.train(str(tiny_llama), str(tiny_dataset), "auto", steps=1)
        payload = stack.train_queue.get(job.id).payload
        assert [r.kind for r in seen] == ["model", "dataset"]
        assert payload["base_model"] == seen[0].target and payload["dataset_uri"] == seen[1].target
        with pytest.raises(errors.PermissionDenied) as err:  # told not to upload: the service refuses host paths
            client.train(str(tiny_llama), str(tiny_dataset), "never", steps=1, upload=False)
        assert err.value.field == "base_model"
        assert len(seen) == 2
    finally:
        client.close()
        stop()
