"""The stream cap: streams beyond --max-concurrent-streams are RESOURCE_EXHAUSTED, a slot comes back when a
stream ends however it ends (cancel, deadline, error, client gone), and held streams never delay health
or unary RPCs. Against a real JobService over a real Redis."""

from __future__ import annotations

import time

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from loraflow.jobs.job_service import SERVICE_NAME, add_job_service
from loraflow.jobs.queue import JobQueue
from loraflow.security.settings import SecuritySettings
from loraflow.server.grpc_server import GrpcServer, error_info
from loraflow.v1 import jobs_pb2, jobs_pb2_grpc
from tests.support.polling import wait_for

CAP = 4


@pytest.fixture
def queue(redis_url):
    return JobQueue(redis.Redis.from_url(redis_url), "train")


@pytest.fixture
def server(queue):
    srv = GrpcServer("127.0.0.1:0", [SERVICE_NAME], max_workers=2,
                     security=SecuritySettings(max_concurrent_streams=CAP))
    add_job_service(srv, {"train": queue})
    srv.start()
    yield srv
    srv.stop(0).wait()




def code_and_info(fn):
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), error_info(err.value)


def timed(fn) -> float:
    started = time.monotonic()
    fn()
    return time.monotonic() - started


def test_streams_beyond_the_cap_are_resource_exhausted_and_a_cancelled_one_frees_its_slot(server, queue):
    job = queue.submit({"n": 1})  # queued forever: its watchers never end on their own
    channel = grpc.insecure_channel(server.address)
    stub = jobs_pb2_grpc.JobServiceStub(channel)
    watchers = [stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id), timeout=60) for _ in range(CAP)]
    for w in watchers:
        assert next(w).state == jobs_pb2.JOB_STATE_QUEUED
    assert server.active_streams == CAP

    code, info = code_and_info(lambda: next(stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id), timeout=5)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.reason == "TOO_MANY_STREAMS" and dict(info.metadata) == {"max_concurrent_streams": str(CAP)}
    # Health Watch and reflection are streams too.
    health = health_pb2_grpc.HealthStub(channel)
    code, _ = code_and_info(lambda: next(health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    code, _ = code_and_info(lambda: next(reflect.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED

    # Unary RPCs and health, on a new connection, are not queued behind the held streams.
    with grpc.insecure_channel(server.address) as fresh:
        assert timed(lambda: health_pb2_grpc.HealthStub(fresh).Check(health_pb2.HealthCheckRequest(),
                                                                     timeout=1)) < 1.0
        assert timed(lambda: jobs_pb2_grpc.JobServiceStub(fresh).GetJob(jobs_pb2.GetJobRequest(job_id=job.id),
                                                                        timeout=1)) < 1.0

    watchers.pop().cancel()
    wait_for(lambda: server.active_streams == CAP - 1)
    replacement = stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id), timeout=60)
    assert next(replacement).job_id == job.id
    for w in [*watchers, replacement]:
        w.cancel()
    wait_for(lambda: server.active_streams == 0)
    channel.close()


def test_slots_come_back_after_deadline_error_and_a_vanished_client(server, queue):
    job = queue.submit({"n": 2})
    channel = grpc.insecure_channel(server.address)
    stub = jobs_pb2_grpc.JobServiceStub(channel)
    short = [stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id), timeout=0.5) for _ in range(CAP)]
    for w in short:
        code, _ = code_and_info(lambda w=w: list(w))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: server.active_streams == 0)

    code, _ = code_and_info(lambda: list(stub.WatchJob(jobs_pb2.WatchJobRequest(job_id="train-0000000000000000"),
                                                       timeout=5)))
    assert code == grpc.StatusCode.NOT_FOUND
    assert server.active_streams == 0

    other = grpc.insecure_channel(server.address)
    gone = [jobs_pb2_grpc.JobServiceStub(other).WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id), timeout=60)
            for _ in range(CAP)]
    for w in gone:
        next(w)
    assert server.active_streams == CAP
    other.close()  # the client goes away without cancelling anything itself
    wait_for(lambda: server.active_streams == 0)
    # The full cap is usable again.
    again = [stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id), timeout=60) for _ in range(CAP)]
    for w in again:
        next(w)
    for w in again:
        w.cancel()
    wait_for(lambda: server.active_streams == 0)
    channel.close()


def test_64_watchers_on_the_default_cap_leave_health_and_getjob_answering(queue):
    srv = GrpcServer("127.0.0.1:0", [SERVICE_NAME])  # defaults: 128 streams, 16 unary threads
    add_job_service(srv, {"train": queue})
    srv.start()
    job = queue.submit({"n": 3})
    try:
        channel = grpc.insecure_channel(srv.address)
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        watchers = [stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id), timeout=60) for _ in range(64)]
        wait_for(lambda: srv.active_streams == 64)
        with grpc.insecure_channel(srv.address) as fresh:
            for _ in range(3):
                assert timed(lambda: health_pb2_grpc.HealthStub(fresh).Check(health_pb2.HealthCheckRequest(),
                                                                             timeout=1)) < 1.0
                assert timed(lambda: jobs_pb2_grpc.JobServiceStub(fresh).GetJob(
                    jobs_pb2.GetJobRequest(job_id=job.id), timeout=1)) < 1.0
        for w in watchers:
            w.cancel()
        wait_for(lambda: srv.active_streams == 0)
        channel.close()
    finally:
        srv.stop(0).wait()
