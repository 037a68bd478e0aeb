"""A real trainer process (`python -m services.trainer all`) training a tiny model while its Redis is
SIGKILLed and restarted from its append-only file: the job pauses, then succeeds once, on attempt 1."""

from __future__ import annotations

import time

from grpc_health.v1 import health_pb2

from loraflow.storage.store import open_store
from loraflow.v1 import jobs_pb2, jobs_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from tests.backbone.redis_faults_support import RestartableRedis, ServiceProcess
from tests.support.polling import wait_for
from tests.trainer.conftest import memorisable_lines


def test_training_job_survives_a_redis_sigkill_and_succeeds_once(tmp_path, tiny_llama, allowed_root):
    dataset = tmp_path / "data.jsonl"
    dataset.write_text("\n".join(memorisable_lines()) + "\n")
    restartable = RestartableRedis(tmp_path / "redis-data").start()
    service = ServiceProcess("trainer", "all", restartable.url, tmp_path, "--allow-local-paths", allowed_root,
                             "--lease-seconds", "3", "--report-every-steps", "1")
    try:
        service.wait_health(health_pb2.HealthCheckResponse.SERVING, timeout=90)
        trainer = trainer_pb2_grpc.TrainerServiceStub(service.channel)
        jobs = jobs_pb2_grpc.JobServiceStub(service.channel)
        job = trainer.SubmitTrainingJob(trainer_pb2.SubmitTrainingJobRequest(
            base_model=str(tiny_llama), dataset_uri=str(dataset), adapter_name="blip",
            lora=trainer_pb2.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
            training=trainer_pb2.TrainingConfig(max_steps=400, batch_size=2, max_seq_len=32,
                                                checkpoint_every_steps=10_000)), timeout=30)

        def get():
            return jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.id), timeout=10)

        wait_for(lambda: get().progress >= 0.1, 120, "training to be under way")
        before = get()
        assert before.state == jobs_pb2.JOB_STATE_RUNNING and before.progress < 0.9, before
        restartable.kill()
        time.sleep(1.5)
        restartable.start()
        done = wait_for(lambda: (j := get()).state in (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED,
                                                       jobs_pb2.JOB_STATE_CANCELLED) and j, 180, "the job to end")
        log = service.log()
        assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, (done.error, log[-3000:])
        assert done.attempt == 1, "the outage must not cost an attempt"
        assert "redis unreachable" in log, "the outage must have hit the running job"
        assert "crashed" not in log and "re-queued" not in log
        events = list(jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id), timeout=30))
        assert [e.state for e in events].count(jobs_pb2.JOB_STATE_SUCCEEDED) == 1
        assert not any("crashed" in e.message or "re-queued" in e.message for e in events)
        adapter = trainer.GetAdapter(trainer_pb2.GetAdapterRequest(name="blip"), timeout=10)
        assert adapter.uri == done.train_result.adapter_uri
        # Exactly one published adapter directory: one result, nothing orphaned by the blip.
        assert len(open_store((tmp_path / "store").as_uri()).list_dirs("adapters/blip")) == 1
        assert restartable.password not in log
    finally:
        service.stop()
        restartable.stop()
