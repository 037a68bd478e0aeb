"""Replicas that agree: inference servers of one deployment share its desired models through Redis.

Two replicas in this process (each its own gRPC server, ModelManager and cache, as two pods have) and a
third one a real `python -m services.inference --deployment` process started later, all on one real
Redis and one store holding a published artifact."""

from __future__ import annotations

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from loraflow.jobs.registry import ArtifactRecord
from loraflow.server.grpc_server import GrpcServer
from loraflow.v1 import inference_pb2 as pb
from loraflow.v1 import inference_pb2_grpc
from services.inference.desired_state import DesiredState
from services.inference.model_manager import ModelManager
from services.inference.reconciler import Reconciler
from services.inference.server import SERVICE_NAME, InferenceServicer
from tests.backbone.redis_faults_support import ServiceProcess
from tests.support.polling import wait_for

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DEPLOYMENT = "replicas-test"
PROMPT = "the quick brown fox"


class Replica:
    """One in-process inference replica of DEPLOYMENT."""

    def __init__(self, name: str, published_store, input_policy, redis_url: str, *, backoff_base_s: float = 1.0):
        self.server = GrpcServer(listen="127.0.0.1:0", service_names=[SERVICE_NAME])
        self.manager = ModelManager(store=published_store.store, registry=published_store.registry,
                                    cache_dir=published_store.root / f"cache-{name}", inputs=input_policy)
        self.client = redis.Redis.from_url(redis_url)
        self.reconciler = Reconciler(DesiredState(self.client, DEPLOYMENT), self.manager, poll_s=0.5,
                                     backoff_base_s=backoff_base_s, backoff_cap_s=max(60.0, backoff_base_s),
                                     on_converged=self.server.set_serving)
        self.server.add(inference_pb2_grpc.add_InferenceServiceServicer_to_server,
                        InferenceServicer(self.manager, self.reconciler))
        port = self.server.start(serving=False)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.reconciler.start()

    def close(self) -> None:
        self.reconciler.stop()
        assert not self.reconciler._thread.is_alive(), "the reconciler ignored its stop flag"
        self.channel.close()
        self.server.stop(grace=0)
        self.manager.close()
        self.client.close()


def _status(health) -> int:
    return health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status


def _models(stub) -> dict[str, list[str]]:
    return {m.model_id: sorted(a.name for a in m.adapters)
            for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}


def _tokens(stub, model_id: str, adapter: str = "") -> list[int]:
    request = pb.GenerateRequest(model_id=model_id, prompt=PROMPT, adapter=adapter,
                                 sampling=pb.SamplingParams(max_new_tokens=6, ignore_eos=True))
    return [t for chunk in stub.Generate(request, timeout=60) for t in chunk.token_ids]


@pytest.fixture
def deployment(published_store, redis_server):
    client = redis.Redis.from_url(redis_server.url)
    state = DesiredState(client, DEPLOYMENT)
    client.delete(state.desired_key, state.version_key)
    yield state
    client.delete(state.desired_key, state.version_key)
    client.close()


def test_a_load_through_one_replica_reaches_every_replica_and_a_late_one_converges(
        published_store, input_policy, redis_server, deployment, tmp_path):
    a = Replica("a", published_store, input_policy, redis_server.url)
    b = Replica("b", published_store, input_policy, redis_server.url)
    c = None
    try:
        # Nothing desired yet: ready.
        wait_for(lambda: _status(a.health) == SERVING and _status(b.health) == SERVING, 20, "empty replicas ready")
        artifact_id = published_store.artifact_id
        loaded = a.stub.LoadArtifact(pb.LoadArtifactRequest(artifact_id=artifact_id, model_id="m"), timeout=120)
        assert loaded.model_id == "m" and _models(a.stub) == {"m": ["alpha", "beta", "gamma"]}
        wait_for(lambda: "m" in _models(b.stub), 120, "replica B to load the model")
        wait_for(lambda: _status(b.health) == SERVING, 20, "replica B ready with the model")
        assert _tokens(b.stub, "m", "beta") == _tokens(a.stub, "m", "beta")

        # A hot-added adapter through B reaches A.
        b.stub.LoadAdapter(pb.LoadAdapterRequest(model_id="m", adapter="hot"), timeout=60)
        wait_for(lambda: "hot" in _models(a.stub)["m"], 60, "replica A to hot-add the adapter")
        assert _tokens(a.stub, "m", "hot") == _tokens(b.stub, "m", "hot")
        assert [x.name for x in deployment.get("m").adapters] == [""]  # LoadAdapter named no serving name
        assert deployment.get("m").adapters[0].adapter == "hot"

        # A third replica, a real process started later, converges by itself; SERVING only once it has.
        c = ServiceProcess("inference", "all", redis_server.url, tmp_path, "--deployment", DEPLOYMENT,
                           "--store-url", published_store.store.uri(),
                           "--allow-local-paths", str(published_store.root))
        c_stub = inference_pb2_grpc.InferenceServiceStub(c.channel)
        c.wait_health(SERVING, timeout=180)
        assert _models(c_stub) == {"m": ["alpha", "beta", "gamma", "hot"]}
        assert _tokens(c_stub, "m", "hot") == _tokens(a.stub, "m", "hot")

        # Unloading through A removes it everywhere.
        a.stub.UnloadModel(pb.UnloadModelRequest(model_id="m"), timeout=60)
        assert _models(a.stub) == {}
        wait_for(lambda: _models(b.stub) == {} and _models(c_stub) == {}, 60, "B and C to unload")
        assert deployment.models() == {}
    finally:
        if c is not None:
            c.stop()
        a.close()
        b.close()


def test_a_desired_artifact_that_fails_to_load_is_recorded_and_backed_off_not_hot_looped(
        published_store, input_policy, redis_server, deployment):
    # Registered, but its directory is not in the store: every load fails.
    published_store.registry.put_artifact(ArtifactRecord(
        artifact_id="broken", uri=published_store.store.uri("artifacts/broken"), base_model="x"))
    # A backoff far longer than the test: a second attempt could only come from a hot loop.
    a = Replica("fail", published_store, input_policy, redis_server.url, backoff_base_s=3600)
    try:
        wait_for(lambda: _status(a.health) == SERVING, 20, "the empty replica ready")
        # Through the RPC: the load's own error, as a single server gives it, and nothing left desired.
        with pytest.raises(grpc.RpcError) as err:
            a.stub.LoadArtifact(pb.LoadArtifactRequest(artifact_id="broken"), timeout=60)
        assert err.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)
        assert deployment.models() == {}
        with pytest.raises(grpc.RpcError) as err:
            a.stub.LoadArtifact(pb.LoadArtifactRequest(artifact_id="never-registered"), timeout=60)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and deployment.models() == {}

        # Desired by another replica (written straight to the desired state): recorded here, not ready.
        deployment.put_model("broken", "broken", "cpu")
        wait_for(lambda: "broken" in a.reconciler.failures(), 30, "the failure to be recorded")
        failure = a.reconciler.failures()["broken"]
        assert failure.attempts == 1 and "broken" in failure.error
        assert _status(a.health) == NOT_SERVING
        assert REGISTRY.get_sample_value("loraflow_inference_reconcile_failures", {"model": "broken"}) == 1
        # More change notifications come; the failed entry waits out its backoff instead of retrying.
        passes = a.reconciler.passes
        for _ in range(3):
            deployment.redis.incr(deployment.version_key)
            deployment.redis.publish(deployment.channel, "x")
        wait_for(lambda: a.reconciler.passes >= passes + 1, 30, "another reconcile pass")
        assert a.reconciler.failures()["broken"].attempts == 1
        # Withdrawn from the desired state: the failure is forgotten and the replica is ready again.
        deployment.remove_model("broken")
        wait_for(lambda: _status(a.health) == SERVING, 30, "ready once nothing fails")
        assert a.reconciler.failures() == {}
    finally:
        a.close()


def test_desired_state_validates_names_conflicts_and_bounds(redis_server, deployment):
    from loraflow.errors import AlreadyExists, InvalidArgument, NotFound
    from services.inference.desired_state import MAX_DESIRED_MODELS

    with pytest.raises(InvalidArgument) as err:
        DesiredState(deployment.redis, "no spaces allowed")
    assert err.value.field == "deployment"
    first = deployment.put_model("m", "art-1", "cpu")
    version = deployment.version()
    assert deployment.put_model("m", "art-1", "cpu") == first  # the same load twice: unchanged
    with pytest.raises(AlreadyExists) as err:
        deployment.put_model("m", "art-2", "cpu")
    assert err.value.field == "model_id"
    with pytest.raises(NotFound):
        deployment.add_adapter("other", "hot", "")
    grown = deployment.add_adapter("m", "hot", "")
    assert grown.generation == first.generation + 1 and grown.load_id == first.load_id
    assert deployment.add_adapter("m", "hot", "") == grown  # listed once
    assert deployment.version() > version
    # A planted entry is reported, not loaded.
    deployment.redis.hset(deployment.desired_key, "planted", '{"model_id": "../x", "artifact_id": "a"}')
    assert isinstance(deployment.models()["planted"], ValueError)
    deployment.redis.hdel(deployment.desired_key, "planted")
    for i in range(MAX_DESIRED_MODELS - 1):
        deployment.put_model(f"m{i}", "art-1", "cpu")
    with pytest.raises(InvalidArgument) as err:
        deployment.put_model("one-too-many", "art-1", "cpu")
    assert err.value.field == "model_id"
    assert deployment.remove_model("m").model_id == "m"
    with pytest.raises(NotFound):
        deployment.remove_model("m")
