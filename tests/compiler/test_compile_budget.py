"""Hostile base models and options against a real CompilerService (real gRPC, real Redis, a worker thread):
config.json is read strictly (INVALID_ARGUMENT, never INTERNAL), options whose adapter banks would not fit
the memory budget are RESOURCE_EXHAUSTED naming the option, the estimate and the limit before anything is
fetched or allocated, the worker re-checks a planted job, and other callers are not slowed."""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest
import redis

from loraflow.jobs.job_service import add_job_service
from loraflow.jobs.queue import JobQueue, JobWorker
from loraflow.jobs.registry import Registry
from loraflow.options.budget import ResourceBudget
from loraflow.server.grpc_server import GrpcServer, error_info
from loraflow.storage.store import open_store
from loraflow.v1 import compiler_pb2, compiler_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from services.compiler.inputs import CompileInputs
from services.compiler.server import SERVICE_NAME, CompilerServiceServicer
from services.compiler.worker import CompileHandler
from tests.support.polling import wait_for

BUDGET = ResourceBudget(1 << 30, "--memory-budget 1.0 GiB")


@pytest.fixture
def stack(redis_url, tmp_path, input_policy):
    client = redis.Redis.from_url(redis_url)
    store = open_store((tmp_path / "store").as_uri())
    registry = Registry(client)
    queue = JobQueue(client, "compile", lease_seconds=2.0)
    inputs = CompileInputs(store, registry, tmp_path / "cache", policy=input_policy, budget=BUDGET)
    server = GrpcServer("127.0.0.1:0", [SERVICE_NAME])
    server.add(compiler_pb2_grpc.add_CompilerServiceServicer_to_server,
               CompilerServiceServicer(queue, registry, store, inputs))
    add_job_service(server, {"compile": queue})
    port = server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stop = threading.Event()
    worker = JobWorker(queue, CompileHandler(store, registry, inputs, tmp_path / "cache"), stop_event=stop,
                       poll_ms=100)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()

    class S:
        pass

    s = S()
    s.queue, s.store, s.tmp = queue, store, tmp_path
    s.compiler = compiler_pb2_grpc.CompilerServiceStub(channel)
    s.jobs = jobs_pb2_grpc.JobServiceStub(channel)
    yield s
    stop.set()
    thread.join(10)
    channel.close()
    server.stop(0)


def _submit(stack, base, timeout=30, **options):
    return stack.compiler.SubmitCompileJob(compiler_pb2.SubmitCompileJobRequest(
        base_model=str(base), options=compiler_pb2.CompileOptions(**options)), timeout=timeout)


def _fails(stack, base, **options):
    with pytest.raises(grpc.RpcError) as err:
        _submit(stack, base, **options)
    return err.value.code(), error_info(err.value), err.value.details()


def _model(tmp_path, tiny_llama, name: str, text: str | None = None, **changes):
    model = tmp_path / name
    model.mkdir()
    if text is None:
        config = json.loads((tiny_llama / "config.json").read_text())
        config.update(changes)
        text = json.dumps(config)
    (model / "config.json").write_text(text)
    return model


@pytest.mark.parametrize(("text", "changes", "field", "why"), [
    ("{nope", {}, "base_model", "is not valid JSON at line 1"),
    ("[1, 2, 3]", {}, "base_model", "is not a JSON object"),
    ('{"model_type": "llama", "hidden_size": NaN}', {}, "base_model", "is not valid JSON"),
    (None, {"num_hidden_layers": "2"}, "base_model.num_hidden_layers", "must be an integer (not a string)"),
    (None, {"num_hidden_layers": 1_000_000}, "base_model.num_hidden_layers", "must be in 1..1024"),
    (None, {"rope_scaling": {"rope_type": "linear", "factor": [8]}}, "base_model.rope_scaling.factor", "number"),
    (None, {"rope_scaling": "yes"}, "base_model.rope_scaling", "must be an object or null"),
    (None, {"max_position_embeddings": 0}, "base_model.max_position_embeddings", "must be in 1.."),
    (None, {"attention_bias": "false"}, "base_model.attention_bias", "true or false"),
])
def test_a_malformed_config_is_invalid_argument_not_internal(stack, tiny_llama, text, changes, field, why):
    model = _model(stack.tmp, tiny_llama, "bad", text, **changes)
    code, info, details = _fails(stack, model)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and info.metadata["field"] == field and why in details, details
    assert stack.queue.list()[0] == []


def test_banks_over_the_budget_are_refused_naming_the_option_estimate_and_limit(stack, tiny_llama):
    # In range for every option (slots <= 1024, rank <= 512), but the banks alone are ~4.6 GB on this model.
    started = time.monotonic()
    code, info, details = _fails(stack, tiny_llama, adapter_slots=1024, max_rank=512)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert info.reason == "OVER_MEMORY_BUDGET" and info.metadata["field"] == "options.adapter_slots"
    assert int(info.metadata["estimate_bytes"]) > 4e9 and info.metadata["limit_bytes"] == str(1 << 30)
    assert "adapter banks" in details and "1.0 GiB" in details and "adapter_slots=1024" in info.metadata["value"]
    assert time.monotonic() - started < 10 and stack.queue.list()[0] == []
    # A long context on many slots is the KV cache's fault.
    code, info, details = _fails(stack, _model(stack.tmp, tiny_llama, "long", max_position_embeddings=131072),
                                 ctx_len=131072, full_batch_size=1024, batch_size=1)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and info.metadata["field"] == "options.ctx_len", details
    # The same model at sane options fits and queues.
    assert _submit(stack, tiny_llama, adapter_slots=4, max_rank=8, ctx_len=64, prefill_seq_len=8).id


def test_the_worker_refuses_a_planted_job_over_the_budget_before_allocating(stack, tiny_llama):
    from services.compiler.options import CompileOptions

    job = stack.queue.submit({"base_model": str(tiny_llama), "adapters": [],
                              "options": CompileOptions(adapter_slots=1024, max_rank=512).to_dict(),
                              "artifact_id": "planted"})
    deadline = time.monotonic() + 60
    while (got := stack.queue.get(job.id)).state not in ("FAILED", "SUCCEEDED") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert got.state == "FAILED" and "needs an estimated" in got.error and "adapter banks" in got.error, got.error


def test_hostile_submits_do_not_slow_other_callers(stack, tiny_llama):
    job = stack.queue.submit({"n": 1})
    big = _model(stack.tmp, tiny_llama, "wide", num_hidden_layers=1_000_000)
    stop = threading.Event()
    codes: list[grpc.StatusCode] = []

    def attack() -> None:
        while not stop.is_set():
            for base, options in ((tiny_llama, {"adapter_slots": 1024, "max_rank": 512}), (big, {})):
                try:
                    _submit(stack, base, **options)
                except grpc.RpcError as err:
                    codes.append(err.code())

    attackers = [threading.Thread(target=attack) for _ in range(3)]
    for t in attackers:
        t.start()
    try:
        worst = 0.0
        for _ in range(40):
            started = time.monotonic()
            stack.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.id), timeout=10)
            worst = max(worst, time.monotonic() - started)
            time.sleep(0.02)
    finally:
        stop.set()
        for t in attackers:
            t.join(30)
    assert set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT}
    assert worst < 5.0, worst


def test_planning_runs_off_the_rpc_threads_bounded_and_stops_for_a_client_that_left(redis_url, tmp_path, tiny_llama,
                                                                                    input_policy):
    """Planning fetches and hashes the base model: at most threads + queue submits wait for it, the rest are
    RESOURCE_EXHAUSTED at once, GetJob stays fast, and a plan whose client left before it started never runs."""
    from loraflow.server.preparation import PreparationPool

    release = threading.Event()
    planned: list[str] = []

    class SlowInputs(CompileInputs):
        def plan(self, base_model, adapter_specs, options):
            planned.append(base_model)
            release.wait(30)  # a big base model being fetched and hashed
            return super().plan(base_model, adapter_specs, options)

    client = redis.Redis.from_url(redis_url)
    store = open_store((tmp_path / "store").as_uri())
    registry = Registry(client)
    queue = JobQueue(client, "compile")
    inputs = SlowInputs(store, registry, tmp_path / "cache", policy=input_policy, budget=BUDGET)
    server = GrpcServer("127.0.0.1:0", [SERVICE_NAME])
    pool = PreparationPool(1, 1)
    server.add(compiler_pb2_grpc.add_CompilerServiceServicer_to_server,
               CompilerServiceServicer(queue, registry, store, inputs, preparations=pool))
    add_job_service(server, {"compile": queue})
    channel = grpc.insecure_channel(f"127.0.0.1:{server.start()}")
    stub = compiler_pb2_grpc.CompilerServiceStub(channel)
    jobs = jobs_pb2_grpc.JobServiceStub(channel)
    other = queue.submit({"n": 1})

    def submit(timeout):
        return stub.SubmitCompileJob(compiler_pb2.SubmitCompileJobRequest(
            base_model=str(tiny_llama), options=compiler_pb2.CompileOptions(ctx_len=64, prefill_seq_len=8)),
            timeout=timeout)

    try:
        running = stub.SubmitCompileJob.future(compiler_pb2.SubmitCompileJobRequest(
            base_model=str(tiny_llama), options=compiler_pb2.CompileOptions(ctx_len=64, prefill_seq_len=8)),
            timeout=60)
        wait_for(lambda: planned, timeout=30, what="the first plan to start")
        waited = stub.SubmitCompileJob.future(compiler_pb2.SubmitCompileJobRequest(
            base_model=str(tiny_llama), options=compiler_pb2.CompileOptions(ctx_len=64, prefill_seq_len=8)),
            timeout=60)
        wait_for(lambda: pool.pending == 2, timeout=30, what="a second submit to wait for the pool")
        waited.cancel()  # its client gives up while it waits
        wait_for(lambda: pool.pending == 1, timeout=30, what="the abandoned plan to leave the queue")
        queued = stub.SubmitCompileJob.future(compiler_pb2.SubmitCompileJobRequest(
            base_model=str(tiny_llama), options=compiler_pb2.CompileOptions(ctx_len=64, prefill_seq_len=8)),
            timeout=60)
        wait_for(lambda: pool.pending == 2, timeout=30, what="the second submit to wait for the pool")
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as full:
            submit(timeout=30)
        assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() - started < 2
        assert error_info(full.value).reason == "TOO_MANY_PREPARATIONS"
        assert "--preparation-threads" in full.value.details()
        started = time.monotonic()
        jobs.GetJob(jobs_pb2.GetJobRequest(job_id=other.id), timeout=5)
        assert time.monotonic() - started < 2
        release.set()
        assert running.result().id and queued.result().id
        assert len(planned) == 2  # the plan whose client left before it started never ran
    finally:
        release.set()
        channel.close()
        server.stop(0)
