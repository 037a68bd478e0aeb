"""CompilerService: validate a compile request completely, answer cache hits at once, queue the rest.

Thin by design: protobuf in, CompileOptions + adapter specs out; registry records back to protobuf.
The cheap checks (fields, config.json, the memory budget) run on the RPC thread; planning the artifact
(fetching and hashing the base model, reading the adapters) runs on the bounded preparation pool
(loraflow.server.preparation), and a handler whose client went away stops waiting for it.
"""

from __future__ import annotations

import logging

import grpc

from loraflow.errors import InvalidArgument
from loraflow.jobs.job_service import job_to_proto
from loraflow.jobs.queue import JobQueue, validate_labels, validate_request_id
from loraflow.jobs.registry import MAX_ARTIFACT_ID_LEN, ArtifactRecord, Registry
from loraflow.options.names import validate_name
from loraflow.server.grpc_server import page_size_from_proto, set_timestamp
from loraflow.server.preparation import ClientGone, PreparationPool, preparation_pool
from loraflow.storage.store import ObjectStore, artifact_key
from loraflow.v1 import compiler_pb2, compiler_pb2_grpc, jobs_pb2
from services.compiler.inputs import CompileInputs
from services.compiler.options import MAX_COMPILER_OPTIONS, CompileOptions

log = logging.getLogger(__name__)

SERVICE_NAME = compiler_pb2.DESCRIPTOR.services_by_name["CompilerService"].full_name
MAX_STRING = 256


def options_from_proto(msg: compiler_pb2.CompileOptions) -> CompileOptions:
    """Unset numeric fields and "" strings mean "the default"; an explicit 0 is kept and rejected by
    CompileOptions.validate, naming the field (compiler.proto marks the numbers `optional`)."""
    for name in ("target", "dtype", "ai100_stage"):
        value = getattr(msg, name)
        if len(value) > MAX_STRING:
            raise InvalidArgument(f"options.{name} is longer than {MAX_STRING} characters",
                                  field=f"options.{name}", value=value[:32] + "…")
    numbers = {name: getattr(msg, name) for name in _OPTIONAL_INTS if msg.HasField(name)}
    if len(msg.compiler_options) > MAX_COMPILER_OPTIONS:
        raise InvalidArgument(f"options.compiler_options has {len(msg.compiler_options)} entries; at most "
                              f"{MAX_COMPILER_OPTIONS}",
                              field="options.compiler_options", value=len(msg.compiler_options))
    return CompileOptions(target=msg.target or "onnxruntime", dtype=msg.dtype or "fp32",
                          target_modules=tuple(msg.target_modules), mxfp6_matmul=msg.mxfp6_matmul,
                          ai100_stage=msg.ai100_stage or None,
                          compiler_options=tuple(o[:MAX_STRING + 1] for o in msg.compiler_options), **numbers)


_OPTIONAL_INTS = ("batch_size", "full_batch_size", "prefill_seq_len", "ctx_len", "max_rank", "adapter_slots",
                  "num_cores", "quant_block_size", "quant_accuracy_level")


def options_to_proto(options: dict) -> compiler_pb2.CompileOptions:
    numbers = {name: int(options[name]) for name in _OPTIONAL_INTS if options.get(name) is not None}
    return compiler_pb2.CompileOptions(
        target=options.get("target") or "", dtype=options.get("dtype") or "",
        target_modules=list(options.get("target_modules") or ()), mxfp6_matmul=bool(options.get("mxfp6_matmul")),
        ai100_stage=options.get("ai100_stage") or "", compiler_options=list(options.get("compiler_options") or ()),
        **numbers)


def artifact_to_proto(record: ArtifactRecord) -> compiler_pb2.Artifact:
    msg = compiler_pb2.Artifact(
        artifact_id=record.artifact_id, uri=record.uri, base_model=record.base_model,
        adapters=[compiler_pb2.ArtifactAdapter(slot=a.slot, name=a.name, digest=a.digest, r=a.r)
                  for a in record.adapters],
        options=options_to_proto(record.options), size_bytes=record.size_bytes, architecture=record.architecture)
    set_timestamp(msg.create_time, record.create_time)
    return msg


def _artifact_id(value: str) -> str:
    return validate_name("artifact_id", value, max_len=MAX_ARTIFACT_ID_LEN)


class CompilerServiceServicer(compiler_pb2_grpc.CompilerServiceServicer):
    def __init__(self, queue: JobQueue, registry: Registry, store: ObjectStore, inputs: CompileInputs, *,
                 preparations: PreparationPool | None = None):
        self.queue = queue
        self.registry = registry
        self.store = store
        self.inputs = inputs
        self._preparations = preparations  # None: the process's (loraflow.server.preparation.preparation_pool)

    def SubmitCompileJob(self, request: compiler_pb2.SubmitCompileJobRequest, context) -> jobs_pb2.Job:
        request_id = validate_request_id(request.request_id)
        labels = validate_labels(dict(request.labels))
        options = options_from_proto(request.options)
        adapters = list(request.adapters)
        self.inputs.precheck(request.base_model, adapters, options)
        pool = self._preparations or preparation_pool(self.inputs.budget)
        try:
            resolved = pool.run(lambda: self.inputs.plan(request.base_model, adapters, options),
                                alive=lambda: context is None or context.is_active(), what="SubmitCompileJob")
        except ClientGone as exc:
            log.info("SubmitCompileJob abandoned: %s", exc)
            context.abort(grpc.StatusCode.CANCELLED, str(exc))
        if context is not None and not context.is_active():
            context.abort(grpc.StatusCode.CANCELLED, "the client went away before the job was queued")
        plan = resolved.plan
        payload = {"base_model": request.base_model, "adapters": adapters, "options": options.to_dict(),
                   "artifact_id": plan.artifact_id}
        existing = self.registry.find_artifact(plan.artifact_id)
        if existing is not None and self.store.dir_exists(artifact_key(plan.artifact_id)):
            result = {"artifact_id": existing.artifact_id, "artifact_uri": existing.uri, "cache_hit": True}
            job = self.queue.submit_succeeded(payload, result, request_id=request_id, labels=labels,
                                              message=f"cache hit: artifact {plan.artifact_id} exists")
        else:
            job = self.queue.submit(payload, request_id=request_id, labels=labels)
        log.info("compile job %s for artifact %s (%s)", job.id, plan.artifact_id, job.state)
        return job_to_proto(job)

    def ListArtifacts(self, request: compiler_pb2.ListArtifactsRequest, context):
        records, token = self.registry.list_artifacts(page_size_from_proto(request.page_size), request.page_token)
        return compiler_pb2.ListArtifactsResponse(artifacts=[artifact_to_proto(r) for r in records],
                                                  next_page_token=token)

    def GetArtifact(self, request: compiler_pb2.GetArtifactRequest, context) -> compiler_pb2.Artifact:
        return artifact_to_proto(self.registry.get_artifact(_artifact_id(request.artifact_id)))

    def DeleteArtifact(self, request: compiler_pb2.DeleteArtifactRequest, context):
        artifact_id = _artifact_id(request.artifact_id)
        record = self.registry.delete_artifact(artifact_id)
        self.store.delete(artifact_key(artifact_id))
        return compiler_pb2.DeleteArtifactResponse(artifact=artifact_to_proto(record))
