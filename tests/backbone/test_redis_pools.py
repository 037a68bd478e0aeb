"""Redis connections sized from the server's own caps, with a real redis-server and real gRPC streams:
WatchJob at the stream cap plus unary load never runs the pool dry (no UNAVAILABLE), and a running job's
lease renewals have connections no client load, and no handler, can take."""

from __future__ import annotations

import logging
import threading
import time

import grpc
import pytest
import redis

from loraflow.jobs.job_service import SERVICE_NAME, add_job_service
from loraflow.jobs.queue import JobQueue, JobWorker
from loraflow.jobs.queue_service import API_UNARY_THREADS, ServiceRedis
from loraflow.options.config import LIVENESS_REDIS_CONNECTIONS, api_redis_connections, connect_redis
from loraflow.security.settings import DEFAULT_MAX_CONCURRENT_STREAMS, SecuritySettings
from loraflow.server.grpc_server import GrpcServer
from loraflow.v1 import jobs_pb2, jobs_pb2_grpc

LEASE = 1.5  # renewed every 0.5 s; another worker takes the job over after 4.5 s without a renewal
CAP = DEFAULT_MAX_CONCURRENT_STREAMS


def _finished(queue: JobQueue, job_id: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while (job := queue.get(job_id)).state not in ("SUCCEEDED", "FAILED", "CANCELLED"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


class Takeover:
    """A second worker reaping fast: it takes the job over the moment its lease is not renewed."""

    def __init__(self, redis_url: str):
        self.client = redis.Redis.from_url(redis_url)
        self.ran = threading.Event()
        self.stop = threading.Event()

        def handler(ctx):
            self.ran.set()
            return {}

        queue = JobQueue(self.client, "train", lease_seconds=LEASE)
        self.worker = JobWorker(queue, handler, stop_event=self.stop, poll_ms=100, reaper_interval=0.2)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)
        self.client.close()


def test_the_pools_are_sized_from_the_caps(redis_url):
    clients = ServiceRedis.connect(redis_url, api=True, worker=True, max_concurrent_streams=CAP)
    try:
        assert clients.api.connection_pool.max_connections == api_redis_connections(CAP, API_UNARY_THREADS) > CAP
        assert clients.liveness.connection_pool.max_connections == LIVENESS_REDIS_CONNECTIONS
        assert len({id(c.connection_pool) for c in (clients.api, clients.worker, clients.liveness)}) == 3
    finally:
        clients.close()
    only_api = ServiceRedis.connect(redis_url, api=True, worker=False, max_concurrent_streams=4)
    assert only_api.worker is None and only_api.liveness is None
    assert only_api.api.connection_pool.max_connections == 4 + API_UNARY_THREADS + 8
    only_api.close()


def test_watch_streams_at_the_cap_and_unary_load_never_exhaust_redis_nor_the_lease(redis_url, caplog):
    clients = ServiceRedis.connect(redis_url, api=True, worker=True, max_concurrent_streams=CAP)
    api_queue = JobQueue(clients.api, "train", lease_seconds=LEASE)
    worker_queue = JobQueue(clients.worker, "train", lease_seconds=LEASE, liveness_redis=clients.liveness)
    server = GrpcServer("127.0.0.1:0", [SERVICE_NAME], max_workers=API_UNARY_THREADS,
                        security=SecuritySettings(max_concurrent_streams=CAP))
    add_job_service(server, {"train": api_queue})
    server.start()
    started, release = threading.Event(), threading.Event()

    def handler(ctx):
        started.set()
        while not release.is_set():  # a long job: its lease must be renewed all along
            ctx.check()
            time.sleep(0.1)
        return {"ok": 1}

    stop = threading.Event()
    worker = JobWorker(worker_queue, handler, stop_event=stop, poll_ms=100, reaper_interval=0.2)
    worker_thread = threading.Thread(target=worker.run, daemon=True)
    worker_thread.start()
    job = api_queue.submit({"n": 1})
    assert started.wait(30)
    channels = [grpc.insecure_channel(server.address) for _ in range(8)]
    caplog.set_level(logging.WARNING, logger="loraflow.jobs.queue")
    try:
        with Takeover(redis_url) as other:
            stubs = [jobs_pb2_grpc.JobServiceStub(c) for c in channels]
            watchers = [stubs[i % 8].WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id), timeout=120)
                        for i in range(CAP)]
            for w in watchers:  # every stream at the cap is served: each replays the job's events
                assert next(w).job_id == job.id
            assert server.active_streams == CAP
            errors: list[grpc.StatusCode] = []
            latencies: list[float] = []

            def unary_load(stub) -> None:
                for _ in range(25):
                    t0 = time.monotonic()
                    try:
                        stub.GetJob(jobs_pb2.GetJobRequest(job_id=job.id), timeout=10)
                        stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=5), timeout=10)
                    except grpc.RpcError as err:
                        errors.append(err.code())
                    latencies.append(time.monotonic() - t0)

            load = [threading.Thread(target=unary_load, args=(s,)) for s in stubs]
            for t in load:
                t.start()
            time.sleep(4 * LEASE)  # longer than a takeover needs if one renewal failed
            for t in load:
                t.join(60)
            assert errors == [] and max(latencies) < 5.0, (errors, max(latencies))
            release.set()
            for w in watchers:  # and every stream follows the job to its end
                assert list(w)[-1].state == jobs_pb2.JOB_STATE_SUCCEEDED
            done = _finished(api_queue, job.id)
            assert done.state == "SUCCEEDED" and done.attempt == 1 and not other.ran.is_set()
        assert not [r for r in caplog.records if "lease renewal" in r.getMessage()]
    finally:
        release.set()
        for c in channels:
            c.close()
        stop.set()
        worker_thread.join(10)
        server.stop(0)
        clients.close()


def test_lease_renewals_go_through_while_every_other_connection_is_taken(redis_url):
    """A handler (or client load) holding every connection of the worker's pool cannot stop its renewals."""
    worker_client = connect_redis(redis_url, max_connections=4, pool_wait_s=0.5)
    liveness = connect_redis(redis_url, max_connections=LIVENESS_REDIS_CONNECTIONS)
    queue = JobQueue(worker_client, "train", lease_seconds=LEASE, liveness_redis=liveness)
    pool = worker_client.connection_pool
    held: list = []
    taken = threading.Event()

    def handler(ctx):
        while True:  # take every connection the worker's pool has left
            try:
                held.append(pool.get_connection())
            except redis.ConnectionError:
                break
        taken.set()
        time.sleep(4 * LEASE)
        for conn in held:
            pool.release(conn)
        return {"ok": 1}

    stop = threading.Event()
    worker = JobWorker(queue, handler, stop_event=stop, poll_ms=100)
    thread = threading.Thread(target=worker.run, daemon=True)
    try:
        job = queue.submit({"n": 1})
        thread.start()
        assert taken.wait(30) and held, "the handler took the pool's connections"
        observer = JobQueue(redis.Redis.from_url(redis_url), "train")  # the test's own eyes, not the held pool
        with Takeover(redis_url) as other:  # started once the job runs here, so it can only take it over
            done = _finished(observer, job.id)
            assert done.state == "SUCCEEDED" and done.attempt == 1 and not other.ran.is_set()
    finally:
        stop.set()
        thread.join(10)
        worker_client.close()
        liveness.close()


def test_a_pool_without_a_free_connection_waits_then_is_unavailable(redis_url):
    client = connect_redis(redis_url, max_connections=1, pool_wait_s=0.3)
    conn = client.connection_pool.get_connection()
    try:
        t0 = time.monotonic()
        with pytest.raises(redis.ConnectionError):
            client.ping()
        assert 0.25 <= time.monotonic() - t0 < 5
    finally:
        client.connection_pool.release(conn)
    assert client.ping()
    client.close()
