"""JobService over a real gRPC server on loopback, with real Redis."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import redis

from loraflow.jobs.job_service import SERVICE_NAME, add_job_service, job_to_proto
from loraflow.jobs.queue import JobQueue, JobWorker
from loraflow.server.grpc_server import GrpcServer, error_info
from loraflow.v1 import jobs_pb2, jobs_pb2_grpc


@pytest.fixture
def queues(redis_url):
    client = redis.Redis.from_url(redis_url)
    return {"train": JobQueue(client, "train", lease_seconds=1.0), "compile": JobQueue(client, "compile")}


@pytest.fixture
def stub(queues):
    server = GrpcServer("127.0.0.1:0", [SERVICE_NAME], max_workers=8)
    add_job_service(server, queues)
    port = server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield jobs_pb2_grpc.JobServiceStub(channel)
    channel.close()
    server.stop(0).wait()


def expect_error(call, code: grpc.StatusCode, field: str | None = None):
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "DESCRIPTOR"):
            list(result)
    err = info.value
    assert err.code() == code, (err.code(), err.details())
    detail = error_info(err)
    assert detail is not None and detail.domain == "loraflow"
    if field is not None:
        assert detail.metadata["field"] == field, detail
    return err


def test_get_and_cancel_return_the_job(stub, queues):
    job = queues["train"].submit({"x": 1}, request_id="r1", labels={"who": "me"})
    got = stub.GetJob(jobs_pb2.GetJobRequest(job_id=job.id), timeout=5)
    assert got == job_to_proto(job)
    assert got.kind == jobs_pb2.JOB_KIND_TRAIN and got.state == jobs_pb2.JOB_STATE_QUEUED
    assert got.request_id == "r1" and dict(got.labels) == {"who": "me"}
    assert got.create_time.seconds > 0 and not got.HasField("start_time")
    cancelled = stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.id), timeout=5)
    assert cancelled.state == jobs_pb2.JOB_STATE_CANCELLED and cancelled.HasField("end_time")
    err = expect_error(lambda: stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.id), timeout=5),
                       grpc.StatusCode.FAILED_PRECONDITION, "job_id")
    assert "CANCELLED" in err.details()


def test_results_map_to_the_oneof(stub, queues):
    train = queues["train"].submit_succeeded({}, {"adapter_name": "a", "adapter_uri": "file:///a",
                                                  "metrics": {"train_loss": 0.5}, "extra": 1})
    comp = queues["compile"].submit_succeeded({}, {"artifact_id": "abc", "artifact_uri": "s3://b/abc",
                                                   "cache_hit": True})
    t = stub.GetJob(jobs_pb2.GetJobRequest(job_id=train.id), timeout=5)
    assert t.WhichOneof("result") == "train_result" and t.train_result.metrics["train_loss"] == 0.5
    c = stub.GetJob(jobs_pb2.GetJobRequest(job_id=comp.id), timeout=5)
    assert c.WhichOneof("result") == "compile_result" and c.compile_result.cache_hit


def test_list_jobs_filters_and_pages(stub, queues):
    ids = [queues["train"].submit({}).id for _ in range(5)]
    cid = queues["compile"].submit({}).id
    queues["train"].cancel(ids[0])
    resp = stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=4), timeout=5)
    assert [j.id for j in resp.jobs] == [cid, *ids[::-1][:3]] and resp.next_page_token
    resp2 = stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=4, page_token=resp.next_page_token), timeout=5)
    assert [j.id for j in resp2.jobs] == ids[1::-1] and resp2.next_page_token == ""
    only = stub.ListJobs(jobs_pb2.ListJobsRequest(kind=jobs_pb2.JOB_KIND_TRAIN,
                                                  state=jobs_pb2.JOB_STATE_CANCELLED), timeout=5)
    assert [j.id for j in only.jobs] == [ids[0]]


@pytest.mark.parametrize("call, code, field", [
    (lambda s: s.GetJob(jobs_pb2.GetJobRequest(job_id=""), timeout=5), "INVALID_ARGUMENT", "job_id"),
    (lambda s: s.GetJob(jobs_pb2.GetJobRequest(job_id="../../etc/passwd"), timeout=5), "INVALID_ARGUMENT", "job_id"),
    (lambda s: s.GetJob(jobs_pb2.GetJobRequest(job_id="x" * 200_000), timeout=5), "INVALID_ARGUMENT", "job_id"),
    (lambda s: s.GetJob(jobs_pb2.GetJobRequest(job_id="train-0000000000000000"), timeout=5), "NOT_FOUND", "job_id"),
    (lambda s: s.GetJob(jobs_pb2.GetJobRequest(job_id="bake-1"), timeout=5), "NOT_FOUND", "job_id"),
    (lambda s: s.CancelJob(jobs_pb2.CancelJobRequest(job_id=""), timeout=5), "INVALID_ARGUMENT", "job_id"),
    (lambda s: s.CancelJob(jobs_pb2.CancelJobRequest(job_id="train-missing"), timeout=5), "NOT_FOUND", "job_id"),
    (lambda s: s.ListJobs(jobs_pb2.ListJobsRequest(page_size=-1), timeout=5), "INVALID_ARGUMENT", "page_size"),
    (lambda s: s.ListJobs(jobs_pb2.ListJobsRequest(page_size=5000), timeout=5), "INVALID_ARGUMENT", "page_size"),
    (lambda s: s.ListJobs(jobs_pb2.ListJobsRequest(page_token="not-a-token"), timeout=5), "INVALID_ARGUMENT",
     "page_token"),
    (lambda s: s.ListJobs(jobs_pb2.ListJobsRequest(page_token="é" * 100_000), timeout=5), "INVALID_ARGUMENT",
     "page_token"),
    (lambda s: s.ListJobs(jobs_pb2.ListJobsRequest(state=42), timeout=5), "INVALID_ARGUMENT", "state"),
    (lambda s: s.ListJobs(jobs_pb2.ListJobsRequest(kind=9), timeout=5), "INVALID_ARGUMENT", "kind"),
    (lambda s: s.WatchJob(jobs_pb2.WatchJobRequest(job_id=""), timeout=5), "INVALID_ARGUMENT", "job_id"),
    (lambda s: s.WatchJob(jobs_pb2.WatchJobRequest(job_id="train-nope"), timeout=5), "NOT_FOUND", "job_id"),
    (lambda s: s.WatchJob(jobs_pb2.WatchJobRequest(job_id="train-nope", after_seq=-3), timeout=5),
     "INVALID_ARGUMENT", "after_seq"),
])
def test_malformed_requests_get_canonical_statuses(stub, call, code, field):
    err = expect_error(lambda: call(stub), getattr(grpc.StatusCode, code), field)
    assert "Traceback" not in err.details()


def test_watch_replays_then_follows_to_terminal(stub, queues):
    queue = queues["train"]
    job = queue.submit({})
    gate = threading.Event()

    def handler(ctx):
        ctx.report(0.5, "half", {"step": 1})
        assert gate.wait(10)
        ctx.report(0.9, "almost", {"step": 2})
        return {"adapter_name": "w"}

    worker = JobWorker(queue, handler, consumer="watch-w", poll_ms=50)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while queue.get(job.id).progress < 0.5 and time.monotonic() < deadline:
            time.sleep(0.02)
        stream = stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id), timeout=15)
        first = [next(stream) for _ in range(3)]  # replayed: QUEUED, RUNNING, half
        assert [e.seq for e in first] == [1, 2, 3] and first[2].message == "half"
        assert first[2].metrics["step"] == 1.0 and first[2].time.seconds > 0
        gate.set()  # now live events follow
        rest = list(stream)
    finally:
        gate.set()
        worker.stop()
        thread.join(5)
    assert [e.message for e in rest] == ["almost", "succeeded"]
    assert rest[-1].state == jobs_pb2.JOB_STATE_SUCCEEDED
    replay = list(stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id, after_seq=3), timeout=5))
    assert [e.seq for e in replay] == [4, 5]


def test_watch_ends_when_the_client_cancels(stub, queues, monkeypatch):
    queue = queues["train"]
    job = queue.submit({})  # never picked up: the watch would follow it forever
    ended = threading.Event()
    original = queue.watch

    def tracking_watch(*args, **kwargs):
        try:
            yield from original(*args, **kwargs)
        finally:
            ended.set()

    monkeypatch.setattr(queue, "watch", tracking_watch)
    stream = stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id))
    assert next(stream).state == jobs_pb2.JOB_STATE_QUEUED
    stream.cancel()
    with pytest.raises(grpc.RpcError) as info:
        next(stream)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    assert ended.wait(3), "server-side watch kept running after the client left"
