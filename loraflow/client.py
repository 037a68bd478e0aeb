"""`loraflow.Client`: one small Python client for the three services, over their gRPC contracts.

Calls return the protobuf messages of `loraflow.v1` (Job, Adapter, Artifact, Model, ...). A failed call
raises a `loraflow.errors` exception of the status code's class, carrying the code, the message and the
`ErrorInfo` reason/field/value the server attached (see `error_from_rpc`).
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from loraflow import errors
from loraflow.options import settings
from loraflow.security.tls import channel_credentials
from loraflow.storage.model_source import is_location
from loraflow.v1 import (
    compiler_pb2,
    compiler_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
    storage_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)

if TYPE_CHECKING:
    from loraflow.storage.transfer import PullResult, PushResult

DEFAULT_ADDRESSES = {"trainer": "127.0.0.1:50051", "compiler": "127.0.0.1:50052", "inference": "127.0.0.1:50053"}
ADDRESS_SETTINGS = {"trainer": settings.TRAINER_ADDR, "compiler": settings.COMPILER_ADDR,
                    "inference": settings.INFERENCE_ADDR}
# Where `loraflow up` writes the services' tokens file and the token its clients send, under its home.
UP_TOKENS_FILE = Path("auth") / "tokens"
UP_CLIENT_TOKEN_FILE = Path("auth") / "token"
MAX_TOKEN_FILE_BYTES = 4096
log = logging.getLogger(__name__)

# Which service owns the jobs of each kind.
KIND_SERVICE = {"train": "trainer", "compile": "compiler"}

TERMINAL_STATES = frozenset({jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED})

_CODE_CLASSES: dict[grpc.StatusCode, type[errors.LoraflowError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DATA_LOSS: errors.IntegrityError,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
}

# Generate/WatchJob streams may run long; only unary calls get the client's default deadline.
_STREAM_TIMEOUT = None


class JobFailed(errors.LoraflowError):
    """`Client.wait` saw the job end FAILED or CANCELLED; `.job` is the final Job message."""

    code = "ABORTED"
    default_reason = "JOB_FAILED"

    def __init__(self, job: jobs_pb2.Job):
        state = jobs_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")
        detail = job.error or job.message or "no reason recorded"
        super().__init__(f"job {job.id} ended {state}: {detail}",
                         reason="JOB_CANCELLED" if job.state == jobs_pb2.JOB_STATE_CANCELLED else "JOB_FAILED",
                         metadata={"job_id": job.id, "state": state})
        self.job = job


def error_from_rpc(err: grpc.RpcError, service: str = "", address: str = "") -> errors.LoraflowError:
    """The loraflow exception for a failed call: class by status code, ErrorInfo reason/field/value copied."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = (err.details() if hasattr(err, "details") else "") or str(code.name)
    reason, metadata = None, {}
    try:
        status = rpc_status.from_call(err)
    except (ValueError, AttributeError):
        status = None  # a status whose code/message disagree with the trailers, or not a call at all
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason or None, dict(info.metadata)
    cls = _CODE_CLASSES.get(code, errors.LoraflowError)
    exc = cls(message, reason=reason or code.name, metadata=metadata)
    # Field and value travel in metadata; expose them as attributes like the server-side classes do.
    exc.field = metadata.get("field")
    exc.value = metadata.get("value")
    exc.code = code.name  # instance attribute: exact code even where no subclass matches (DEADLINE_EXCEEDED, ...)
    exc.service = service
    exc.address = address
    return exc


def _address(service: str, given: str | None) -> str:
    return given or ADDRESS_SETTINGS[service].raw() or DEFAULT_ADDRESSES[service]


def default_up_token_file() -> Path:
    """The client token `loraflow up` writes under its default home (~/.loraflow/auth/token)."""
    return Path(os.path.expanduser("~")) / ".loraflow" / UP_CLIENT_TOKEN_FILE


def read_token_file(path: str | os.PathLike, field: str = "token_file") -> str:
    """The bearer token held in a file (surrounding whitespace dropped); errors never quote the file."""
    path = Path(path)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_TOKEN_FILE_BYTES:
            raise errors.InvalidArgument(f"{field} {str(path)!r} must be a regular file of at most "
                                         f"{MAX_TOKEN_FILE_BYTES} bytes", field=field, value=str(path))
        with open(path, "rb") as f:
            token = f.read(MAX_TOKEN_FILE_BYTES).decode("ascii").strip()
    except OSError as exc:
        raise errors.InvalidArgument(f"{field} {str(path)!r} cannot be read ({exc.strerror})", field=field,
                                     value=str(path)) from None
    except UnicodeDecodeError:
        raise errors.InvalidArgument(f"{field} {str(path)!r} is not an ASCII token", field=field,
                                     value=str(path)) from None
    if not token or any(c.isspace() for c in token):
        raise errors.InvalidArgument(f"{field} {str(path)!r} must hold one token without spaces", field=field,
                                     value=str(path))
    return token


def _resolve_token(token: str | None, token_file: str | None) -> tuple[str | None, bool]:
    """(token, local_only): local_only for the token `loraflow up` wrote, which is for this machine's services."""
    if token:
        return token, False
    if settings.TOKEN.raw():
        return settings.TOKEN.raw().strip(), False
    token_file = token_file or settings.TOKEN_FILE.raw()
    if token_file:
        return read_token_file(token_file), False
    fallback = default_up_token_file()
    return (read_token_file(fallback), True) if fallback.is_file() else (None, False)


def _existing_local_path(spec: str) -> bool:
    """A request input naming a file or directory on this machine (not a URI, not a registered name)."""
    return bool(spec) and "://" not in spec and Path(spec).expanduser().exists()


def _is_loopback_address(address: str) -> bool:
    from loraflow.server.grpc_server import is_loopback

    host = address.rpartition(":")[0].strip("[]") if ":" in address else address
    return is_loopback(host)


def _state_enum(state: str | int | None) -> int:
    """'running' | 'RUNNING' | 'JOB_STATE_RUNNING' | enum int -> JobState int (None/'' -> UNSPECIFIED)."""
    if state is None or state == "":
        return jobs_pb2.JOB_STATE_UNSPECIFIED
    if isinstance(state, int):
        return state
    name = state.upper()
    name = name if name.startswith("JOB_STATE_") else "JOB_STATE_" + name
    try:
        return jobs_pb2.JobState.Value(name)
    except ValueError:
        allowed = [n.removeprefix("JOB_STATE_").lower() for n in jobs_pb2.JobState.keys()[1:]]
        raise errors.InvalidArgument(f"state must be one of {allowed}, got {state!r}",
                                     field="state", value=state) from None


def _kind_check(kind: str | None) -> str | None:
    if kind in (None, ""):
        return None
    if kind not in KIND_SERVICE:
        raise errors.InvalidArgument(f"kind must be one of {sorted(KIND_SERVICE)}, got {kind!r}",
                                     field="kind", value=kind)
    return kind


@dataclass(frozen=True)
class _Endpoint:
    service: str
    address: str
    channel: grpc.Channel
    metadata: tuple[tuple[str, str], ...] = ()


class Client:
    """Client(trainer=..., compiler=..., inference=..., timeout=30.0, token=..., tls_ca=...).

    Addresses default to $LORAFLOW_TRAINER_ADDR / $LORAFLOW_COMPILER_ADDR / $LORAFLOW_INFERENCE_ADDR,
    else 127.0.0.1:50051/50052/50053. Channels open lazily, so a Client for the trainer alone never
    touches the others. `timeout` is the deadline of unary calls in seconds (None = no deadline).

    Credentials. Every call carries `authorization: Bearer <token>`, the token being the first of:
    `token`; $LORAFLOW_TOKEN; the file `token_file` or $LORAFLOW_TOKEN_FILE; the file `loraflow up`
    writes under its default home (~/.loraflow/auth/token), so the CLI on the machine that runs `up`
    needs no setup (that one is only sent to loopback addresses); else no token. TLS: `tls_ca` ($LORAFLOW_TLS_CA) is the CA the servers' certificates
    are checked against; `tls_client_cert` + `tls_client_key` ($LORAFLOW_TLS_CLIENT_CERT / _KEY) present
    a client certificate (mTLS); `tls=True` ($LORAFLOW_TLS=1) uses TLS with the system's roots. A token
    sent in plaintext to a non-loopback address logs a warning.

    Local inputs. `train` and `compile` given a local path (a model or adapter directory, a dataset file)
    while the service is not on this machine (a non-loopback address) push it through the service's
    StorageService first and send the store URI instead (`upload=True` always does, `upload=False` never).
    A service on loopback is sent the paths, and when it refuses one (it runs in a container or under a
    policy that lets requests name no host path) the inputs are pushed and the request sent again;
    `on_upload(PushResult)` hears of each push. `push`/`pull` move data explicitly.
    """

    def __init__(self, trainer: str | None = None, compiler: str | None = None, inference: str | None = None,
                 *, timeout: float | None = 30.0, token: str | None = None, token_file: str | None = None,
                 tls_ca: str | None = None, tls_client_cert: str | None = None, tls_client_key: str | None = None,
                 tls: bool | None = None, on_upload: Callable[[PushResult], None] | None = None,
                 progress: bool | None = None):
        self.on_upload = on_upload
        self.progress = progress  # transfer progress bars: None = when stderr is a terminal
        self.addresses = {"trainer": _address("trainer", trainer), "compiler": _address("compiler", compiler),
                          "inference": _address("inference", inference)}
        self.timeout = timeout
        token, self._token_local_only = _resolve_token(token, token_file)
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        tls_ca = tls_ca or settings.TLS_CA.raw()
        tls_client_cert = tls_client_cert or settings.TLS_CLIENT_CERT.raw()
        tls_client_key = tls_client_key or settings.TLS_CLIENT_KEY.raw()
        if tls is None:
            tls = bool(settings.TLS.from_env())
        # Built now, so a bad CA or key path fails at construction rather than on the first call.
        self._credentials = channel_credentials(tls_ca, tls_client_cert, tls_client_key) \
            if tls or tls_ca or tls_client_cert or tls_client_key else None
        self._endpoints: dict[str, _Endpoint] = {}
        # job id -> service that answered for it, so watch/cancel after get go straight there.
        self._job_service: dict[str, str] = {}

    # ---------------------------------------------------------------- plumbing

    def _endpoint(self, service: str) -> _Endpoint:
        if service not in self._endpoints:
            address = self.addresses[service]
            options = [("grpc.max_receive_message_length", 64 << 20)]
            loopback = _is_loopback_address(address)
            metadata = () if self._token_local_only and not loopback else self._metadata
            if self._credentials is not None:
                channel = grpc.secure_channel(address, self._credentials, options=options)
            else:
                if metadata and not loopback:
                    log.warning("sending a bearer token in plaintext to %s (%s); set LORAFLOW_TLS_CA to use TLS",
                                address, service)
                channel = grpc.insecure_channel(address, options=options)
            self._endpoints[service] = _Endpoint(service, address, channel, metadata)
        return self._endpoints[service]

    def _call(self, service: str, stub_cls, method: str, request, *, timeout: float | None | str = "default"):
        endpoint = self._endpoint(service)
        rpc = getattr(stub_cls(endpoint.channel), method)
        try:
            return rpc(request, timeout=self.timeout if timeout == "default" else timeout,
                       metadata=endpoint.metadata)
        except grpc.RpcError as err:
            raise error_from_rpc(err, service, endpoint.address) from None

    def _stream(self, service: str, stub_cls, method: str, request) -> Iterator[Any]:
        endpoint = self._endpoint(service)
        call = getattr(stub_cls(endpoint.channel), method)(request, timeout=_STREAM_TIMEOUT,
                                                           metadata=endpoint.metadata)
        try:
            yield from call
        except grpc.RpcError as err:
            raise error_from_rpc(err, service, endpoint.address) from None
        finally:
            call.cancel()  # the consumer stopped early: tell the server at once (frees a slot / watcher)

    def close(self) -> None:
        for endpoint in self._endpoints.values():
            endpoint.channel.close()
        self._endpoints.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def health(self, service: str, name: str = "", timeout: float = 5.0) -> str:
        """grpc.health.v1 status of one service ('SERVING', 'NOT_SERVING', ...); raises Unavailable."""
        response = self._call(service, health_pb2_grpc.HealthStub, "Check",
                              health_pb2.HealthCheckRequest(service=name), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    # ---------------------------------------------------------------- trainer

    def train(self, base_model: str, dataset: str, name: str, *, r: int | None = None, alpha: float = 0.0,
              targets: Iterable[str] = (), dropout: float = 0.0, rslora: bool = False, bias: str = "",
              steps: int = 0, epochs: float = 0.0, batch_size: int = 0, grad_accum: int = 0, lr: float = 0.0,
              max_seq_len: int = 0, eval_fraction: float = 0.0, seed: int = 0, checkpoint_every: int = 0,
              device: str = "", warmup_steps: int = 0, lr_scheduler: str = "",
              gradient_checkpointing: bool = False, request_id: str = "",
              labels: dict[str, str] | None = None, world_size: int = 0, nodes: int = 0,
              upload: bool | None = None) -> jobs_pb2.Job:
        """Submit a LoRA fine-tuning job; None/0/empty values take the server's defaults. Local inputs are
        pushed first when the trainer is remote (see the class docstring, `upload`)."""
        lora = trainer_pb2.LoraConfig(**_present(r=r), lora_alpha=alpha, target_modules=list(targets),
                                      lora_dropout=dropout, bias=bias, use_rslora=rslora)
        training = trainer_pb2.TrainingConfig(
            max_steps=steps, num_epochs=epochs, batch_size=batch_size, gradient_accumulation_steps=grad_accum,
            learning_rate=lr, max_seq_len=max_seq_len, seed=seed, eval_fraction=eval_fraction,
            checkpoint_every_steps=checkpoint_every, device=device, warmup_steps=warmup_steps,
            lr_scheduler=lr_scheduler, gradient_checkpointing=gradient_checkpointing, world_size=world_size,
            nodes=nodes)

        def build(push: bool | None) -> trainer_pb2.SubmitTrainingJobRequest:
            return trainer_pb2.SubmitTrainingJobRequest(
                base_model=self._input("trainer", "model", base_model, push),
                dataset_uri=self._input("trainer", "dataset", dataset, push), adapter_name=name,
                request_id=request_id, labels=labels or {}, lora=lora, training=training)

        job = self._submit("trainer", trainer_pb2_grpc.TrainerServiceStub, "SubmitTrainingJob", build, upload,
                           {"base_model": [base_model], "dataset_uri": [dataset]})
        self._job_service[job.id] = "trainer"
        return job

    def list_adapters(self, limit: int = 1000) -> list[trainer_pb2.Adapter]:
        """Registered adapters, newest first (all pages, up to `limit`)."""
        return self._list_all("trainer", trainer_pb2_grpc.TrainerServiceStub, "ListAdapters",
                              trainer_pb2.ListAdaptersRequest, "adapters", limit)

    def get_adapter(self, name: str) -> trainer_pb2.Adapter:
        return self._call("trainer", trainer_pb2_grpc.TrainerServiceStub, "GetAdapter",
                          trainer_pb2.GetAdapterRequest(name=name))

    def register_adapter(self, name: str, adapter: str | os.PathLike, base_model: str | os.PathLike, *,
                         upload: bool | None = None) -> trainer_pb2.RegisterAdapterResponse:
        """Register a PEFT adapter trained elsewhere (a local directory or a store URI) under `name` for
        `base_model` (a checkpoint directory or store URI, as compile jobs name it). Local directories are pushed
        first when the trainer is remote (see the class docstring, `upload`). The same files and base under the
        same name again return `already_registered=True`; another adapter under a taken name is AlreadyExists."""
        adapter, base_model = os.fspath(adapter), os.fspath(base_model)

        def build(push: bool | None) -> trainer_pb2.RegisterAdapterRequest:
            return trainer_pb2.RegisterAdapterRequest(
                name=name, uri=self._input("trainer", "adapter", adapter, push),
                base_model=self._input("trainer", "model", base_model, push))

        return self._submit("trainer", trainer_pb2_grpc.TrainerServiceStub, "RegisterAdapter", build, upload,
                            {"uri": [adapter], "base_model": [base_model]})

    def delete_adapter(self, name: str) -> trainer_pb2.Adapter:
        """Delete an adapter; returns it as it was."""
        return self._call("trainer", trainer_pb2_grpc.TrainerServiceStub, "DeleteAdapter",
                          trainer_pb2.DeleteAdapterRequest(name=name)).adapter

    # ---------------------------------------------------------------- compiler

    def compile(self, base_model: str, adapters: Iterable[str], *, target: str = "", batch_size: int | None = None,
                full_batch_size: int | None = None, prefill_seq_len: int | None = None, ctx_len: int | None = None,
                max_rank: int | None = None, slots: int | None = None, dtype: str = "",
                num_cores: int | None = None, target_modules: Iterable[str] = (),
                mxfp6_matmul: bool = False, request_id: str = "",
                labels: dict[str, str] | None = None, upload: bool | None = None,
                quant_block_size: int | None = None, quant_accuracy_level: int | None = None,
                ai100_stage: str = "", compiler_options: Iterable[str] = ()) -> jobs_pb2.Job:
        """Submit a compile job for base + adapters (slot order); None/empty options take the defaults. Local
        directories are pushed first when the compiler is remote (see the class docstring, `upload`)."""
        adapters = list(adapters)
        options = compiler_pb2.CompileOptions(
            target=target, dtype=dtype, target_modules=list(target_modules), mxfp6_matmul=mxfp6_matmul,
            ai100_stage=ai100_stage, compiler_options=list(compiler_options),
            **_present(batch_size=batch_size, full_batch_size=full_batch_size, prefill_seq_len=prefill_seq_len,
                       ctx_len=ctx_len, max_rank=max_rank, adapter_slots=slots, num_cores=num_cores,
                       quant_block_size=quant_block_size, quant_accuracy_level=quant_accuracy_level))

        def build(push: bool | None) -> compiler_pb2.SubmitCompileJobRequest:
            return compiler_pb2.SubmitCompileJobRequest(
                base_model=self._input("compiler", "model", base_model, push),
                adapters=[self._input("compiler", "adapter", a, push) if is_location(a) else a for a in adapters],
                request_id=request_id, labels=labels or {}, options=options)

        job = self._submit("compiler", compiler_pb2_grpc.CompilerServiceStub, "SubmitCompileJob", build, upload,
                           {"base_model": [base_model], "adapters": [a for a in adapters if is_location(a)]})
        self._job_service[job.id] = "compiler"
        return job

    def list_artifacts(self, limit: int = 1000) -> list[compiler_pb2.Artifact]:
        """Compiled artifacts, newest first (all pages, up to `limit`)."""
        return self._list_all("compiler", compiler_pb2_grpc.CompilerServiceStub, "ListArtifacts",
                              compiler_pb2.ListArtifactsRequest, "artifacts", limit)

    def _list_all(self, service: str, stub, method: str, request_type, field: str, limit: int) -> list:
        """Follow next_page_token through a List RPC until `limit` items or the last page."""
        out: list = []
        token = ""
        while len(out) < limit:
            page = self._call(service, stub, method,
                              request_type(page_size=min(1000, limit - len(out)), page_token=token))
            out.extend(getattr(page, field))
            token = page.next_page_token
            if not token:
                break
        return out[:limit]

    def get_artifact(self, artifact_id: str) -> compiler_pb2.Artifact:
        return self._call("compiler", compiler_pb2_grpc.CompilerServiceStub, "GetArtifact",
                          compiler_pb2.GetArtifactRequest(artifact_id=artifact_id))

    def delete_artifact(self, artifact_id: str) -> compiler_pb2.Artifact:
        return self._call("compiler", compiler_pb2_grpc.CompilerServiceStub, "DeleteArtifact",
                          compiler_pb2.DeleteArtifactRequest(artifact_id=artifact_id)).artifact

    # ---------------------------------------------------------------- storage (served by trainer and compiler)

    def push(self, kind: str, path: str | os.PathLike, *, name: str | None = None, service: str = "trainer",
             progress: bool | None = None) -> PushResult:
        """Upload a local model/adapter directory or dataset file into `service`'s store and publish it;
        `.target` of the result is the URI to name in requests. The same files upload once."""
        from loraflow.storage import transfer

        service = _storage_service(service)
        endpoint = self._endpoint(service)

        def upload(messages):
            return self._call(service, storage_pb2_grpc.StorageServiceStub, "Upload", messages, timeout=None)

        def call(method, request):
            return self._call(service, storage_pb2_grpc.StorageServiceStub, method, request, timeout=None)

        log.debug("pushing %s to %s (%s)", path, service, endpoint.address)
        return transfer.push(call, upload, kind, path, name=name,
                             progress=self.progress if progress is None else progress)

    def pull(self, uri: str, dest: str | os.PathLike, *, service: str = "trainer",
             progress: bool | None = None) -> PullResult:
        """Download the published store directory `uri` into `dest` (absent or empty), sha256-checked."""
        from loraflow.storage import transfer

        service = _storage_service(service)

        def call(method, request):
            return self._call(service, storage_pb2_grpc.StorageServiceStub, method, request)

        def download(request):
            return self._stream(service, storage_pb2_grpc.StorageServiceStub, "Download", request)

        return transfer.pull(call, download, uri, dest, progress=self.progress if progress is None else progress)

    def _submit(self, service: str, stub_cls, method: str, build: Callable[[bool | None], Any],
                upload: bool | None, inputs: dict[str, list[str]]):
        """Send build(upload); when the service is on loopback (so local paths went as paths) but refuses one
        of them, it cannot see this machine's files (a container, another user's sandbox): push them through
        its StorageService and send again. The refused request created no job, so nothing runs twice."""
        try:
            return self._call(service, stub_cls, method, build(upload))
        except (errors.InvalidArgument, errors.PermissionDenied, errors.NotFound) as exc:
            field = re.split(r"[.\[]", exc.field or "", maxsplit=1)[0]
            local = [spec for spec in inputs.get(field, ()) if _existing_local_path(spec)]
            if upload is not None or not local or not _is_loopback_address(self.addresses[service]):
                raise
            log.info("the %s cannot read %s (%s); pushing the local inputs through its StorageService",
                     service, local[0], exc.message)
            return self._call(service, stub_cls, method, build(True))

    def _input(self, service: str, kind: str, spec: str, upload: bool | None) -> str:
        """What a request names for `spec`: a pushed copy's store URI when `spec` is a local path the
        service cannot read from here (remote service, or upload=True), else the path made absolute."""
        if not _existing_local_path(spec):
            return spec
        if upload is None:
            upload = not _is_loopback_address(self.addresses[service])
        if not upload:
            return absolute_local_path(spec)
        result = self.push(kind, spec, service=service)
        if self.on_upload is not None:
            self.on_upload(result)
        return result.target

    # ---------------------------------------------------------------- jobs (served by trainer and compiler)

    def _job_services(self, job_id: str, kind: str | None) -> list[str]:
        kind = _kind_check(kind)
        if kind:
            return [KIND_SERVICE[kind]]
        if job_id in self._job_service:
            return [self._job_service[job_id]]
        # Job ids start with their kind ("train-...", "compile-..."): go straight to the owner.
        prefix = job_id.split("-", 1)[0]
        if prefix in KIND_SERVICE:
            return [KIND_SERVICE[prefix]]
        return ["trainer", "compiler"]

    def get_job(self, job_id: str, kind: str | None = None) -> jobs_pb2.Job:
        """One job. Without `kind` the trainer is asked first, then the compiler."""
        last: errors.LoraflowError | None = None
        for service in self._job_services(job_id, kind):
            try:
                job = self._call(service, jobs_pb2_grpc.JobServiceStub, "GetJob",
                                 jobs_pb2.GetJobRequest(job_id=job_id))
            except (errors.NotFound, errors.Unavailable) as exc:
                # INVALID_ARGUMENT (a malformed id) is the same everywhere: it propagates at once.
                last = _prefer_not_found(last, exc)
                continue
            self._job_service[job_id] = service
            return job
        assert last is not None
        raise last

    def list_jobs(self, kind: str | None = None, state: str | int | None = None,
                  limit: int = 50) -> list[jobs_pb2.Job]:
        """Jobs newest first. Without `kind`, both services' jobs merged; a service that is down is skipped
        as long as another one answered."""
        kind = _kind_check(kind)
        state_enum = _state_enum(state)
        services = [KIND_SERVICE[kind]] if kind else ["trainer", "compiler"]
        kind_enum = {"train": jobs_pb2.JOB_KIND_TRAIN, "compile": jobs_pb2.JOB_KIND_COMPILE}.get(kind or "", 0)
        merged: dict[str, jobs_pb2.Job] = {}
        failures: list[errors.LoraflowError] = []
        for service in services:
            try:
                for job in self._list_jobs_from(service, kind_enum, state_enum, limit):
                    merged.setdefault(job.id, job)
            except errors.Unavailable as exc:
                failures.append(exc)
        if failures and len(failures) == len(services):
            raise failures[0]
        jobs = sorted(merged.values(), key=lambda j: (j.create_time.seconds, j.create_time.nanos), reverse=True)
        return jobs[:limit]

    def _list_jobs_from(self, service: str, kind: int, state: int, limit: int) -> list[jobs_pb2.Job]:
        out: list[jobs_pb2.Job] = []
        token = ""
        while len(out) < limit:
            page = self._call(service, jobs_pb2_grpc.JobServiceStub, "ListJobs",
                              jobs_pb2.ListJobsRequest(kind=kind, state=state, page_size=min(1000, limit - len(out)),
                                                       page_token=token))
            out.extend(page.jobs)
            token = page.next_page_token
            if not token:
                break
        return out

    def cancel_job(self, job_id: str, kind: str | None = None) -> jobs_pb2.Job:
        service = self._service_of(job_id, kind)
        return self._call(service, jobs_pb2_grpc.JobServiceStub, "CancelJob",
                          jobs_pb2.CancelJobRequest(job_id=job_id))

    def _service_of(self, job_id: str, kind: str | None) -> str:
        services = self._job_services(job_id, kind)
        if len(services) == 1:
            return services[0]
        self.get_job(job_id)  # finds (and remembers) the service that owns it; raises NotFound otherwise
        return self._job_service[job_id]

    def watch_job(self, job_id: str, kind: str | None = None, after_seq: int = 0) -> Iterator[jobs_pb2.JobEvent]:
        """Events of a job: past ones replayed, then live ones until the job is terminal."""
        service = self._service_of(job_id, kind)
        yield from self._stream(service, jobs_pb2_grpc.JobServiceStub, "WatchJob",
                                jobs_pb2.WatchJobRequest(job_id=job_id, after_seq=after_seq))

    def wait(self, job_id: str, kind: str | None = None, *, timeout: float | None = None,
             on_event: Callable[[jobs_pb2.JobEvent], None] | None = None,
             reconnect_attempts: int = 5) -> jobs_pb2.Job:
        """Follow a job's events to a terminal state and return the final Job.

        Raises JobFailed when it ends FAILED or CANCELLED, TimeoutError after `timeout` seconds. A broken
        stream (server restart) is resumed after the last seen event.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        last_seq = 0
        failures = 0
        while True:
            events = self.watch_job(job_id, kind, after_seq=last_seq)
            try:
                for event in events:
                    last_seq = max(last_seq, event.seq)
                    failures = 0
                    if on_event is not None:
                        on_event(event)
                    if event.state in TERMINAL_STATES:
                        break
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(f"job {job_id} not finished after {timeout}s")
            except errors.Unavailable:
                failures += 1
                if failures > reconnect_attempts:
                    raise
                time.sleep(min(2.0 ** failures * 0.25, 5.0))
                continue
            finally:
                events.close()
            job = self.get_job(job_id, kind)
            if job.state in TERMINAL_STATES:
                break
            # The stream ended without a terminal event (server draining): poll until it is terminal.
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout}s")
            time.sleep(0.5)
        if job.state != jobs_pb2.JOB_STATE_SUCCEEDED:
            raise JobFailed(job)
        return job

    # ---------------------------------------------------------------- inference

    def load_artifact(self, artifact_id: str, device: str = "", *, model_id: str = "",
                      num_threads: int = 0) -> inference_pb2.Model:
        # Loading downloads and opens the artifact: minutes for a real model, so no short deadline.
        return self._call("inference", inference_pb2_grpc.InferenceServiceStub, "LoadArtifact",
                          inference_pb2.LoadArtifactRequest(artifact_id=artifact_id, device=device, model_id=model_id,
                                                            num_threads=num_threads),
                          timeout=None)

    def load_adapter(self, model_id: str, adapter: str, name: str = "") -> inference_pb2.Model:
        return self._call("inference", inference_pb2_grpc.InferenceServiceStub, "LoadAdapter",
                          inference_pb2.LoadAdapterRequest(model_id=model_id, adapter=adapter, name=name),
                          timeout=None)

    def list_models(self) -> list[inference_pb2.Model]:
        return list(self._call("inference", inference_pb2_grpc.InferenceServiceStub, "ListModels",
                               inference_pb2.ListModelsRequest()).models)

    def unload_model(self, model_id: str) -> inference_pb2.Model:
        return self._call("inference", inference_pb2_grpc.InferenceServiceStub, "UnloadModel",
                          inference_pb2.UnloadModelRequest(model_id=model_id)).model

    def generate(self, prompt: str | list[int], model_id: str, adapter: str = "", chat: bool = False, *,
                 request_id: str = "", **sampling) -> Iterator[inference_pb2.GenerateResponse]:
        """Stream the completion of one prompt (text or token ids). `sampling`: SamplingParams fields
        (loraflow.options.sampling_params.SAMPLING_FIELDS)."""
        request = make_generate_request(prompt, model_id, adapter, chat, request_id=request_id, **sampling)
        yield from self._stream("inference", inference_pb2_grpc.InferenceServiceStub, "Generate", request)

    def generate_batch(self, requests: Iterable[inference_pb2.GenerateRequest | dict]
                       ) -> Iterator[tuple[int, inference_pb2.GenerateResponse]]:
        """Stream many requests served together; yields (index, chunk). A dict request takes the keyword
        arguments of `make_generate_request` (prompt, model_id, adapter, chat, sampling fields)."""
        built = [r if isinstance(r, inference_pb2.GenerateRequest) else make_generate_request(**r) for r in requests]
        stream = self._stream("inference", inference_pb2_grpc.InferenceServiceStub, "GenerateBatch",
                              inference_pb2.GenerateBatchRequest(requests=built))
        for item in stream:
            yield item.index, item.response


def _storage_service(service: str) -> str:
    if service not in ("trainer", "compiler"):
        raise errors.InvalidArgument(f"service must be trainer or compiler (the processes that serve "
                                     f"StorageService), got {service!r}", field="service", value=service)
    return service


def absolute_local_path(value: str) -> str:
    """A relative path that exists here becomes absolute: the services do not share our working directory."""
    if "://" in value or not value:
        return value
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def _present(**fields):
    """Only the fields given: `optional` proto fields distinguish unset (server default) from an explicit 0."""
    return {k: v for k, v in fields.items() if v is not None}


def _prefer_not_found(previous: errors.LoraflowError | None, new: errors.LoraflowError) -> errors.LoraflowError:
    """When no service knows a job, report NOT_FOUND rather than one service being down."""
    if previous is None or isinstance(new, errors.NotFound):
        return new
    return previous


_SAMPLING_FIELDS = frozenset(f.name for f in inference_pb2.SamplingParams.DESCRIPTOR.fields)


def make_generate_request(prompt: str | list[int], model_id: str, adapter: str = "", chat: bool = False, *,
                          request_id: str = "", **sampling) -> inference_pb2.GenerateRequest:
    unknown = set(sampling) - _SAMPLING_FIELDS
    if unknown:
        name = sorted(unknown)[0]
        raise errors.InvalidArgument(f"unknown sampling parameter {name!r}; known: {sorted(_SAMPLING_FIELDS)}",
                                     field=f"sampling.{name}", value=sampling[name])
    params = inference_pb2.SamplingParams(**{k: v for k, v in sampling.items() if v is not None})
    request = inference_pb2.GenerateRequest(model_id=model_id, adapter=adapter, chat=chat, sampling=params,
                                            request_id=request_id)
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.prompt_token_ids.ids.extend(int(t) for t in prompt)
    return request
