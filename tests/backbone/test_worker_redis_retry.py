"""Workers never die silently: a worker process started while Redis is unreachable stays up, retries with
backoff, and says it cannot work on every probe (/readyz and /healthz 503, gauges 0); once Redis answers it
recovers by itself and runs a job exactly once; SIGTERM during the backoff ends it at once."""

from __future__ import annotations

import signal
import subprocess
import urllib.error
import urllib.request

import pytest
import redis

from loraflow.errors import InvalidArgument
from loraflow.jobs.embedded_redis import free_port
from loraflow.jobs.queue import JobQueue
from loraflow.server.redis_health import ProcessHealth, check_liveness_grace
from loraflow.v1 import jobs_pb2, jobs_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from tests.backbone.redis_faults_support import RestartableRedis, ServiceProcess
from tests.support.polling import wait_for


@pytest.fixture
def restartable(tmp_path):
    r = RestartableRedis(tmp_path / "redis-data")  # a free port with nothing listening until start()
    yield r
    r.stop()


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _answers(port: int) -> bool:
    try:
        _get(port, "/readyz")
        return True
    except OSError:
        return False


def _metric(port: int, name: str) -> str:
    return " ".join(line for line in _get(port, "/metrics")[1].splitlines() if line.startswith(name + "{")
                    or line.startswith(name + " "))


def test_trainer_worker_started_without_redis_is_not_ready_not_live_then_recovers_and_runs_a_job_once(
        restartable, tmp_path, tiny_llama):
    metrics_port = free_port()
    allow = f"{tmp_path},{tiny_llama.parent}"
    worker = ServiceProcess("trainer", "worker", restartable.url, tmp_path, "--metrics-port", str(metrics_port),
                            "--liveness-grace", "0", "--lease-seconds", "5", "--allow-local-paths", allow)
    api = None
    try:
        wait_for(lambda: _answers(metrics_port), 60, "the metrics port")
        wait_for(lambda: "retrying with backoff" in worker.log(), 30, "the worker to say it is retrying")
        assert worker.proc.poll() is None, worker.log()[-2000:]
        status, body = _get(metrics_port, "/readyz")
        assert (status, body.strip()) == (503, "not ready")
        status, body = _get(metrics_port, "/healthz")
        assert status == 503 and "unable to work" in body, body
        assert _metric(metrics_port, "loraflow_worker_ready") == 'loraflow_worker_ready{queue="train"} 0.0'
        assert _metric(metrics_port, "loraflow_redis_up") == "loraflow_redis_up 0.0"
        assert _metric(metrics_port, "loraflow_process_live") == "loraflow_process_live 0.0"
        # Still the same process, still retrying: one warning per outage, not one per try.
        assert worker.proc.poll() is None
        assert worker.log().count("redis unreachable") == 1, worker.log()[-2000:]

        restartable.start()
        wait_for(lambda: _get(metrics_port, "/readyz")[0] == 200, 30, "/readyz 200 once Redis answers")
        assert _get(metrics_port, "/healthz") == (200, "live\n")
        assert _metric(metrics_port, "loraflow_worker_ready") == 'loraflow_worker_ready{queue="train"} 1.0'
        wait_for(lambda: _metric(metrics_port, "loraflow_redis_up") == "loraflow_redis_up 1.0", 10, "redis_up 1")
        assert "reachable again" in worker.log()

        dataset = tmp_path / "data.jsonl"
        dataset.write_text("".join(f'{{"prompt": "add 1 to {i} ->", "completion": " {i + 1}"}}\n' for i in range(8)))
        api = ServiceProcess("trainer", "api", restartable.url, tmp_path, "--allow-local-paths", allow)
        api.wait_health(1)  # SERVING
        job = trainer_pb2_grpc.TrainerServiceStub(api.channel).SubmitTrainingJob(
            trainer_pb2.SubmitTrainingJobRequest(
                base_model=str(tiny_llama), dataset_uri=str(dataset), adapter_name="after-outage",
                lora=trainer_pb2.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                training=trainer_pb2.TrainingConfig(max_steps=2, batch_size=2, max_seq_len=32)), timeout=30)
        jobs = jobs_pb2_grpc.JobServiceStub(api.channel)

        def finished():
            j = jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.id), timeout=10)
            return j if j.state in (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED) else None

        done = wait_for(finished, 240, "the training job")
        assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, (done.message, worker.log()[-3000:])
        assert done.attempt == 1  # ran once, by the worker that started without Redis
        client = redis.Redis.from_url(restartable.url)
        queue = JobQueue(client, "train")
        assert client.xpending(queue.stream_key, "workers")["pending"] == 0
        assert restartable.password not in worker.log()
    finally:
        if api is not None:
            api.stop()
        worker.stop()


def test_sigterm_during_the_backoff_ends_the_worker_promptly(restartable, tmp_path):
    metrics_port = free_port()
    worker = ServiceProcess("compiler", "worker", restartable.url, tmp_path, "--metrics-port", str(metrics_port))
    try:
        wait_for(lambda: "retrying with backoff" in worker.log(), 60, "the worker to say it is retrying")
        # The default grace: not ready, but live while the outage is young.
        assert _get(metrics_port, "/readyz")[0] == 503
        assert _get(metrics_port, "/healthz") == (200, "live\n")
        worker.proc.send_signal(signal.SIGTERM)
        try:
            code = worker.proc.wait(20)  # the backoff waits on the stop flag, so this is far more than needed
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker ignored SIGTERM while retrying:\n{worker.log()[-2000:]}")
        assert code == 0, worker.log()[-2000:]
        assert "stopping the worker" in worker.log()
    finally:
        worker.stop()


def test_liveness_follows_the_grace_and_a_dead_loop():
    health = ProcessHealth(liveness_grace=3600)
    health.set_working(False)
    assert health.liveness()[0] is True  # an outage younger than the grace: not ready, still live
    assert health.readiness() == (False, "not ready")
    health.configure(0)
    live, text = health.liveness()
    assert not live and "unable to work" in text
    health.set_working(True)
    health.set_ready(True)
    assert health.liveness() == (True, "live") and health.readiness() == (True, "ready")
    health.mark_dead("the train worker loop died")
    assert health.liveness() == (False, "not live: the train worker loop died")
    assert health.readiness()[0] is False


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), 86_401, "10"])
def test_liveness_grace_out_of_bounds_names_the_field(bad):
    with pytest.raises(InvalidArgument) as err:
        check_liveness_grace(bad)
    assert err.value.field == "liveness_grace"


def test_liveness_grace_flag_is_bounded(tmp_path):
    from loraflow.jobs.queue_service import parse_args
    from services.compiler.__main__ import SPEC

    with pytest.raises(SystemExit):
        parse_args(SPEC, ["worker", "--liveness-grace", "-5"])
    assert parse_args(SPEC, ["worker", "--liveness-grace", "30"]).liveness_grace == 30.0


def test_inference_replica_started_without_redis_waits_not_ready_then_converges(restartable, tmp_path):
    from grpc_health.v1 import health_pb2

    metrics_port = free_port()
    replica = ServiceProcess("inference", "all", restartable.url, tmp_path, "--deployment", "retry-test",
                             "--metrics-port", str(metrics_port))
    try:
        replica.wait_health(health_pb2.HealthCheckResponse.NOT_SERVING, timeout=60)
        wait_for(lambda: "reconciler: redis unreachable" in replica.log(), 30, "the reconciler to say it retries")
        assert _get(metrics_port, "/readyz")[0] == 503
        assert _metric(metrics_port, "loraflow_redis_up") == "loraflow_redis_up 0.0"
        assert replica.proc.poll() is None
        restartable.start()
        # Nothing desired for this deployment: ready as soon as Redis answers and the reconciler has looked.
        replica.wait_health(health_pb2.HealthCheckResponse.SERVING, timeout=30)
        assert _get(metrics_port, "/readyz")[0] == 200
        assert _metric(metrics_port, "loraflow_inference_converged") == "loraflow_inference_converged 1.0"
    finally:
        replica.stop()
    assert replica.proc.returncode == 0, replica.log()[-2000:]
