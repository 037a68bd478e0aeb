"""The issue's proof that streams cannot starve a server: 64 Generate streams whose client never reads plus
64 WatchJob watchers, open at once on one server, while health Check and GetJob on a new connection each
answer within a second; the streams beyond the cap are RESOURCE_EXHAUSTED; cancelling frees the engine."""

from __future__ import annotations

import time

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraflow.jobs.job_service import add_job_service
from loraflow.jobs.queue import JobQueue
from loraflow.jobs.registry import ArtifactRecord, Registry
from loraflow.security.settings import SecuritySettings
from loraflow.server.grpc_server import GrpcServer, error_info
from loraflow.storage.store import open_store
from loraflow.v1 import inference_pb2 as pb
from loraflow.v1 import inference_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from services.inference.model_manager import ModelManager
from services.inference.server import SERVICE_NAME, InferenceServicer
from tests.support.polling import wait_for

GENERATE_STREAMS = WATCHERS = 64
# A client that reads nothing: a tiny read-ahead window and no window growth, so the server's writes stall.
NON_READING = [("grpc.http2.lookahead_bytes", 256), ("grpc.http2.bdp_probe", 0)]


@pytest.fixture
def stack(tiny_artifact, redis_url, tmp_path):
    artifact_dir, manifest = tiny_artifact
    store = open_store((tmp_path / "store").as_uri())
    uri = store.publish_dir(f"artifacts/{manifest.artifact_id}", artifact_dir)
    client = redis.Redis.from_url(redis_url)
    registry = Registry(client)
    registry.put_artifact(ArtifactRecord(artifact_id=manifest.artifact_id, uri=uri,
                                         base_model=manifest.base_model.source))
    queue = JobQueue(client, "train")
    server = GrpcServer("127.0.0.1:0", [SERVICE_NAME, "loraflow.v1.JobService"],
                        security=SecuritySettings(max_concurrent_streams=GENERATE_STREAMS + WATCHERS))
    manager = ModelManager(store=store, registry=registry, cache_dir=tmp_path / "cache",
                           max_waiting=GENERATE_STREAMS + 8)
    server.add(inference_pb2_grpc.add_InferenceServiceServicer_to_server, InferenceServicer(manager))
    add_job_service(server, {"train": queue})
    server.start()
    channel = grpc.insecure_channel(server.address)
    inference_pb2_grpc.InferenceServiceStub(channel).LoadArtifact(
        pb.LoadArtifactRequest(artifact_id=manifest.artifact_id, model_id="m", num_threads=1), timeout=120)
    yield {"server": server, "queue": queue, "manager": manager}
    channel.close()
    server.stop(0).wait()
    manager.close()




def within_a_second(fn) -> None:
    started = time.monotonic()
    fn()
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, f"took {elapsed:.2f}s"


def test_unread_generate_streams_and_watchers_do_not_starve_health_or_getjob(stack):
    server, queue, manager = stack["server"], stack["queue"], stack["manager"]
    job = queue.submit({"n": 1})  # never picked up: its watchers stay open
    engine = manager.get("m").engine
    readers = grpc.insecure_channel(server.address, options=NON_READING)
    generate = inference_pb2_grpc.InferenceServiceStub(readers).Generate
    watch = jobs_pb2_grpc.JobServiceStub(readers).WatchJob
    request = pb.GenerateRequest(model_id="m", prompt="the quick brown fox",
                                 sampling=pb.SamplingParams(max_new_tokens=1000, ignore_eos=True))
    # Calls start on invocation; nobody ever iterates the Generate ones.
    streams = [generate(request, timeout=120) for _ in range(GENERATE_STREAMS)]
    watchers = [watch(jobs_pb2.WatchJobRequest(job_id=job.id), timeout=120) for _ in range(WATCHERS)]
    try:
        wait_for(lambda: server.active_streams == GENERATE_STREAMS + WATCHERS)
        # The engine produces every token (the context bounds each request); the streams stay open because
        # the server's writes wait for a reader that never reads.
        wait_for(lambda: engine.scheduler.num_running == 0 and engine.scheduler.num_waiting == 0, 60)
        assert server.active_streams == GENERATE_STREAMS + WATCHERS
        with grpc.insecure_channel(server.address) as fresh:
            health = health_pb2_grpc.HealthStub(fresh)
            jobs = jobs_pb2_grpc.JobServiceStub(fresh)
            for _ in range(5):
                within_a_second(lambda: health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                     timeout=1))
                within_a_second(lambda: jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.id), timeout=1))
            # The streams are still held while health and GetJob answered: every slot is taken.
            assert server.active_streams == GENERATE_STREAMS + WATCHERS
            # One more stream of either kind is turned away rather than queued.
            extra = inference_pb2_grpc.InferenceServiceStub(fresh).Generate(request, timeout=5)
            with pytest.raises(grpc.RpcError) as err:
                next(extra)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error_info(err.value).reason == "TOO_MANY_STREAMS"
            with pytest.raises(grpc.RpcError) as err:
                next(jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id), timeout=5))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for call in [*streams, *watchers]:
            call.cancel()
    wait_for(lambda: server.active_streams == 0)  # cancelled streams give their slots back
    # A stalled stream also ends at its deadline, although its client never reads nor cancels.
    stalled = [generate(request, timeout=1.5) for _ in range(4)]
    wait_for(lambda: server.active_streams == 4)
    wait_for(lambda: server.active_streams == 0, timeout=10)
    for call in stalled:
        assert call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    readers.close()
