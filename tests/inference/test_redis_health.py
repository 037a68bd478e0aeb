"""python -m services.inference with a model loaded: health is SERVING only while Redis answers too
(Redis SIGKILLed → NOT_SERVING and registry RPCs UNAVAILABLE; restarted from its AOF → SERVING)."""

from __future__ import annotations

import grpc
import redis
from grpc_health.v1 import health_pb2

from loraflow.jobs.registry import ArtifactRecord, Registry
from loraflow.storage.store import open_store
from loraflow.v1 import inference_pb2 as pb
from loraflow.v1 import inference_pb2_grpc
from tests.backbone.redis_faults_support import RestartableRedis, ServiceProcess

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_health_needs_both_a_model_and_redis(tiny_artifact, tmp_path):
    artifact_dir, manifest = tiny_artifact
    uri = open_store((tmp_path / "store").as_uri()).publish_dir(f"artifacts/{manifest.artifact_id}", artifact_dir)
    restartable = RestartableRedis(tmp_path / "redis-data").start()
    Registry(redis.Redis.from_url(restartable.url)).put_artifact(
        ArtifactRecord(artifact_id=manifest.artifact_id, uri=uri, base_model="tiny"))
    plain = ServiceProcess("inference", "all", restartable.url, tmp_path, "--num-threads", "1")
    loaded = ServiceProcess("inference", "all", restartable.url, tmp_path, "--num-threads", "1",
                            "--load", f"{manifest.artifact_id}@cpu")
    try:
        loaded.wait_health(SERVING, timeout=90)
        # Redis is fine, but no model is loaded (polled: a first call on a loaded host may time out)
        plain.wait_health(NOT_SERVING, timeout=20)
        restartable.kill()
        loaded.wait_health(NOT_SERVING, timeout=10)
        stub = inference_pb2_grpc.InferenceServiceStub(plain.channel)
        try:
            stub.LoadArtifact(pb.LoadArtifactRequest(artifact_id=manifest.artifact_id, device="cpu"), timeout=20)
            raise AssertionError("LoadArtifact succeeded without Redis")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
        restartable.start()
        loaded.wait_health(SERVING, timeout=15)
        plain.wait_health(NOT_SERVING, timeout=20)
        assert restartable.password not in loaded.log()
    finally:
        plain.stop()
        loaded.stop()
        restartable.stop()
