"""The trainer as a Kubernetes Indexed Job pod runs it: real `python -m services.trainer worker` processes
with --one-job and --role auto/follower against a real Redis, a file store and the in-process API; the
multi-node case starts real torchrun ranks (gloo on loopback) under a leader and a follower process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loraflow.jobs.embedded_redis import free_port
from loraflow.v1 import jobs_pb2
from services.trainer.node_main import EXIT_CANCELLED, EXIT_FAILED, EXIT_REDELIVERED, EXIT_SUCCEEDED
from services.trainer.run_board import RUNS_KEY
from tests.trainer.test_distributed import _events, _request, _same_trajectory

REPO = Path(__file__).resolve().parents[2]
_NODE_ENV = ("JOB_COMPLETION_INDEX", "LORAFLOW_NODE_RANK", "LORAFLOW_TRAINER_ROLE", "LORAFLOW_ONE_JOB",
             "LORAFLOW_RDZV_PORT", "LORAFLOW_RDZV_HOST")


class Trainer:
    """One trainer worker process with its own cache dir (its "machine") and log."""

    def __init__(self, stack, redis_url, tmp_path, name, *flags, local_paths=None, env=None):
        self.log = tmp_path / f"{name}.log"
        cmd = [sys.executable, "-m", "services.trainer", "worker", "--redis-url", redis_url, "--store-url",
               stack.store.uri(""), "--cache-dir", str(tmp_path / f"cache-{name}"), "--report-every-steps", "1",
               *(["--allow-local-paths", local_paths] if local_paths else []), *flags]
        environ = {k: v for k, v in os.environ.items() if k not in _NODE_ENV}
        environ.update({"PYTHONPATH": str(REPO), **(env or {})})
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=environ, stdout=subprocess.DEVNULL, stderr=err)

    def wait(self, timeout=180) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"trainer still running after {timeout}s:\n{self.tail()}") from None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def trainers(stack, redis_url, tmp_path, allowed_root):
    """trainers(name, *flags, local_paths=allowed_root, env=None) -> a started Trainer; all killed at the end."""
    started: list[Trainer] = []

    def start(name, *flags, local_paths=allowed_root, env=None):
        t = Trainer(stack, redis_url, tmp_path, name, *flags, local_paths=local_paths, env=env)
        started.append(t)
        return t

    yield start
    for t in started:
        t.close()


def _job(stack, job_id):
    return stack.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job_id))


def _wait_step(stack, job_id, min_step, timeout=120):
    for event in stack.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id), timeout=timeout):
        if event.metrics.get("step", 0) >= min_step and "loss" in event.metrics:
            return event
    raise AssertionError(f"job {job_id} ended before step {min_step}")


def _listening_on(port: int) -> set[str]:
    """Local addresses with a TCP socket in LISTEN on ``port`` in this network namespace (/proc/net/tcp{,6})."""
    import ipaddress

    hosts = set()
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            addr, hex_port = cols[1].split(":")
            if cols[3] == "0A" and int(hex_port, 16) == port:
                raw = bytes.fromhex(addr)
                hosts.add(str(ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, width // 2, 4)))))
    return hosts


def test_one_job_mode_runs_one_job_exits_0_and_leaves_the_next_queued(stack, tiny_llama, dataset_file, trainers):
    first = stack.trainer.SubmitTrainingJob(_request(tiny_llama, dataset_file, "first", max_steps=3))
    second = stack.trainer.SubmitTrainingJob(_request(tiny_llama, dataset_file, "second", max_steps=3))
    trainer = trainers("one", "--one-job")
    assert trainer.wait() == EXIT_SUCCEEDED, trainer.tail()
    assert _job(stack, first.id).state == jobs_pb2.JOB_STATE_SUCCEEDED
    left = _job(stack, second.id)
    assert left.state == jobs_pb2.JOB_STATE_QUEUED and left.attempt == 0
    assert stack.registry.find_adapter("first") is not None and stack.registry.find_adapter("second") is None


def test_one_job_mode_exits_non_zero_on_a_failing_job(stack, tiny_llama, dataset_file, trainers):
    # world_size 2 on a worker the operator did not open for torch.distributed: the job fails, and so does the pod.
    job = stack.trainer.SubmitTrainingJob(_request(tiny_llama, dataset_file, "refused", world_size=2))
    trainer = trainers("failing", "--one-job")
    assert trainer.wait() == EXIT_FAILED, trainer.tail()
    failed = _job(stack, job.id)
    assert failed.state == jobs_pb2.JOB_STATE_FAILED and "--allow-distributed-training" in failed.error


def test_one_job_mode_exits_cancelled_when_the_job_is_cancelled(stack, tiny_llama, dataset_file, trainers):
    job = stack.trainer.SubmitTrainingJob(_request(tiny_llama, dataset_file, "never", max_steps=100000,
                                                   checkpoint_every_steps=100000))
    trainer = trainers("cancelled", "--one-job")
    _wait_step(stack, job.id, 2)
    stack.jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.id))
    assert trainer.wait(60) == EXIT_CANCELLED, trainer.tail()
    assert _job(stack, job.id).state == jobs_pb2.JOB_STATE_CANCELLED and stack.registry.find_adapter("never") is None


def test_sigterm_mid_job_releases_it_and_another_worker_finishes_it_once(stack, tiny_llama, dataset_file, trainers):
    job = stack.trainer.SubmitTrainingJob(_request(tiny_llama, dataset_file, "handover", max_steps=150,
                                                   gradient_accumulation_steps=1, checkpoint_every_steps=1000))
    trainer = trainers("sigterm", "--one-job")
    _wait_step(stack, job.id, 3)
    trainer.proc.send_signal(signal.SIGTERM)
    assert trainer.wait(60) == EXIT_REDELIVERED, trainer.tail()
    released = _job(stack, job.id)
    assert released.state == jobs_pb2.JOB_STATE_QUEUED and "re-queued" in released.message, released
    (ckpt,) = stack.store.list_dirs(f"checkpoints/{job.id}")
    saved_step = int(ckpt.rsplit("step-", 1)[1])
    assert 3 <= saved_step < 150

    stack.start_worker()  # another worker takes the redelivered job
    events = _events(stack, job.id)
    assert events[-1].state == jobs_pb2.JOB_STATE_SUCCEEDED, events[-1]
    assert sum(e.state == jobs_pb2.JOB_STATE_SUCCEEDED for e in events) == 1
    done = _job(stack, job.id)
    assert done.attempt == 2 and done.train_result.metrics["resumed_from_step"] == saved_step
    assert done.train_result.metrics["steps"] == 150
    assert stack.store.list_dirs("adapters/handover") == [f"adapters/handover/{job.id}-a2"]


def test_an_indexed_job_leader_and_follower_train_the_same_model_as_one_process(stack, tiny_llama, dataset_file,
                                                                              trainers):
    """Two pods of one Indexed Job: the same flags, JOB_COMPLETION_INDEX 0 and 1, node 0 at a fixed port."""
    worker, thread = stack.start_worker()
    single = stack.trainer.SubmitTrainingJob(_request(tiny_llama, dataset_file, "single"))
    assert _events(stack, single.id)[-1].state == jobs_pb2.JOB_STATE_SUCCEEDED
    stack.stop_worker(worker, thread)

    port = free_port()
    flags = ("--role", "auto", "--one-job", "--allow-distributed-training", "--rdzv-host", "127.0.0.1",
             "--rdzv-port", str(port))
    double = stack.trainer.SubmitTrainingJob(_request(tiny_llama, dataset_file, "double", world_size=2, nodes=2))
    follower = trainers("node1", *flags, env={"JOB_COMPLETION_INDEX": "1"})
    leader = trainers("node0", *flags, env={"JOB_COMPLETION_INDEX": "0"})
    listening: set[str] = set()
    deadline = time.monotonic() + 180
    while leader.proc.poll() is None and time.monotonic() < deadline:
        listening |= _listening_on(port)  # node 0's c10d store, while the job trains
        time.sleep(0.05)
    assert leader.wait() == EXIT_SUCCEEDED, leader.tail()
    assert follower.wait(60) == EXIT_SUCCEEDED, follower.tail()
    # torch's TCPStore ignores the host it is given and listens on every interface ("::", dual-stack, or
    # 0.0.0.0): why a worker hosts ranks only with --allow-distributed-training, on a private network.
    import ipaddress

    assert listening, "nothing listened on the fixed rendezvous port"
    assert all(ipaddress.ip_address(h).is_unspecified for h in listening), listening
    assert f"hosting node 1/2 of job {double.id} attempt 1" in follower.tail()

    events = _events(stack, double.id)
    (started,) = [e for e in events if "ddp_synced_tensors" in e.metrics]
    assert started.metrics["world_size"] == 2
    one, two = _same_trajectory(stack, single.id, double.id, steps=6)
    assert two["metrics"]["tokens"] == one["metrics"]["tokens"]
    assert stack.store.list_dirs("adapters/double") == [f"adapters/double/{double.id}-a1"]
    assert stack.redis.smembers(RUNS_KEY) == set()
