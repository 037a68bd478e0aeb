"""Property-based fuzzing of every RPC of every service (trainer, compiler, inference, jobs, storage) with
request messages drawn from their descriptors, against real servers on loopback.

For each example: the answer is OK or a canonical status a client can act on — never INTERNAL, UNKNOWN,
DATA_LOSS or UNIMPLEMENTED — and a refusal carries the ErrorInfo (an INVALID_ARGUMENT names its field);
meanwhile a health check on its own connection keeps answering within the probe bound, and the process's
RSS stays within a bound of where it started. Examples per RPC: LORAFLOW_FUZZ_EXAMPLES (default 30;
derandomized, so CI runs the same cases; raise it locally to search wider).
"""

from __future__ import annotations

import os
import time

import grpc
import pytest
import redis
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraflow.server.grpc_server import error_info
from loraflow.v1 import compiler_pb2, inference_pb2, jobs_pb2, storage_pb2, trainer_pb2
from tests.hardening.conftest import (
    MODEL_ID,
    build_queue_stacks,
    close_queue_stacks,
    inference_stack_factory_for,
)
from tests.hardening.probes import grpc_health_probe, rss_bytes
from tests.hardening.proto_strategies import messages

EXAMPLES = int(os.environ.get("LORAFLOW_FUZZ_EXAMPLES", "30"))
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS,
         grpc.StatusCode.UNIMPLEMENTED}
# Core statuses that carry no ErrorInfo: our own deadline or cancel of a stream we stopped reading.
CLIENT_SIDE = {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
UNARY_TIMEOUT_S = 20.0
STREAM_WINDOW_S = 1.5  # how long a response stream is read before the client cancels it
RSS_GROWTH_BOUND = 400 << 20

# (which server, service descriptor): each service fuzzed on one process that serves it.
SERVICES = [
    ("trainer", trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"]),
    ("trainer", jobs_pb2.DESCRIPTOR.services_by_name["JobService"]),
    ("compiler", compiler_pb2.DESCRIPTOR.services_by_name["CompilerService"]),
    ("compiler", storage_pb2.DESCRIPTOR.services_by_name["StorageService"]),
    ("inference", inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]),
]
# Run last on its server: unloading the model shortens what the other inference RPCs reach.
LAST = {"UnloadModel"}
METHODS = sorted(((where, method) for where, service in SERVICES for method in service.methods),
                 key=lambda item: (item[1].name in LAST, item[1].full_name))


def _requests(request) -> list:
    return [request] if isinstance(request, inference_pb2.GenerateRequest) else list(request.requests)


def _on_the_model(request):
    """Generation examples that address the loaded model, so they reach sampling checks and the engine."""
    for one in _requests(request):
        one.model_id = MODEL_ID
    return request


def _plainly_sampled(request):
    """...and some with everything but the prompt left to defaults, so they are generated."""
    for one in _on_the_model(request) and _requests(request):
        one.adapter, one.request_id = "", ""
        one.sampling.CopyFrom(inference_pb2.SamplingParams(max_new_tokens=8))
    return request


FOCUS = {"Generate": (_on_the_model, _plainly_sampled), "GenerateBatch": (_on_the_model, _plainly_sampled)}


@pytest.fixture(scope="module")
def servers(redis_server, bare_artifact, tmp_path_factory, input_policy):
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    root = tmp_path_factory.mktemp("fuzz")
    queues = build_queue_stacks(redis_server.url, root / "queues", input_policy)
    make, stacks = inference_stack_factory_for(bare_artifact, redis_server.url, root / "inference")
    inference = make()
    job = queues["trainer"].queue.submit({"n": 1})  # a real id, so examples get past "not found"
    known = {"trainer": [job.id, "train", "tiny-adapter"], "compiler": ["compile", "model", "weights.bin"],
             "inference": [MODEL_ID, "cpu", "the quick brown fox"]}
    addresses = {"trainer": queues["trainer"].server.address, "compiler": queues["compiler"].server.address,
                 "inference": inference.grpc.address}
    channels = {name: grpc.insecure_channel(address) for name, address in addresses.items()}
    yield {"addresses": addresses, "channels": channels, "known": known, "rss_start": rss_bytes()}
    for channel in channels.values():
        channel.close()
    for stack in stacks:
        stack.close()
    close_queue_stacks(queues)
    client.close()


def _call(channel: grpc.Channel, method, request) -> grpc.StatusCode:
    path = f"/{method.containing_service.full_name}/{method.name}"
    serialize = lambda message: message.SerializeToString()  # noqa: E731
    deserialize = GetMessageClass(method.output_type).FromString
    try:
        if method.client_streaming:
            call = channel.stream_unary(path, serialize, deserialize)
            call(iter(request), timeout=UNARY_TIMEOUT_S)
            return grpc.StatusCode.OK
        if not method.server_streaming:
            channel.unary_unary(path, serialize, deserialize)(request, timeout=UNARY_TIMEOUT_S)
            return grpc.StatusCode.OK
        stream = channel.unary_stream(path, serialize, deserialize)(request, timeout=STREAM_WINDOW_S)
        for _ in stream:
            pass
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        code = err.code()
        assert code not in NEVER, f"{path} answered {code.name}: {err.details()}"
        if code in CLIENT_SIDE:
            return code
        info = error_info(err)
        assert info is not None and info.domain == "loraflow", f"{path} {code.name} without ErrorInfo: {err.details()}"
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert info.metadata.get("field"), f"{path} INVALID_ARGUMENT names no field: {err.details()}"
        return code


@pytest.mark.parametrize("where,method", METHODS, ids=[m.full_name for _, m in METHODS])
def test_every_rpc_answers_canonical_statuses_to_any_request(servers, where, method):
    request_type = method.input_type
    strategy = messages(request_type, servers["known"][where])
    if method.name in FOCUS:
        strategy = st.one_of(strategy, *(strategy.map(focus) for focus in FOCUS[method.name]))
    if method.client_streaming:
        strategy = st.lists(strategy, min_size=1, max_size=4)
    codes: list[grpc.StatusCode] = []

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(request=strategy)
    def one(request) -> None:
        codes.append(_call(servers["channels"][where], method, request))

    with grpc_health_probe(servers["addresses"][where]) as probe:
        started = time.monotonic()
        one()
        elapsed = time.monotonic() - started
    probe.assert_unharmed()
    assert codes and elapsed < EXAMPLES * (UNARY_TIMEOUT_S + 5)
    growth = rss_bytes() - servers["rss_start"]
    assert growth < RSS_GROWTH_BOUND, f"RSS grew by {growth >> 20} MiB since the fuzzing began"
