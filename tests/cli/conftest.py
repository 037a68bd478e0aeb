"""Real servers on loopback for the client and CLI tests: the shared JobService over real Redis queues,
and (when it exists) the real trainer servicer."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import pytest
import redis
from typer.testing import CliRunner

from loraflow.cli import app
from loraflow.client import Client
from loraflow.jobs.job_service import SERVICE_NAME as JOB_SERVICE_NAME
from loraflow.jobs.job_service import add_job_service
from loraflow.jobs.queue import JobQueue, JobWorker
from loraflow.server.grpc_server import GrpcServer


@dataclass
class JobsServer:
    address: str
    queue: JobQueue
    redis: redis.Redis


@pytest.fixture
def train_jobs_server(redis_url):
    """A gRPC server with the real JobService over a real "train" JobQueue (like the trainer's api mode)."""
    client = redis.Redis.from_url(redis_url)
    queue = JobQueue(client, "train", lease_seconds=2.0)
    server = GrpcServer("127.0.0.1:0", [JOB_SERVICE_NAME])
    add_job_service(server, {"train": queue})
    server.start()
    yield JobsServer(server.address, queue, client)
    server.stop(0).wait(5)
    client.close()


@pytest.fixture
def run_worker():
    """run_worker(queue, handler): a real JobWorker on a thread, stopped after the test."""
    started: list[tuple[JobWorker, threading.Thread]] = []

    def start(queue: JobQueue, handler) -> JobWorker:
        worker = JobWorker(queue, handler, consumer=f"test-{len(started)}", stop_event=threading.Event(), poll_ms=200)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        started.append((worker, thread))
        return worker

    yield start
    for worker, thread in started:
        worker.stop()
        thread.join(10)


@pytest.fixture
def cli():
    """cli(*args, trainer=ADDR, ...) -> (exit_code, stdout, stderr) through the real typer app."""
    runner = CliRunner()

    def invoke(*args: str, trainer: str = "127.0.0.1:1", compiler: str = "127.0.0.1:1",
               inference: str = "127.0.0.1:1", input: str | None = None):
        result = runner.invoke(app, ["--trainer", trainer, "--compiler", compiler, "--inference", inference,
                                     "--timeout", "10", *args], input=input, catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    return invoke


@pytest.fixture
def cli_json(cli):
    """cli_json(*args, ...) -> parsed stdout of a successful `-o json` command."""

    def invoke(*args: str, **addresses):
        code, out, err = cli(*args, "-o", "json", **addresses)
        assert code == 0, f"exit {code}: {err}"
        return json.loads(out)

    return invoke


@pytest.fixture
def client_for():
    made: list[Client] = []

    def make(**addresses) -> Client:
        c = Client(timeout=10, **{"trainer": "127.0.0.1:1", "compiler": "127.0.0.1:1", "inference": "127.0.0.1:1",
                                  **addresses})
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@dataclass
class TrainerStack:
    address: str
    queue: JobQueue
    registry: object
    store: object

    def start_worker(self, run_worker):
        from services.trainer.worker import TrainingHandler

        handler = TrainingHandler(self.store, self.registry, self.store_dir.parent / "cache", report_every_steps=1,
                                  inputs=self.inputs)
        return run_worker(self.queue, handler)


@pytest.fixture
def trainer_stack(redis_url, tmp_path, input_policy):
    """The real trainer API in-process (TrainerService + JobService, as `services.trainer api` wires them)
    over real Redis and a file store; `start_worker(run_worker)` adds the real training worker."""
    from loraflow.jobs.registry import Registry
    from loraflow.storage.store import open_store
    from loraflow.v1 import trainer_pb2_grpc
    from services.trainer.server import SERVICE_NAME, TrainerServiceServicer

    client = redis.Redis.from_url(redis_url)
    queue = JobQueue(client, "train", lease_seconds=5.0)
    registry = Registry(client)
    store_dir = tmp_path / "store"
    store = open_store(store_dir.as_uri())
    server = GrpcServer("127.0.0.1:0", [SERVICE_NAME, JOB_SERVICE_NAME])
    server.add(trainer_pb2_grpc.add_TrainerServiceServicer_to_server,
               TrainerServiceServicer(queue, registry, store, inputs=input_policy))
    add_job_service(server, {"train": queue})
    server.start()
    stack = TrainerStack(server.address, queue, registry, store)
    stack.store_dir = store_dir
    stack.inputs = input_policy
    yield stack
    server.stop(0).wait(5)
    client.close()


@pytest.fixture
def tiny_dataset(tmp_path):
    """A small prompt/completion JSONL a tiny model can fit a little."""
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": f"reverse {w} ->", "completion": f" {w[::-1]}"} for w in
            ("abc", "hello", "fox", "dog", "lazy", "quick", "brown", "jumps")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def inference_address(redis_url, tmp_path, input_policy):
    """The real inference API in-process (as `python -m services.inference` wires it), no model loaded."""
    from loraflow.jobs.registry import Registry
    from loraflow.storage.store import open_store
    from loraflow.v1 import inference_pb2_grpc
    from services.inference.model_manager import ModelManager
    from services.inference.server import SERVICE_NAME, InferenceServicer

    client = redis.Redis.from_url(redis_url)
    server = GrpcServer("127.0.0.1:0", [SERVICE_NAME])
    manager = ModelManager(store=open_store((tmp_path / "store").as_uri()), registry=Registry(client),
                           cache_dir=tmp_path / "cache", on_change=lambda n: server.set_serving(n > 0),
                           inputs=input_policy)
    server.add(inference_pb2_grpc.add_InferenceServiceServicer_to_server, InferenceServicer(manager))
    server.start()
    server.set_serving(False)
    yield server.address
    server.stop(0).wait(5)
    manager.close()
    client.close()


@pytest.fixture
def compiler_address(redis_url, tmp_path, input_policy):
    """The real compiler API in-process (CompilerService + JobService over a real "compile" queue)."""
    from loraflow.jobs.registry import Registry
    from loraflow.storage.store import open_store
    from loraflow.v1 import compiler_pb2, compiler_pb2_grpc
    from services.compiler.inputs import CompileInputs
    from services.compiler.server import CompilerServiceServicer

    client = redis.Redis.from_url(redis_url)
    queue = JobQueue(client, "compile", lease_seconds=5.0)
    registry = Registry(client)
    store = open_store((tmp_path / "cstore").as_uri())
    name = compiler_pb2.DESCRIPTOR.services_by_name["CompilerService"].full_name
    server = GrpcServer("127.0.0.1:0", [name, JOB_SERVICE_NAME])
    server.add(compiler_pb2_grpc.add_CompilerServiceServicer_to_server,
               CompilerServiceServicer(queue, registry, store, CompileInputs(store, registry, tmp_path / "ccache",
                                                                       policy=input_policy)))
    add_job_service(server, {"compile": queue})
    server.start()
    yield server.address
    server.stop(0).wait(5)
    client.close()
