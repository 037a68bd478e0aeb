"""CompilerService end to end: real redis, real gRPC on loopback, a real worker thread, file store."""

from __future__ import annotations

import json
import threading
import time

import grpc
import numpy as np
import pytest
import redis

from loraflow.jobs.job_service import add_job_service
from loraflow.jobs.queue import JobQueue, JobWorker
from loraflow.jobs.registry import AdapterRecord, Registry
from loraflow.server.grpc_server import GrpcServer, error_info
from loraflow.storage.store import artifact_key, open_store
from loraflow.v1 import compiler_pb2, compiler_pb2_grpc, jobs_pb2, jobs_pb2_grpc
from services.compiler.inputs import CompileInputs
from services.compiler.server import SERVICE_NAME, CompilerServiceServicer, options_from_proto
from services.compiler.worker import CompileHandler
from tests.support.bare_onnx import bare_prefill


class Stack:
    """One compiler process: API + JobService + worker, on a shared redis and store."""

    def __init__(self, redis_url: str, store_url: str, cache_dir, *, worker: bool = True, policy=None):
        self.redis = redis.Redis.from_url(redis_url)
        self.store = open_store(store_url)
        self.registry = Registry(self.redis)
        self.queue = JobQueue(self.redis, "compile", lease_seconds=2.0)
        inputs = CompileInputs(self.store, self.registry, cache_dir, policy=policy)
        self.server = GrpcServer("127.0.0.1:0", [SERVICE_NAME])
        self.server.add(compiler_pb2_grpc.add_CompilerServiceServicer_to_server,
                        CompilerServiceServicer(self.queue, self.registry, self.store, inputs))
        add_job_service(self.server, {"compile": self.queue})
        port = self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.compiler = compiler_pb2_grpc.CompilerServiceStub(self.channel)
        self.jobs = jobs_pb2_grpc.JobServiceStub(self.channel)
        self.stop = threading.Event()
        self.thread = None
        if worker:
            self.handler = CompileHandler(self.store, self.registry, inputs, cache_dir)
            w = JobWorker(self.queue, self.handler, stop_event=self.stop, poll_ms=100)
            self.thread = threading.Thread(target=w.run, daemon=True)
            self.thread.start()

    def wait(self, job_id: str, timeout: float = 120.0) -> jobs_pb2.Job:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job_id))
            if job.state in (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED):
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} did not finish in {timeout}s")

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(10)
        self.channel.close()
        self.server.stop(0)


@pytest.fixture
def stack_factory(redis_url, tmp_path, input_policy):
    stacks = []
    store_url = f"file://{tmp_path / 'store'}"

    def make(worker: bool = True) -> Stack:
        s = Stack(redis_url, store_url, tmp_path / f"cache{len(stacks)}", worker=worker, policy=input_policy)
        stacks.append(s)
        return s

    yield make
    for s in stacks:
        s.close()


SMALL = dict(ctx_len=64, prefill_seq_len=8, full_batch_size=2, adapter_slots=3)


def _register(stack: Stack, name: str, path, base) -> None:
    stack.registry.put_adapter(AdapterRecord(name=name, uri=str(path), base_model=str(base)))


def test_compile_two_adapters_publishes_a_runnable_artifact_then_hits_the_cache(
        stack_factory, tiny_llama, adapter_factory):
    stack = stack_factory()
    a = adapter_factory("llama", "alpha", r=4, target_modules=("q_proj", "v_proj"))
    b = adapter_factory("llama", "beta", r=8, target_modules=("gate_proj", "down_proj"), seed=2)
    _register(stack, "alpha", a, tiny_llama)
    request = compiler_pb2.SubmitCompileJobRequest(
        base_model=str(tiny_llama), adapters=["alpha", str(b)], options=compiler_pb2.CompileOptions(**SMALL))
    job = stack.compiler.SubmitCompileJob(request)
    assert job.kind == jobs_pb2.JOB_KIND_COMPILE
    done = stack.wait(job.id)
    assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error
    result = done.compile_result
    assert not result.cache_hit and result.artifact_id

    # Progress events name every stage, in order.
    events = list(stack.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id), timeout=10))
    stages = [e.message.split(":", 1)[0] for e in events if ":" in e.message]
    for stage in ("load", "validate", "export", "optimize", "verify", "write", "upload"):
        assert stage in stages, (stage, stages)
    assert [e.seq for e in events] == sorted(e.seq for e in events)

    artifact = stack.compiler.GetArtifact(compiler_pb2.GetArtifactRequest(artifact_id=result.artifact_id))
    # A registered adapter keeps its name; one given by path is named after its directory.
    assert [(x.slot, x.name, x.r) for x in artifact.adapters] == [(1, "alpha", 4), (2, b.name, 8)]
    assert artifact.options.ctx_len == 64 and artifact.options.max_rank == 8
    assert artifact.architecture == "llama" and artifact.size_bytes > 0
    listed = stack.compiler.ListArtifacts(compiler_pb2.ListArtifactsRequest())
    assert [x.artifact_id for x in listed.artifacts] == [result.artifact_id]

    # The published artifact runs in a bare onnxruntime session.
    local = stack.store.fetch_dir(artifact_key(result.artifact_id), stack.handler.cache_dir / "check")
    logits = bare_prefill(local, [[5, 6, 7], [8, 9, 10]], [1, 2])
    vocab = json.loads((tiny_llama / "config.json").read_text())["vocab_size"]
    assert logits.shape == (2, 1, vocab) and np.isfinite(logits).all()

    # Same request again, from a second process's API (no worker): a cache hit, born SUCCEEDED.
    other = stack_factory(worker=False)
    again = other.compiler.SubmitCompileJob(request)
    assert again.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert again.compile_result.cache_hit and again.compile_result.artifact_id == result.artifact_id
    assert again.id != job.id


def test_request_id_returns_the_original_job(stack_factory, tiny_llama, adapter_factory):
    stack = stack_factory(worker=False)
    a = adapter_factory("llama", "alpha", r=4, target_modules=("q_proj", "v_proj"))
    request = compiler_pb2.SubmitCompileJobRequest(base_model=str(tiny_llama), adapters=[str(a)],
                                                   options=compiler_pb2.CompileOptions(**SMALL), request_id="req-1")
    first = stack.compiler.SubmitCompileJob(request)
    second = stack.compiler.SubmitCompileJob(request)
    assert first.id == second.id and first.state == jobs_pb2.JOB_STATE_QUEUED


def test_redelivered_job_registers_an_already_published_artifact_without_rebuilding(
        stack_factory, tiny_llama, adapter_factory):
    """An attempt that published and died before registering: the next attempt only registers."""
    first = stack_factory()
    a = adapter_factory("llama", "alpha", r=4, target_modules=("q_proj", "v_proj"))
    request = compiler_pb2.SubmitCompileJobRequest(base_model=str(tiny_llama), adapters=[str(a)],
                                                   options=compiler_pb2.CompileOptions(**SMALL))
    done = first.wait(first.compiler.SubmitCompileJob(request).id)
    artifact_id = done.compile_result.artifact_id
    manifest_before = first.store.get_bytes(f"{artifact_key(artifact_id)}/.manifest.json")
    first.registry.delete_artifact(artifact_id)  # as if the registering transaction never ran

    job = first.compiler.SubmitCompileJob(request)
    assert job.state != jobs_pb2.JOB_STATE_SUCCEEDED  # not a cache hit: the registry has no entry
    done = first.wait(job.id)
    assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED and done.compile_result.artifact_id == artifact_id
    messages = [e.message for e in first.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id), timeout=10)]
    assert any("published by an earlier attempt" in m for m in messages), messages
    assert not any(m.startswith("export") for m in messages)
    assert first.store.get_bytes(f"{artifact_key(artifact_id)}/.manifest.json") == manifest_before
    assert first.registry.get_artifact(artifact_id).artifact_id == artifact_id


def _code_and_field(call):
    with pytest.raises(grpc.RpcError) as err:
        call()
    info = error_info(err.value)
    return err.value.code(), (info.metadata.get("field") if info else None), err.value.details()


@pytest.mark.parametrize("options, field", [
    (dict(ctx_len=8, prefill_seq_len=16), "options.ctx_len"),
    (dict(adapter_slots=0), "options.adapter_slots"),
    (dict(max_rank=0), "options.max_rank"),
    (dict(max_rank=2, ctx_len=64), None),  # adapter r=4 does not fit: the error names the adapter
    (dict(target="tpu"), "options.target"),
    (dict(dtype="int3"), "options.dtype"),
    (dict(target_modules=["q_proj", "embed_tokens"]), "options.target_modules"),
    (dict(batch_size=-1), "options.batch_size"),
])
def test_bad_options_are_invalid_argument(stack_factory, tiny_llama, adapter_factory, options, field):
    stack = stack_factory(worker=False)
    a = adapter_factory("llama", "alpha", r=4, target_modules=("q_proj", "v_proj"))
    request = compiler_pb2.SubmitCompileJobRequest(base_model=str(tiny_llama), adapters=[str(a)],
                                                   options=compiler_pb2.CompileOptions(**options))
    code, got_field, details = _code_and_field(lambda: stack.compiler.SubmitCompileJob(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    if field is not None:
        assert got_field == field, details
    else:
        assert "alpha" in details and "max_rank" in details and got_field == "adapters[0].r", details


def test_rejections_name_the_field(stack_factory, tiny_llama, adapter_factory, tmp_path):
    stack = stack_factory(worker=False)
    a = str(adapter_factory("llama", "alpha", r=4, target_modules=("q_proj", "v_proj")))
    submit = stack.compiler.SubmitCompileJob
    R = compiler_pb2.SubmitCompileJobRequest
    cases = [
        (R(base_model="", adapters=[a]), grpc.StatusCode.INVALID_ARGUMENT, "base_model"),
        (R(base_model=str(tmp_path / "nope"), adapters=[a]), grpc.StatusCode.INVALID_ARGUMENT, "base_model"),
        (R(base_model="http://example.com/m", adapters=[a]), grpc.StatusCode.INVALID_ARGUMENT, "base_model"),
        (R(base_model=str(tiny_llama), adapters=["ghost"]), grpc.StatusCode.NOT_FOUND, "adapters[0]"),
        (R(base_model=str(tiny_llama), adapters=[a, ""]), grpc.StatusCode.INVALID_ARGUMENT, "adapters[1]"),
        (R(base_model=str(tiny_llama), adapters=["bad name!"]), grpc.StatusCode.INVALID_ARGUMENT, "adapters[0]"),
        # A relative path resolves outside every allowed root: refused, not read.
        (R(base_model=str(tiny_llama), adapters=["../../etc"]), grpc.StatusCode.PERMISSION_DENIED, "adapters[0]"),
        (R(base_model=str(tiny_llama), adapters=[str(tmp_path)]), grpc.StatusCode.INVALID_ARGUMENT, None),
        (R(base_model=str(tiny_llama), adapters=[a], request_id="x" * 5000), grpc.StatusCode.INVALID_ARGUMENT,
         "request_id"),
        (R(base_model="x" * 10000, adapters=[a]), grpc.StatusCode.INVALID_ARGUMENT, "base_model"),
    ]
    for request, want_code, want_field in cases:
        code, field, details = _code_and_field(lambda request=request: submit(request))
        assert code == want_code, (request.base_model[:40], list(request.adapters), details)
        if want_field:
            assert field == want_field, details
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, field, details = _code_and_field(lambda: submit(R(base_model=str(tmp_path / "cfg"), adapters=[a])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "llama" in details, details


def test_ai100_without_sdk_is_failed_precondition(stack_factory, tiny_llama, adapter_factory, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    stack = stack_factory(worker=False)
    a = adapter_factory("llama", "alpha", r=4, target_modules=("q_proj", "v_proj"))
    request = compiler_pb2.SubmitCompileJobRequest(base_model=str(tiny_llama), adapters=[str(a)],
                                                   options=compiler_pb2.CompileOptions(target="ai100"))
    code, _field, details = _code_and_field(lambda: stack.compiler.SubmitCompileJob(request))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "qaic" in details.lower(), details


def test_artifact_rpcs_validate_and_delete(stack_factory, tiny_llama, adapter_factory):
    stack = stack_factory()
    code, field, _ = _code_and_field(
        lambda: stack.compiler.GetArtifact(compiler_pb2.GetArtifactRequest(artifact_id="")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and field == "artifact_id"
    code, _, _ = _code_and_field(
        lambda: stack.compiler.GetArtifact(compiler_pb2.GetArtifactRequest(artifact_id="deadbeef")))
    assert code == grpc.StatusCode.NOT_FOUND
    code, field, _ = _code_and_field(
        lambda: stack.compiler.ListArtifacts(compiler_pb2.ListArtifactsRequest(page_size=-3)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and field == "page_size"
    code, _, _ = _code_and_field(
        lambda: stack.compiler.ListArtifacts(compiler_pb2.ListArtifactsRequest(page_token="garbage!")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT

    a = adapter_factory("llama", "alpha", r=4, target_modules=("q_proj", "v_proj"))
    request = compiler_pb2.SubmitCompileJobRequest(base_model=str(tiny_llama), adapters=[str(a)],
                                                   options=compiler_pb2.CompileOptions(**SMALL))
    artifact_id = stack.wait(stack.compiler.SubmitCompileJob(request).id).compile_result.artifact_id
    deleted = stack.compiler.DeleteArtifact(compiler_pb2.DeleteArtifactRequest(artifact_id=artifact_id))
    assert deleted.artifact.artifact_id == artifact_id
    assert not stack.store.dir_exists(artifact_key(artifact_id))
    code, _, _ = _code_and_field(
        lambda: stack.compiler.GetArtifact(compiler_pb2.GetArtifactRequest(artifact_id=artifact_id)))
    assert code == grpc.StatusCode.NOT_FOUND


def test_default_context_fits_a_model_with_a_short_position_table(stack_factory, tiny_llama, adapter_factory,
                                                                   tmp_path, input_policy):
    """tiny_llama has max_position_embeddings=256 < the default ctx_len of 512."""
    stack = stack_factory(worker=False)
    a = adapter_factory("llama", "alpha", r=4, target_modules=("q_proj", "v_proj"))
    inputs = CompileInputs(stack.store, stack.registry, tmp_path / "cache", policy=input_policy)
    plan = inputs.plan(str(tiny_llama), [str(a)], options_from_proto(compiler_pb2.CompileOptions())).plan
    assert plan.options.ctx_len == 256
    request = compiler_pb2.SubmitCompileJobRequest(base_model=str(tiny_llama), adapters=[str(a)],
                                                   options=compiler_pb2.CompileOptions(ctx_len=512))
    code, field, details = _code_and_field(lambda: stack.compiler.SubmitCompileJob(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and field == "options.ctx_len", details
