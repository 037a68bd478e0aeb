"""Trainer fixtures: a tiny memorisable dataset."""

from __future__ import annotations

import json

import pytest


def memorisable_lines(n: int = 24) -> list[str]:
    """Prompt/completion pairs with one rule (add one), so a tiny model learns it in a few steps."""
    return [json.dumps({"prompt": f"add 1 to {i} ->", "completion": f" {i + 1}"}) for i in range(n)]


@pytest.fixture
def dataset_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(memorisable_lines()) + "\n")
    return path


class TrainerStack:
    """TrainerService + JobService on a real loopback gRPC server, a real Redis and a file store;
    ``start_worker()`` runs a JobWorker thread in this process."""

    def __init__(self, redis_url: str, tmp_path, lease_seconds: float = 30.0, *, inputs=None, budget=None,
                 inspector=None):
        import grpc

        from loraflow.jobs.job_service import SERVICE_NAME as JOB_SERVICE_NAME
        from loraflow.jobs.job_service import add_job_service
        from loraflow.jobs.queue import JobQueue
        from loraflow.jobs.registry import Registry
        from loraflow.options.config import connect_redis
        from loraflow.server.grpc_server import GrpcServer
        from loraflow.storage.store import open_store
        from loraflow.v1 import jobs_pb2_grpc, trainer_pb2_grpc
        from services.trainer.server import SERVICE_NAME, TrainerServiceServicer

        self.redis = connect_redis(redis_url)
        self.queue = JobQueue(self.redis, "train", lease_seconds=lease_seconds)
        self.registry = Registry(self.redis)
        self.store_dir = tmp_path / "store"
        self.store = open_store(self.store_dir.as_uri())
        self.cache_dir = tmp_path / "cache"
        self.inputs = inputs  # the InputPolicy of API and workers (None: no local paths but the store's)
        self.server = GrpcServer("127.0.0.1:0", service_names=[SERVICE_NAME, JOB_SERVICE_NAME])
        self.server.add(trainer_pb2_grpc.add_TrainerServiceServicer_to_server,
                        TrainerServiceServicer(self.queue, self.registry, self.store, inputs=inputs, budget=budget,
                                               inspector=inspector))
        self.budget = budget
        add_job_service(self.server, {"train": self.queue})
        self.port = self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.trainer = trainer_pb2_grpc.TrainerServiceStub(self.channel)
        self.jobs = jobs_pb2_grpc.JobServiceStub(self.channel)
        self.workers: list[tuple[object, object]] = []

    def start_worker(self, report_every_steps: int = 1, **handler_options):
        import threading

        from loraflow.jobs.queue import JobWorker
        from services.trainer.worker import TrainingHandler

        handler_options.setdefault("budget", self.budget)
        handler = TrainingHandler(self.store, self.registry, self.cache_dir, report_every_steps=report_every_steps,
                                  inputs=self.inputs, **handler_options)
        worker = JobWorker(self.queue, handler, poll_ms=200, reaper_interval=0.5)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        self.workers.append((worker, thread))
        return worker, thread

    def stop_worker(self, worker, thread) -> None:
        worker.stop()
        thread.join(timeout=60)
        assert not thread.is_alive()

    def close(self) -> None:
        for worker, thread in self.workers:
            if thread.is_alive():
                self.stop_worker(worker, thread)
        self.channel.close()
        self.server.stop(grace=0).wait(5)
        self.redis.close()


@pytest.fixture
def stack(redis_url, tmp_path, input_policy):
    s = TrainerStack(redis_url, tmp_path, inputs=input_policy)
    yield s
    s.close()


def trainer_cli(port: int):
    """cli(*args) -> (exit code, stdout, stderr) of the real `loraflow` CLI against the trainer on `port`."""
    from typer.testing import CliRunner

    from loraflow.cli import app

    def cli(*args: str):
        result = CliRunner().invoke(app, ["--trainer", f"127.0.0.1:{port}", "--timeout", "10", *args],
                                    catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    return cli
