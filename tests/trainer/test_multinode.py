"""nodes > 1: one job's ranks on two "machines" — two workers with their own cache dirs on loopback, node 0
(the JobWorker that took the job) and a follower (RunFollower, what --join-distributed runs) — joined
through node 0's rendezvous endpoint in Redis. The ranks are real torchrun children of each."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import grpc
import pytest

from loraflow.server.grpc_server import error_info
from loraflow.v1 import jobs_pb2
from services.trainer.follower import RunFollower
from services.trainer.rank_group import process_running, wait_gone
from services.trainer.run_board import RUNS_KEY, RunBoard
from services.trainer.worker import TrainingHandler
from tests.trainer.conftest import trainer_cli
from tests.trainer.test_distributed import (
    _events,
    _rank_pids,
    _ranks_once_training,
    _request,
    _same_trajectory,
)


@pytest.fixture
def start_follower(tmp_path):
    """start_follower(stack) -> RunFollower: a follower thread with its own cache dir (its "machine")."""
    started = []

    def start(stack, name="node1", **handler_options):
        handler_options.setdefault("inputs", stack.inputs)
        handler = TrainingHandler(stack.store, stack.registry, tmp_path / f"cache-{name}", allow_distributed=True,
                                  rdzv_host="127.0.0.1", **handler_options)
        follower = RunFollower(handler, stack.queue)
        thread = threading.Thread(target=follower.run, daemon=True)
        thread.start()
        started.append((follower, thread))
        return follower

    yield start
    for follower, thread in started:
        follower.stop.set()
        thread.join(60)
        assert not thread.is_alive()


def _follower_pids(follower_cache) -> list[int]:
    pids = []
    for p in follower_cache.glob("follow/*/*/pids/rank-*"):
        try:
            pids.append(int(p.read_text()))
        except (OSError, ValueError):
            continue
    return pids


@pytest.mark.parametrize(("changes", "field", "value"), [
    ({"world_size": 2, "nodes": 17}, "training.nodes", "17"),
    ({"world_size": 2, "nodes": -1}, "training.nodes", "-1"),
    ({"world_size": 3, "nodes": 2}, "training.nodes", "2"),
])
def test_submit_rejects_bad_node_counts(stack, tiny_llama, dataset_file, changes, field, value):
    with pytest.raises(grpc.RpcError) as e:
        stack.trainer.SubmitTrainingJob(_request(tiny_llama, dataset_file, "bad", **changes), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    info = error_info(e.value)
    assert info.metadata["field"] == field and info.metadata["value"] == value
    assert stack.queue.list()[0] == []


def test_a_run_claims_each_node_rank_once_and_none_after_it_ended(redis_url):
    from loraflow.options.config import connect_redis

    board = RunBoard(connect_redis(redis_url))
    key = board.open("j1", 1, "127.0.0.1:1", nnodes=3, nproc=1, resume_key="")
    (run,) = board.open_runs()
    assert [board.claim(run), board.claim(run), board.claim(run)] == [1, 2, None]
    assert board.open_runs() == []  # full
    board.end(key)
    assert board.get(key) is None and board.claim(run) is None


def test_two_nodes_train_the_same_model_as_one_process(stack, tiny_llama, dataset_file, start_follower):
    stack.start_worker(allow_distributed=True, rdzv_host="127.0.0.1")
    single = stack.trainer.SubmitTrainingJob(_request(tiny_llama, dataset_file, "single"))
    assert _events(stack, single.id)[-1].state == jobs_pb2.JOB_STATE_SUCCEEDED
    follower = start_follower(stack)
    double = stack.trainer.SubmitTrainingJob(_request(tiny_llama, dataset_file, "double", world_size=2, nodes=2))
    events = _events(stack, double.id)
    assert events[-1].state == jobs_pb2.JOB_STATE_SUCCEEDED, events[-1]
    (started,) = [e for e in events if "ddp_synced_tensors" in e.metrics]
    assert started.metrics["world_size"] == 2
    one, two = _same_trajectory(stack, single.id, double.id, steps=6)
    assert two["metrics"]["tokens"] == one["metrics"]["tokens"]
    assert stack.store.list_dirs("adapters/double") == [f"adapters/double/{double.id}-a1"]
    deadline = time.monotonic() + 10
    while follower.runs_followed < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert follower.runs_followed == 1  # the second node really was the follower's
    assert stack.redis.smembers(RUNS_KEY) == set()


def test_cancel_reaches_the_follower_ranks(stack, tiny_llama, dataset_file, tmp_path, start_follower):
    stack.start_worker(allow_distributed=True, rdzv_host="127.0.0.1")
    start_follower(stack)
    job = stack.trainer.SubmitTrainingJob(_request(tiny_llama, dataset_file, "never", world_size=2, nodes=2,
                                                   max_steps=100000, checkpoint_every_steps=100000))
    pids = _ranks_once_training(stack, job.id)
    assert len(pids) == 2 and all(process_running(p) for p in pids)
    assert pids[1] in _follower_pids(tmp_path / "cache-node1")  # rank 1 runs under the follower
    stack.jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.id))
    assert wait_gone(pids, timeout=stack.queue.lease_seconds / 3) == []
    final = stack.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.id))
    assert final.state == jobs_pb2.JOB_STATE_CANCELLED and stack.registry.find_adapter("never") is None


@pytest.mark.slow
def test_killed_follower_ranks_fail_the_attempt_and_the_job_resumes_once(redis_url, tmp_path, tiny_llama,
                                                                          dataset_file, input_policy, start_follower):
    from tests.trainer.conftest import TrainerStack

    stack = TrainerStack(redis_url, tmp_path, lease_seconds=3.0, inputs=input_policy)
    try:
        stack.start_worker(allow_distributed=True, rdzv_host="127.0.0.1")
        follower = start_follower(stack)
        job = stack.trainer.SubmitTrainingJob(_request(tiny_llama, dataset_file, "survivor", world_size=2, nodes=2,
                                                       max_steps=60, gradient_accumulation_steps=1,
                                                       checkpoint_every_steps=5))
        pids: list[int] = []
        for event in stack.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id), timeout=180):
            if "rank_0_pid" in event.metrics:
                pids = _rank_pids(event)
            if event.message.startswith("checkpoint at step"):
                os.kill(pids[1], signal.SIGKILL)  # the follower's rank
                break
        assert wait_gone(pids, timeout=20) == []
        events = _events(stack, job.id)
        final = stack.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.id))
        assert final.state == jobs_pb2.JOB_STATE_SUCCEEDED, final
        assert final.attempt == 2 and final.train_result.metrics["resumed_from_step"] >= 5
        (resume,) = [e for e in events if "resumed_from_step" in e.metrics]
        assert resume.metrics["world_size"] == 2
        assert sum(e.state == jobs_pb2.JOB_STATE_SUCCEEDED for e in events) == 1
        assert stack.store.list_dirs("adapters/survivor") == [f"adapters/survivor/{job.id}-a2"]
        deadline = time.monotonic() + 10
        while follower.runs_followed < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert follower.runs_followed == 2  # it hosted node 1 of both attempts
    finally:
        stack.close()


def test_a_stopping_follower_has_node_zero_checkpoint_and_release_the_job(stack, tiny_llama, dataset_file,
                                                                          start_follower):
    stack.start_worker(allow_distributed=True, rdzv_host="127.0.0.1")
    first = start_follower(stack)
    job = stack.trainer.SubmitTrainingJob(_request(tiny_llama, dataset_file, "handover", world_size=2, nodes=2,
                                                   max_steps=80, gradient_accumulation_steps=1,
                                                   checkpoint_every_steps=1000))
    pids = _ranks_once_training(stack, job.id, min_step=3)
    first.stop.set()  # what SIGTERM does to a --join-distributed worker
    assert wait_gone(pids, timeout=20) == []
    deadline = time.monotonic() + 30
    while not stack.store.list_dirs(f"checkpoints/{job.id}") and time.monotonic() < deadline:
        time.sleep(0.1)
    (ckpt,) = stack.store.list_dirs(f"checkpoints/{job.id}")
    saved_step = int(ckpt.rsplit("step-", 1)[1])
    assert 3 <= saved_step < 80

    start_follower(stack, "node1b")  # node 0 took the job again and waits for a node 1
    events = _events(stack, job.id)
    assert events[-1].state == jobs_pb2.JOB_STATE_SUCCEEDED, events[-1]
    assert any("re-queued" in e.message for e in events)
    result = stack.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.id)).train_result
    assert result.metrics["resumed_from_step"] == saved_step and result.metrics["steps"] == 80


def test_a_join_distributed_worker_process_hosts_the_other_node(stack, tiny_llama, dataset_file, tmp_path,
                                                                allowed_root, redis_url):
    """The real CLI: `worker --join-distributed --rdzv-host 127.0.0.1`, started once node 0 (an in-process
    worker) took the job and waits at its rendezvous, hosts node 1."""
    import subprocess
    import sys
    from pathlib import Path

    stack.start_worker(allow_distributed=True, rdzv_host="127.0.0.1")
    job = stack.trainer.SubmitTrainingJob(_request(tiny_llama, dataset_file, "joined", world_size=2, nodes=2))
    board = RunBoard(stack.redis)
    deadline = time.monotonic() + 60
    while not board.open_runs() and time.monotonic() < deadline:
        time.sleep(0.05)
    (run,) = board.open_runs()
    assert (run.job_id, run.nnodes, run.nproc) == (job.id, 2, 1) and run.endpoint.startswith("127.0.0.1:")

    repo = Path(__file__).resolve().parents[2]
    log = tmp_path / "joiner.log"
    joiner = subprocess.Popen(
        [sys.executable, "-m", "services.trainer", "worker", "--redis-url", redis_url, "--store-url",
         stack.store.uri(""), "--cache-dir", str(tmp_path / "cache-joiner"), "--report-every-steps", "1",
         "--allow-local-paths", allowed_root, "--join-distributed", "--rdzv-host", "127.0.0.1"],
        cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)}, stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"))  # noqa: SIM115
    try:
        events = _events(stack, job.id)
        assert events[-1].state == jobs_pb2.JOB_STATE_SUCCEEDED, (events[-1], log.read_text()[-3000:])
        assert stack.store.list_dirs("adapters/joined") == [f"adapters/joined/{job.id}-a1"]
        joiner.send_signal(signal.SIGTERM)
        assert joiner.wait(30) == 0
        assert f"hosting node 1/2 of job {job.id} attempt 1" in log.read_text(), log.read_text()[-3000:]
    finally:
        if joiner.poll() is None:
            joiner.kill()
            joiner.wait(10)


def test_node_zero_gives_the_attempt_up_when_no_node_joins(stack, tiny_llama, dataset_file):
    stack.start_worker(allow_distributed=True, rdzv_host="127.0.0.1", join_timeout=1.0)
    job = stack.trainer.SubmitTrainingJob(_request(tiny_llama, dataset_file, "alone", world_size=2, nodes=2))
    events = _events(stack, job.id)
    assert events[-1].state == jobs_pb2.JOB_STATE_FAILED
    gave_up = [e.message for e in events if "other nodes joined" in e.message]
    assert len(gave_up) == 3, [e.message for e in events]  # every delivery, then the dead letter
    assert all("0 of 1 other nodes joined within 1s" in m and "--join-distributed" in m for m in gave_up)
    assert stack.redis.smembers(RUNS_KEY) == set() and stack.store.list("adapters/alone") == []


def test_cli_train_nodes_reaches_the_job_and_bad_values_name_the_field(stack, tiny_llama, dataset_file):
    cli = trainer_cli(stack.port)
    code, out, err = cli("train", str(tiny_llama), str(dataset_file), "--name", "spread", "--world-size", "4",
                         "--nodes", "2", "--batch-size", "4", "-o", "json")
    assert code == 0, err
    (job,) = stack.queue.list()[0]
    assert job.payload["training"]["nodes"] == 2 and job.payload["training"]["world_size"] == 4
    code, out, err = cli("train", str(tiny_llama), str(dataset_file), "--name", "uneven", "--world-size", "4",
                         "--nodes", "3", "--batch-size", "4", "-o", "json")
    assert code == 1 and out == ""
    detail = json.loads(err)["error"]
    assert detail["code"] == "INVALID_ARGUMENT" and detail["field"] == "training.nodes" and detail["value"] == "3"


def test_a_follower_checks_the_inputs_itself_and_node_zero_fails_the_attempt(stack, tiny_llama, dataset_file,
                                                                             start_follower):
    from loraflow.storage.model_source import InputPolicy

    stack.start_worker(allow_distributed=True, rdzv_host="127.0.0.1")
    # This follower's operator allowed no local paths: the base model in the Redis payload is not for it.
    start_follower(stack, inputs=InputPolicy())
    job = stack.trainer.SubmitTrainingJob(_request(tiny_llama, dataset_file, "refused", world_size=2, nodes=2))
    events = _events(stack, job.id)
    assert events[-1].state == jobs_pb2.JOB_STATE_FAILED
    refused = [e.message for e in events if "could not start its ranks" in e.message]
    assert refused and all(f"base_model {str(tiny_llama)!r} is not under a directory this service allows local paths from"
                       in m for m in refused)
    assert stack.store.list("adapters/refused") == []
