"""TrainerService.RegisterAdapter against real servers: a PEFT adapter trained elsewhere is registered (checked
as LoadAdapter checks it, copied into the store) and a Generate on a running inference model naming it loads it
on first use; then the hostile cases, each refused with its status and field and leaving nothing behind.

Real parts: the trainer API (TrainerService + StorageService) and the inference API as gRPC servers on loopback
with bearer-token auth, one real Redis registry and one file store."""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis

from loraflow.client import Client
from loraflow.errors import AlreadyExists
from loraflow.jobs.queue import JobQueue
from loraflow.jobs.registry import AdapterRecord, ArtifactRecord, Registry
from loraflow.jobs.registry_rebuild import rebuild_registry
from loraflow.security.settings import SecuritySettings
from loraflow.server.grpc_server import GrpcServer
from loraflow.storage.storage_service import SERVICE_NAME as STORAGE_SERVICE_NAME
from loraflow.storage.storage_service import add_storage_service
from loraflow.storage.store import artifact_key, open_store
from loraflow.v1 import inference_pb2 as ipb
from loraflow.v1 import inference_pb2_grpc, trainer_pb2_grpc
from loraflow.v1 import trainer_pb2 as tpb
from tests.inference.conftest import PROMPTS

TOKEN = "register-test-token-0123456789abcdef"


@dataclass
class Stack:
    trainer: tpb  # the TrainerService stub
    inference: object  # the InferenceService stub
    trainer_address: str
    store: object
    registry: Registry
    train_queue: JobQueue
    base: str  # the base model, as the artifact's compile named it
    model_id: str
    trainer_channel: grpc.Channel
    auth: tuple


@pytest.fixture(scope="module")
def stack(tiny_artifact, redis_server, tmp_path_factory, allowed_root):
    from loraflow.security.local_paths import LocalPathPolicy
    from loraflow.storage.model_source import InputPolicy
    from services.inference.model_manager import ModelManager
    from services.inference.server import SERVICE_NAME as INFERENCE_NAME
    from services.inference.server import InferenceServicer
    from services.trainer.server import SERVICE_NAME as TRAINER_NAME
    from services.trainer.server import TrainerServiceServicer

    artifact_dir, manifest = tiny_artifact
    root = tmp_path_factory.mktemp("register")
    tokens = root / "tokens"
    tokens.write_text(f"tester:{TOKEN}\n")
    os.chmod(tokens, 0o600)
    security = SecuritySettings(auth_tokens_file=str(tokens))
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    registry = Registry(client)
    store = open_store((root / "store").as_uri())
    registry.put_artifact(ArtifactRecord(artifact_id=manifest.artifact_id, base_model=manifest.base_model.source,
                                         uri=store.publish_dir(artifact_key(manifest.artifact_id), artifact_dir)))
    policy = InputPolicy(LocalPathPolicy((allowed_root,)))
    train_queue = JobQueue(client, "train")
    trainer = GrpcServer("127.0.0.1:0", [TRAINER_NAME, STORAGE_SERVICE_NAME], security=security)
    trainer.add(trainer_pb2_grpc.add_TrainerServiceServicer_to_server,
                TrainerServiceServicer(train_queue, registry, store, inputs=policy))
    add_storage_service(trainer, store, root / "uploads")
    inference = GrpcServer("127.0.0.1:0", [INFERENCE_NAME], security=security)
    manager = ModelManager(store=store, registry=registry, cache_dir=root / "cache", inputs=policy)
    inference.add(inference_pb2_grpc.add_InferenceServiceServicer_to_server, InferenceServicer(manager))
    trainer.start()
    inference.start()
    auth = (("authorization", f"Bearer {TOKEN}"),)
    tchan, ichan = grpc.insecure_channel(trainer.address), grpc.insecure_channel(inference.address)
    istub = inference_pb2_grpc.InferenceServiceStub(ichan)
    model = istub.LoadArtifact(ipb.LoadArtifactRequest(artifact_id=manifest.artifact_id, num_threads=1),
                               metadata=auth)
    yield Stack(trainer_pb2_grpc.TrainerServiceStub(tchan), istub, trainer.address, store, registry, train_queue,
                manifest.base_model.source, model.model_id, tchan, auth)
    tchan.close()
    ichan.close()
    trainer.stop(0).wait(5)
    inference.stop(0).wait(5)
    manager.close()
    client.close()


def register(stack: Stack, name: str, uri: str | Path, base: str | None = None) -> tpb.RegisterAdapterResponse:
    return stack.trainer.RegisterAdapter(tpb.RegisterAdapterRequest(name=name, uri=str(uri),
                                                                    base_model=base or stack.base),
                                         metadata=stack.auth)


def refused(call, label: str = "") -> tuple[grpc.StatusCode, str, str]:
    """(code, message, field) of a failed call."""
    from grpc_status import rpc_status

    from loraflow.client import error_from_rpc

    with pytest.raises(grpc.RpcError) as err:
        call()
        pytest.fail(f"{label}: accepted")
    assert rpc_status.from_call(err.value) is not None
    exc = error_from_rpc(err.value)
    return err.value.code(), err.value.details(), exc.field


def generate(stack: Stack, adapter: str, prompt: str = PROMPTS[1], n: int = 8) -> list[int]:
    chunks = stack.inference.Generate(ipb.GenerateRequest(model_id=stack.model_id, prompt=prompt, adapter=adapter,
                                                          sampling=ipb.SamplingParams(max_new_tokens=n)),
                                      metadata=stack.auth)
    return [t for c in chunks for t in c.token_ids]


def copy_adapter(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def registered_dirs(stack: Stack, name: str) -> list[str]:
    return stack.store.list_dirs(f"adapters/{name}")


def test_a_registered_adapter_is_served_by_name_on_first_use(stack, tiny_adapters, tiny_tokenizer, peft_reference,
                                                             tmp_path):
    # Trained elsewhere: a plain PEFT directory the services have never seen, under a name of our choosing.
    source = copy_adapter(tiny_adapters["hot"], tmp_path / "from-elsewhere")
    with pytest.raises(grpc.RpcError) as unknown:
        generate(stack, "imported-hot")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    first = register(stack, "imported-hot", source)
    adapter = first.adapter
    assert not first.already_registered
    assert adapter.name == "imported-hot" and adapter.base_model == stack.base and adapter.job_id == ""
    assert adapter.uri.startswith(stack.store.uri("adapters/imported-hot/registered."))
    assert adapter.lora.r == 6 and list(adapter.lora.target_modules) == ["q_proj", "up_proj", "down_proj"]
    assert not adapter.lora.use_rslora and adapter.lora.lora_alpha == 12
    key = stack.store.key_of(adapter.uri)
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # the bytes were copied, not referenced
        assert stack.store.get_bytes(f"{key}/{name}") == (source / name).read_bytes()
    assert adapter.digest == stack.store.read_manifest(key)["files"]["adapter_model.safetensors"]["sha256"]
    shutil.rmtree(source)  # the registration never depends on where the files came from

    expected = peft_reference.generate(tiny_tokenizer.encode(PROMPTS[1]), "hot", 8)
    assert generate(stack, "imported-hot") == expected
    model = stack.inference.ListModels(ipb.ListModelsRequest(), metadata=stack.auth).models[0]
    assert "imported-hot" in [a.name for a in model.adapters]
    assert stack.trainer.GetAdapter(tpb.GetAdapterRequest(name="imported-hot"), metadata=stack.auth) == adapter

    # The operators' rebuild after a Redis loss restores it as it was registered (no job, same base, same digest).
    stack.registry.delete_adapter("imported-hot")
    report = {(e.kind, e.name): e.status for e in rebuild_registry(stack.store, stack.registry)}
    assert report[("adapter", "imported-hot")] == "restored"
    restored = stack.registry.get_adapter("imported-hot")
    assert (restored.uri, restored.base_model, restored.job_id, restored.digest) == \
        (adapter.uri, stack.base, "", adapter.digest)
    assert restored.lora["target_modules"] == ["q_proj", "up_proj", "down_proj"]

    # DeleteAdapter removes it from the registry and the store, like a trained one.
    stack.trainer.DeleteAdapter(tpb.DeleteAdapterRequest(name="imported-hot"), metadata=stack.auth)
    assert registered_dirs(stack, "imported-hot") == []


def test_identical_registration_is_idempotent_and_a_conflicting_one_already_exists(stack, tiny_adapters, tmp_path):
    a, b = tiny_adapters["alpha"], tiny_adapters["gamma"]
    first = register(stack, "twice", a)
    again = register(stack, "twice", copy_adapter(a, tmp_path / "same-bytes-elsewhere"))
    assert again.already_registered and again.adapter == first.adapter
    assert registered_dirs(stack, "twice") == [stack.store.key_of(first.adapter.uri)]

    # The same files pushed through StorageService (what the CLI does for a remote trainer) are the same too.
    with Client(trainer=stack.trainer_address, token=TOKEN, timeout=30) as client:
        pushed = client.push("adapter", a).target
        assert client.register_adapter("twice", pushed, stack.base, upload=False).already_registered

        # Other files under the name; or the same files for a base model named otherwise (its pushed copy).
        for other_files, other_base in ((b, stack.base), (a, client.push("model", stack.base).target)):
            with pytest.raises(AlreadyExists) as err:
                client.register_adapter("twice", other_files, other_base, upload=False)
            assert err.value.field == "name" and "already registered" in err.value.message
    assert registered_dirs(stack, "twice") == [stack.store.key_of(first.adapter.uri)]  # no copy left behind
    assert stack.registry.get_adapter("twice").uri == first.adapter.uri

    # A trained adapter's name, and a name a queued training job holds, are taken before any file is read.
    stack.registry.put_adapter(AdapterRecord(name="trained", uri=stack.store.uri("adapters/trained/j1-a1"),
                                             base_model=stack.base, job_id="j1"))
    code, message, field = refused(lambda: register(stack, "trained", a))
    assert (code, field) == (grpc.StatusCode.ALREADY_EXISTS, "name") and "job j1" in message
    from services.trainer.server import NAME_RESERVATIONS_KEY

    job = stack.train_queue.submit({"adapter_name": "in-training"})
    stack.train_queue.redis.hset(NAME_RESERVATIONS_KEY, "in-training", job.id)
    code, message, field = refused(lambda: register(stack, "in-training", a))
    assert (code, field) == (grpc.StatusCode.ALREADY_EXISTS, "name") and job.id in message
    assert registered_dirs(stack, "trained") == [] and registered_dirs(stack, "in-training") == []


def _config(path: Path, **changes) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path))


def test_hostile_registrations_are_refused_with_their_field_and_leave_nothing(stack, tiny_adapters, tmp_path,
                                                                               tiny_llama, monkeypatch):
    good = tiny_adapters["alpha"]
    cases: list[tuple[str, object, grpc.StatusCode, str, str]] = []  # (label, call, code, field, text)

    def case(label, call, code, field, text=""):
        cases.append((label, call, code, field, text))

    case("bad name", lambda: register(stack, "../escape", good), grpc.StatusCode.INVALID_ARGUMENT, "name")
    case("a name, not a directory", lambda: register(stack, "alias", "alpha"), grpc.StatusCode.INVALID_ARGUMENT,
         "uri", "PEFT adapter directory")
    case("outside the allowed roots", lambda: register(stack, "etc", "/etc"), grpc.StatusCode.PERMISSION_DENIED,
         "uri")
    case("base outside the allowed roots", lambda: register(stack, "etc-base", good, "/usr/lib"),
         grpc.StatusCode.PERMISSION_DENIED, "base_model")
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    case("no base config.json", lambda: register(stack, "nobase", good, str(no_config)),
         grpc.StatusCode.INVALID_ARGUMENT, "base_model", "config.json")
    case("not a PEFT dir", lambda: register(stack, "empty", no_config), grpc.StatusCode.INVALID_ARGUMENT, "uri",
         "adapter_config.json")

    outside = tmp_path / "secret"  # a regular file, but outside the adapter directory
    outside.write_bytes(b"secret")
    linked = copy_adapter(good, tmp_path / "linked")
    (linked / "adapter_model.safetensors").unlink()
    (linked / "adapter_model.safetensors").symlink_to(outside)
    case("weights linked out of the dir", lambda: register(stack, "linked", linked),
         grpc.StatusCode.INVALID_ARGUMENT, "uri", "symlink")

    prefix = copy_adapter(good, tmp_path / "prefix")
    _config(prefix, peft_type="PREFIX_TUNING")
    case("not LoRA", lambda: register(stack, "prefix", prefix), grpc.StatusCode.INVALID_ARGUMENT, "peft_type")
    dora = copy_adapter(good, tmp_path / "dora")
    _config(dora, use_dora=True)
    case("DoRA", lambda: register(stack, "dora", dora), grpc.StatusCode.INVALID_ARGUMENT, "use_dora")

    truncated = copy_adapter(good, tmp_path / "truncated")
    (truncated / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    case("corrupt safetensors", lambda: register(stack, "truncated", truncated), grpc.StatusCode.INVALID_ARGUMENT,
         "weights", "header")

    nan = copy_adapter(good, tmp_path / "nan")
    hidden = 64
    _write_safetensors(nan / "adapter_model.safetensors", {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.full((4, hidden), np.nan),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((hidden, 4))})
    _config(nan, r=4, target_modules=["q_proj"])
    case("NaN weights", lambda: register(stack, "nan", nan), grpc.StatusCode.INVALID_ARGUMENT, "weights", "NaN")

    # Trained for another model: the base named in the same request says the shapes differ.
    wider = copy_adapter(good, tmp_path / "wider")
    _write_safetensors(wider / "adapter_model.safetensors", {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((4, hidden * 2)),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((hidden, 4))})
    _config(wider, r=4, target_modules=["q_proj"])
    case("another hidden size", lambda: register(stack, "wider", wider), grpc.StatusCode.INVALID_ARGUMENT,
         "q_proj.shape", "does not fit base_model")
    deeper = copy_adapter(good, tmp_path / "deeper")
    _write_safetensors(deeper / "adapter_model.safetensors", {
        "base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight": np.ones((4, hidden)),
        "base_model.model.model.layers.5.self_attn.q_proj.lora_B.weight": np.ones((hidden, 4))})
    _config(deeper, r=4, target_modules=["q_proj"])
    case("more layers than the base", lambda: register(stack, "deeper", deeper), grpc.StatusCode.INVALID_ARGUMENT,
         "layers", "2 layers")

    case("a bucket not allowed", lambda: register(stack, "s3", "s3://someone-elses-bucket/adapters/x"),
         grpc.StatusCode.PERMISSION_DENIED, "uri")

    for label, call, code, field, text in cases:
        got_code, message, got_field = refused(call, label)
        assert (got_code, got_field) == (code, field), f"{label}: {got_code} {got_field}: {message}"
        assert text in message, f"{label}: {message!r}"
        assert "loraflow-register-" not in message, f"{label}: names the service's private copy: {message}"

    # Too large to check in the API process: refused from the size alone.
    from services.trainer import adapter_registration

    monkeypatch.setattr(adapter_registration, "MAX_WEIGHTS_BYTES", 1000)
    code, message, field = refused(lambda: register(stack, "large", good))
    assert (code, field) == (grpc.StatusCode.INVALID_ARGUMENT, "uri") and "1000 bytes" in message

    # Without a token nothing is looked at.
    with pytest.raises(grpc.RpcError) as err:
        stack.trainer.RegisterAdapter(tpb.RegisterAdapterRequest(name="anon", uri=str(good), base_model=stack.base))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        stack.trainer.RegisterAdapter(tpb.RegisterAdapterRequest(name="anon", uri=str(good), base_model=stack.base),
                                      metadata=(("authorization", "Bearer not-the-token-0123456789"),))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    for name in ("escape", "alias", "etc", "etc-base", "nobase", "empty", "linked", "prefix", "dora", "truncated",
                 "nan", "wider", "deeper", "s3", "large", "anon"):  # nothing refused reached the store
        assert registered_dirs(stack, name) == [] and stack.registry.find_adapter(name) is None
