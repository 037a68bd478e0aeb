"""Real servers on loopback for the hardening tests: the inference gRPC and HTTP APIs on a tiny model (no
adapters, ctx 64), and the trainer and compiler APIs (their service, JobService and StorageService) on a
real Redis and a file store, as their processes assemble them, without workers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis

from loraflow.jobs.job_service import SERVICE_NAME as JOB_SERVICE
from loraflow.jobs.job_service import add_job_service
from loraflow.jobs.queue import JobQueue
from loraflow.jobs.registry import ArtifactRecord, Registry
from loraflow.security.settings import SecuritySettings
from loraflow.server.grpc_server import GrpcServer
from loraflow.storage.storage_service import SERVICE_NAME as STORAGE_SERVICE
from loraflow.storage.storage_service import add_storage_service
from loraflow.storage.store import artifact_key, open_store
from loraflow.v1 import compiler_pb2_grpc, inference_pb2_grpc, trainer_pb2_grpc

MODEL_ID = "m"
CTX_LEN = 64


@pytest.fixture(scope="session")
def bare_artifact(tiny_llama, tmp_path_factory):
    """(artifact_dir, manifest) of the tiny model with no adapter compiled in: 4 KV slots, ctx 64."""
    from services.compiler.artifact import build_artifact
    from services.compiler.options import CompileOptions

    out = tmp_path_factory.mktemp("bare-artifact")
    options = CompileOptions(batch_size=2, full_batch_size=4, prefill_seq_len=8, ctx_len=CTX_LEN, max_rank=8,
                             adapter_slots=2)
    return out, build_artifact(tiny_llama, [], options, out)


@dataclass
class InferenceStack:
    grpc: GrpcServer
    http: object  # services.inference.openai_api.serve.HttpServer
    api: object  # services.inference.openai_api.app.OpenAIApi
    manager: object
    channel: grpc.Channel

    @property
    def stub(self) -> inference_pb2_grpc.InferenceServiceStub:
        return inference_pb2_grpc.InferenceServiceStub(self.channel)

    def close(self) -> None:
        self.http.stop()
        self.channel.close()
        self.grpc.stop(grace=0).wait(10)
        self.manager.close()


def inference_stack_factory_for(bare_artifact, redis_url: str, root: Path):
    """(make, stacks): make(security) -> InferenceStack with model "m" loaded, both front doors started."""
    from services.inference.model_manager import ModelManager
    from services.inference.openai_api.app import ApiLimits, OpenAIApi
    from services.inference.openai_api.serve import HttpServer
    from services.inference.server import SERVICE_NAME, InferenceServicer

    artifact_dir, manifest = bare_artifact
    store = open_store((root / "store").as_uri())
    uri = store.publish_dir(artifact_key(manifest.artifact_id), artifact_dir)
    registry = Registry(redis.Redis.from_url(redis_url))
    registry.put_artifact(ArtifactRecord(artifact_id=manifest.artifact_id, uri=uri,
                                         base_model=manifest.base_model.source))
    stacks: list[InferenceStack] = []

    def make(security: SecuritySettings | None = None) -> InferenceStack:
        security = security or SecuritySettings()
        manager = ModelManager(store=store, registry=registry, cache_dir=root / f"cache{len(stacks)}")
        manager.load_artifact(manifest.artifact_id, "cpu", model_id=MODEL_ID, num_threads=1)
        server = GrpcServer("127.0.0.1:0", [SERVICE_NAME], security=security)
        server.add(inference_pb2_grpc.add_InferenceServiceServicer_to_server, InferenceServicer(manager))
        server.start()
        api = OpenAIApi(manager, authenticator=server.authenticator, limits=ApiLimits.from_settings(security))
        http = HttpServer("127.0.0.1:0", security=security, authenticated=server.authenticator is not None,
                          grace_s=1).start(api.app)
        stack = InferenceStack(server, http, api, manager, grpc.insecure_channel(server.address))
        stacks.append(stack)
        return stack

    return make, stacks


@pytest.fixture
def inference_stack_factory(bare_artifact, redis_url, tmp_path):
    make, stacks = inference_stack_factory_for(bare_artifact, redis_url, tmp_path)
    yield make
    for stack in stacks:
        stack.close()


@pytest.fixture
def inference_stack(inference_stack_factory) -> InferenceStack:
    return inference_stack_factory()


@dataclass
class QueueStack:
    """One queue-backed API process's gRPC server: its service, JobService and StorageService."""

    server: GrpcServer
    queue: JobQueue
    channel: grpc.Channel


def build_queue_stacks(redis_url: str, root: Path, input_policy) -> dict[str, QueueStack]:
    """{"trainer": QueueStack, "compiler": QueueStack} sharing one Redis and store, no workers."""
    from services.compiler.inputs import CompileInputs
    from services.compiler.server import CompilerServiceServicer
    from services.trainer.server import TrainerServiceServicer

    client = redis.Redis.from_url(redis_url)
    registry = Registry(client)
    store = open_store((root / "store").as_uri())
    stacks = {}
    for name, kind in (("trainer", "train"), ("compiler", "compile")):
        queue = JobQueue(client, kind)
        if name == "trainer":
            service, add = "loraflow.v1.TrainerService", trainer_pb2_grpc.add_TrainerServiceServicer_to_server
            servicer = TrainerServiceServicer(queue, registry, store, inputs=input_policy)
        else:
            service, add = "loraflow.v1.CompilerService", compiler_pb2_grpc.add_CompilerServiceServicer_to_server
            inputs = CompileInputs(store, registry, root / "compile-cache", policy=input_policy)
            servicer = CompilerServiceServicer(queue, registry, store, inputs)
        server = GrpcServer("127.0.0.1:0", [service, JOB_SERVICE, STORAGE_SERVICE])
        server.add(add, servicer)
        add_job_service(server, {kind: queue})
        add_storage_service(server, store, root / f"{name}-work")
        server.start()
        stacks[name] = QueueStack(server, queue, grpc.insecure_channel(server.address))
    return stacks


def close_queue_stacks(stacks: dict[str, QueueStack]) -> None:
    for stack in stacks.values():
        stack.channel.close()
        stack.server.stop(grace=0).wait(10)


@pytest.fixture
def queue_stacks(redis_url, tmp_path, input_policy):
    stacks = build_queue_stacks(redis_url, tmp_path, input_policy)
    yield stacks
    close_queue_stacks(stacks)


def tokens_file(tmp_path: Path, *names: str) -> tuple[Path, dict[str, str]]:
    """A 0600 tokens file for `names`; returns (path, name -> token)."""
    from loraflow.security.auth import add_token

    path = tmp_path / "tokens"
    return path, {name: add_token(path, name) for name in names}
