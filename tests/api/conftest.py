"""Fixtures of the Python API suite: tiny models with PEFT adapters of different ranks and targets, the
PEFT reference, and the three services running in-process on loopback over one store and registry."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.compiler.conftest import save_peft_adapter
from tests.inference.conftest import PeftReference

# name -> LoRA settings; ranks and targets differ, MLP included. "hot" is loaded only after compile().
ADAPTERS = {
    "gsm8k": dict(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"), seed=11),
    "code": dict(r=8, lora_alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                     "up_proj", "down_proj"), seed=12),
    "hot": dict(r=6, lora_alpha=12, target_modules=("q_proj", "up_proj", "down_proj"), use_rslora=True, seed=13),
    "wide": dict(r=16, lora_alpha=16, target_modules=("q_proj",), seed=14),  # rank above the compiled banks
}
PROMPTS = ["code prompt", "math prompt", "generic", "the quick brown fox"]
MAPPING = ["code", "gsm8k", "base", "gsm8k"]
COMPILE = dict(prefill_seq_len=8, ctx_len=64, full_batch_size=4)
GENERATION_LEN = 10


@pytest.fixture(scope="session")
def api_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("api-cache")


@pytest.fixture(scope="session")
def api_adapters(tmp_path_factory, tiny_model_factory):
    """api_adapters(arch) -> {name: PEFT dir} for that architecture's tiny model."""
    cache: dict[str, dict[str, Path]] = {}

    def make(arch: str) -> dict[str, Path]:
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"api-adapters-{arch}")
            cache[arch] = {name: save_peft_adapter(tiny_model_factory(arch), root / name, **spec)
                           for name, spec in ADAPTERS.items()}
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def peft_for(tiny_model_factory, api_adapters):
    """peft_for(arch) -> PeftReference with every adapter of that architecture loaded (cached)."""
    cache: dict[str, PeftReference] = {}

    def make(arch: str) -> PeftReference:
        if arch not in cache:
            cache[arch] = PeftReference(tiny_model_factory(arch), api_adapters(arch))
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def hf_tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@dataclass
class Services:
    compiler: str
    inference: str
    trainer: str


@pytest.fixture
def services(redis_url, tmp_path, input_policy):
    """Compiler (API + worker), inference and trainer (API + worker) in-process on loopback, sharing one
    file store and one Redis registry, reading local paths under the session's temp dir only."""
    import redis

    from loraflow.jobs.job_service import SERVICE_NAME as JOB_SERVICE_NAME
    from loraflow.jobs.job_service import add_job_service
    from loraflow.jobs.queue import JobQueue, JobWorker
    from loraflow.jobs.registry import Registry
    from loraflow.server.grpc_server import GrpcServer
    from loraflow.storage.store import open_store
    from loraflow.v1 import compiler_pb2, compiler_pb2_grpc, inference_pb2_grpc, trainer_pb2_grpc
    from services.compiler.inputs import CompileInputs
    from services.compiler.server import CompilerServiceServicer
    from services.compiler.worker import CompileHandler
    from services.inference.model_manager import ModelManager
    from services.inference.server import SERVICE_NAME as INFERENCE_SERVICE
    from services.inference.server import InferenceServicer
    from services.trainer.server import SERVICE_NAME as TRAINER_SERVICE
    from services.trainer.server import TrainerServiceServicer
    from services.trainer.worker import TrainingHandler

    client = redis.Redis.from_url(redis_url)
    registry = Registry(client)
    store = open_store((tmp_path / "store").as_uri())
    compile_queue = JobQueue(client, "compile", lease_seconds=30.0)
    train_queue = JobQueue(client, "train", lease_seconds=30.0)
    inputs = CompileInputs(store, registry, tmp_path / "compiler-cache", policy=input_policy)

    compiler = GrpcServer("127.0.0.1:0", [compiler_pb2.DESCRIPTOR.services_by_name["CompilerService"].full_name,
                                          JOB_SERVICE_NAME])
    compiler.add(compiler_pb2_grpc.add_CompilerServiceServicer_to_server,
                 CompilerServiceServicer(compile_queue, registry, store, inputs))
    add_job_service(compiler, {"compile": compile_queue})
    trainer = GrpcServer("127.0.0.1:0", [TRAINER_SERVICE, JOB_SERVICE_NAME])
    trainer.add(trainer_pb2_grpc.add_TrainerServiceServicer_to_server,
                TrainerServiceServicer(train_queue, registry, store, inputs=input_policy))
    add_job_service(trainer, {"train": train_queue})
    inference = GrpcServer("127.0.0.1:0", [INFERENCE_SERVICE])
    manager = ModelManager(store=store, registry=registry, cache_dir=tmp_path / "inference-cache",
                           inputs=input_policy)
    inference.add(inference_pb2_grpc.add_InferenceServiceServicer_to_server, InferenceServicer(manager))
    for server in (compiler, trainer, inference):
        server.start()
    workers = [JobWorker(compile_queue, CompileHandler(store, registry, inputs, tmp_path / "compiler-cache"),
                         consumer="api-test-compiler", stop_event=threading.Event(), poll_ms=100),
               JobWorker(train_queue, TrainingHandler(store, registry, tmp_path / "trainer-cache", inputs=input_policy),
                         consumer="api-test-trainer", stop_event=threading.Event(), poll_ms=100)]
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
    for t in threads:
        t.start()
    yield Services(compiler=compiler.address, inference=inference.address, trainer=trainer.address)
    for w in workers:
        w.stop()
    for t in threads:
        t.join(10)
    for server in (compiler, trainer, inference):
        server.stop(0).wait(5)
    manager.close()
    client.close()
