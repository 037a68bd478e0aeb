"""A worker process SIGKILLed mid-training: a second worker process resumes from its checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from loraflow.v1 import jobs_pb2, trainer_pb2
from tests.trainer.conftest import TrainerStack

REPO = Path(__file__).resolve().parents[2]
LEASE_SECONDS = 1.0


def _worker(stack: TrainerStack, redis_url: str, cache: Path, log: Path, allowed_root: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "services.trainer", "worker", "--redis-url", redis_url,
         "--store-url", stack.store.uri(""), "--cache-dir", str(cache), "--lease-seconds", str(LEASE_SECONDS),
         "--report-every-steps", "1", "--log-level", "INFO", "--allow-local-paths", allowed_root],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))  # noqa: SIM115


@pytest.mark.slow
def test_sigkilled_worker_is_resumed_from_its_checkpoint_by_another_process(redis_url, tmp_path, tiny_llama,
                                                                               dataset_file, allowed_root,
                                                                               input_policy):
    stack = TrainerStack(redis_url, tmp_path, lease_seconds=LEASE_SECONDS, inputs=input_policy)
    procs: list[subprocess.Popen] = []
    try:
        first = _worker(stack, redis_url, tmp_path / "cache-a", tmp_path / "worker-a.log", allowed_root)
        procs.append(first)
        job = stack.trainer.SubmitTrainingJob(trainer_pb2.SubmitTrainingJobRequest(
            base_model=str(tiny_llama), dataset_uri=str(dataset_file), adapter_name="survivor",
            lora=trainer_pb2.LoraConfig(r=4),
            training=trainer_pb2.TrainingConfig(max_steps=60, batch_size=4, learning_rate=3e-3, max_seq_len=32,
                                                checkpoint_every_steps=5)))
        killed_after = None
        for event in stack.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id), timeout=120):
            if event.state == jobs_pb2.JOB_STATE_RUNNING and len(procs) == 1:
                # Start the second worker now, so its imports overlap the first one's training.
                procs.append(_worker(stack, redis_url, tmp_path / "cache-b", tmp_path / "worker-b.log", allowed_root))
            if event.message.startswith("checkpoint at step"):
                first.send_signal(signal.SIGKILL)
                first.wait(10)
                killed_after = int(event.metrics["checkpoint_step"])
                break
        assert killed_after == 5, (tmp_path / "worker-a.log").read_text()[-3000:]

        events = list(stack.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id), timeout=120))
        final = stack.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.id))
        assert final.state == jobs_pb2.JOB_STATE_SUCCEEDED, (final, (tmp_path / "worker-b.log").read_text()[-3000:])
        assert final.attempt == 2

        # Resumed from the last checkpoint the killed worker published, not from step 0.
        (resume,) = [e for e in events if "resumed_from_step" in e.metrics]
        checkpoints = [int(e.metrics["checkpoint_step"]) for e in events[:events.index(resume)]
                       if "checkpoint_step" in e.metrics]
        resumed_at = int(resume.metrics["resumed_from_step"])
        assert resumed_at >= killed_after and resumed_at == checkpoints[-1]
        after = [int(e.metrics["step"]) for e in events[events.index(resume) + 1:] if "loss" in e.metrics]
        assert after[0] == resumed_at + 1 and after[-1] == 60
        assert final.train_result.metrics["resumed_from_step"] == resumed_at

        # Succeeded once; exactly one adapter, published by attempt 2.
        assert sum(e.state == jobs_pb2.JOB_STATE_SUCCEEDED for e in events) == 1
        adapters, _ = stack.registry.list_adapters()
        assert [a.name for a in adapters] == ["survivor"]
        assert stack.store.list_dirs("adapters/survivor") == [f"adapters/survivor/{job.id}-a2"]
        assert adapters[0].uri == final.train_result.adapter_uri
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        stack.close()


@pytest.mark.slow
def test_all_mode_serves_health_and_sigterm_checkpoints_and_releases_the_job(redis_url, tmp_path, tiny_llama,
                                                                               dataset_file, allowed_root):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from loraflow.jobs.embedded_redis import free_port
    from loraflow.jobs.queue import JobQueue
    from loraflow.options.config import connect_redis
    from loraflow.storage.store import open_store
    from loraflow.v1 import jobs_pb2_grpc, trainer_pb2_grpc

    port = free_port()
    store = open_store((tmp_path / "store").as_uri())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "LORAFLOW_REDIS_URL": redis_url,
           "LORAFLOW_STORE_URL": store.uri(""), "LORAFLOW_CACHE_DIR": str(tmp_path / "cache")}
    log = tmp_path / "all.log"
    proc = subprocess.Popen([sys.executable, "-m", "services.trainer", "--listen", f"127.0.0.1:{port}",
                             "--report-every-steps", "1", "--grace", "2", "--allow-local-paths", allowed_root],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))  # noqa: SIM115
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=90)
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "loraflow.v1.TrainerService", "loraflow.v1.JobService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        job = trainer_pb2_grpc.TrainerServiceStub(channel).SubmitTrainingJob(trainer_pb2.SubmitTrainingJobRequest(
            base_model=str(tiny_llama), dataset_uri=str(dataset_file), adapter_name="paused",
            training=trainer_pb2.TrainingConfig(max_steps=100000, batch_size=2, max_seq_len=32,
                                                checkpoint_every_steps=100000)), timeout=30)
        seen = 0
        for event in jobs_pb2_grpc.JobServiceStub(channel).WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id),
                                                                     timeout=120):
            seen = int(event.metrics.get("step", 0))
            if seen >= 2:
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    record = JobQueue(connect_redis(redis_url), "train").get(job.id)
    assert record.state == "QUEUED" and "re-queued" in record.message
    (checkpoint,) = store.list_dirs(f"checkpoints/{job.id}")
    assert int(checkpoint.rsplit("step-", 1)[1]) >= seen
