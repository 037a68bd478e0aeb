"""TrainerService: validate a training request completely, copy its dataset into the store, queue it.

Thin by design: protobuf in, domain settings out (services.trainer.training), and registry records
back to protobuf. No weights are loaded here: the base model is checked from its config.json alone, in
this order, each step bounded before the next starts:

1. the request's fields (no I/O);
2. config.json, read bounded and checked strictly (loraflow.options.hf_config: INVALID_ARGUMENT for a string size,
   a garbage rope_scaling, 1,000,000 layers);
3. the job's memory estimate against the workers' budget (loraflow.options.budget: RESOURCE_EXHAUSTED naming the
   estimate and the limit);
4. the model's module names from a meta-device build, on a small pool of its own (never on the RPC thread)
   and memoised per config; a handler whose client went away (cancelled, past its deadline) stops there
   and between every later step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import redis

from loraflow.artifact.model_families import check_model_family
from loraflow.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from loraflow.jobs.job_service import job_to_proto
from loraflow.jobs.queue import JobQueue, validate_labels, validate_request_id
from loraflow.jobs.registry import AdapterRecord, Registry
from loraflow.options.budget import ResourceBudget, process_budget
from loraflow.options.hf_config import HfModelConfig
from loraflow.options.names import validate_name
from loraflow.security.safe_files import read_regular_file
from loraflow.server.grpc_server import page_size_from_proto, set_timestamp
from loraflow.server.preparation import ClientGone, PreparationPool, preparation_pool
from loraflow.storage.model_source import InputPolicy, read_json_file
from loraflow.storage.store import ADAPTERS_PREFIX, ObjectStore, is_under, resolve
from loraflow.v1 import trainer_pb2, trainer_pb2_grpc
from services.trainer.adapter_registration import RegistrationRequest, prepare_registration
from services.trainer.dataset import MAX_DATASET_BYTES, parse_jsonl
from services.trainer.job_memory import estimate_training
from services.trainer.training import (
    DEFAULT_TARGET_MODULES,
    BaseModelInfo,
    LoraSettings,
    TrainingSettings,
    inspect_base_model,
)

log = logging.getLogger(__name__)

SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name
MAX_URI_LEN = 4096
# Which job is training which adapter name (name -> job id), so two jobs never race for one name.
NAME_RESERVATIONS_KEY = "loraflow:trainer:adapter_names"
_NAME_LOCK_PREFIX = "loraflow:trainer:name-lock:"


# --- proto -> domain (0 / "" mean "the default", as documented in trainer.proto) ------------------

def lora_from_proto(msg: trainer_pb2.LoraConfig) -> LoraSettings:
    # r is `optional` in trainer.proto: unset means 8, an explicit 0 or less is a mistake.
    if msg.HasField("r") and msg.r <= 0:
        raise InvalidArgument(f"lora.r must be > 0, got {msg.r}", field="lora.r", value=msg.r)
    r = msg.r if msg.HasField("r") else 8
    if msg.lora_alpha < 0:
        raise InvalidArgument(f"lora.lora_alpha must be >= 0 (0 = 2 * r), got {msg.lora_alpha}",
                              field="lora.lora_alpha", value=msg.lora_alpha)
    return LoraSettings(
        r=r, lora_alpha=msg.lora_alpha or 2.0 * r,
        target_modules=tuple(msg.target_modules) or DEFAULT_TARGET_MODULES,
        lora_dropout=msg.lora_dropout, bias=msg.bias or "none", use_rslora=msg.use_rslora)


def training_from_proto(msg: trainer_pb2.TrainingConfig) -> TrainingSettings:
    def default(value, fallback):
        return fallback if value == 0 else value

    return TrainingSettings(
        max_steps=msg.max_steps, num_epochs=default(msg.num_epochs, 1.0), batch_size=default(msg.batch_size, 4),
        gradient_accumulation_steps=default(msg.gradient_accumulation_steps, 1),
        learning_rate=default(msg.learning_rate, 2e-4), max_seq_len=default(msg.max_seq_len, 512), seed=msg.seed,
        eval_fraction=msg.eval_fraction, checkpoint_every_steps=default(msg.checkpoint_every_steps, 50),
        device=msg.device or "cpu", warmup_steps=msg.warmup_steps, lr_scheduler=msg.lr_scheduler or "cosine",
        gradient_checkpointing=msg.gradient_checkpointing, weight_decay=msg.weight_decay,
        eval_every_steps=msg.eval_every_steps, world_size=default(msg.world_size, 1),
        nodes=default(msg.nodes, 1))


def lora_to_proto(lora: dict[str, Any]) -> trainer_pb2.LoraConfig:
    return trainer_pb2.LoraConfig(
        r=int(lora.get("r", 0)), lora_alpha=float(lora.get("lora_alpha", 0.0)),
        target_modules=list(lora.get("target_modules", [])), lora_dropout=float(lora.get("lora_dropout", 0.0)),
        bias=str(lora.get("bias", "")), use_rslora=bool(lora.get("use_rslora", False)))


def adapter_to_proto(record: AdapterRecord) -> trainer_pb2.Adapter:
    msg = trainer_pb2.Adapter(name=record.name, uri=record.uri, base_model=record.base_model,
                              lora=lora_to_proto(record.lora), metrics=record.metrics, job_id=record.job_id,
                              digest=record.digest)
    set_timestamp(msg.create_time, record.create_time)
    return msg


def _check_uri(field: str, value: str) -> str:
    if not value or not value.strip():
        raise InvalidArgument(f"{field} must not be empty", field=field, value=value)
    if len(value) > MAX_URI_LEN:
        raise InvalidArgument(f"{field} must be at most {MAX_URI_LEN} characters, got {len(value)}",
                              field=field, value=value)
    if "\x00" in value or not value.isprintable():
        raise InvalidArgument(f"{field} contains control characters", field=field, value=value)
    return value


# --- base model and dataset ---------------------------------------------------------------------

def read_base_config(base_model: str, store: ObjectStore, policy: InputPolicy | None = None) -> dict[str, Any]:
    """config.json of a base model (local dir, file:// or s3:// published dir); InvalidArgument if absent,
    PermissionDenied if the policy does not let requests name it."""
    return read_json_file(base_model, "config.json", store, field="base_model", policy=policy)


def read_dataset_bytes(dataset_uri: str, store: ObjectStore, policy: InputPolicy | None = None) -> bytes:
    """The dataset's bytes: a regular file of at most MAX_DATASET_BYTES the policy lets requests name."""
    location = (policy or InputPolicy()).check(dataset_uri, store, field="dataset_uri")
    if not location.remote:
        return read_regular_file(location.path, field="dataset_uri", limit=MAX_DATASET_BYTES, shown=dataset_uri)
    src, key = resolve(dataset_uri, store, field="dataset_uri")
    try:
        return src.get_bytes(key, max_bytes=MAX_DATASET_BYTES)
    except NotFound:
        raise InvalidArgument(f"dataset_uri {dataset_uri!r} does not exist", field="dataset_uri",
                              value=dataset_uri) from None
    except InvalidArgument as exc:
        raise InvalidArgument(f"dataset_uri {dataset_uri!r}: {exc.message}", field="dataset_uri",
                              value=dataset_uri) from None


def check_causal_lm(config: dict[str, Any], field: str = "base_model") -> str:
    """The config's model_type when transformers knows it as a causal LM; InvalidArgument otherwise."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        shown = model_type if isinstance(model_type, str | None) and len(str(model_type)) <= 64 else "<not a name>"
        raise InvalidArgument(f"base model config.json has model_type {shown!r}, which is not a supported "
                              "causal LM", field=field, value=shown)
    return model_type


class ModelInspector:
    """Builds a config's model on the meta device to list its linear modules, off the RPC threads.

    The build runs on the process's preparation pool (loraflow.server.preparation: bounded threads and queue,
    RESOURCE_EXHAUSTED beyond); it is bounded itself (the config passed hf_config's layer bound and the budget
    first). Results are memoised per config, `cache_size` of them, so a resubmit builds nothing. A caller
    whose client is gone stops waiting (ClientGone); a build already running finishes into the cache.
    """

    def __init__(self, cache_size: int = 64, *, pool: PreparationPool | None = None,
                 build: Callable[[dict[str, Any]], BaseModelInfo] = inspect_base_model):
        self._build = build
        self._pool = pool
        self._cache: OrderedDict[str, futures.Future] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.builds = 0  # meta-device builds started (a cache hit starts none)

    @property
    def pool(self) -> PreparationPool:
        """Where this server's model-sized preparation runs (the process's pool unless one was given)."""
        return self._pool or preparation_pool()

    def inspect(self, config_json: dict[str, Any], alive: Callable[[], bool]) -> BaseModelInfo:
        key = hashlib.sha256(json.dumps(config_json, sort_keys=True).encode()).hexdigest()
        pool = self.pool
        with self._lock:
            future = self._cache.get(key)
            if future is None or future.cancelled() or (future.done() and future.exception() is not None):
                future = pool.submit(lambda: self._build(config_json), what="SubmitTrainingJob")
                self.builds += 1
                self._cache[key] = future
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(key)
        return pool.wait(future, alive)


_INSPECTOR = ModelInspector()


@dataclass(frozen=True)
class TrainingRequest:
    """A fully validated request, ready to queue."""

    adapter_name: str
    base_model: str
    dataset_uri: str
    lora: LoraSettings
    training: TrainingSettings
    request_id: str
    labels: dict[str, str]


def validate_request(request: trainer_pb2.SubmitTrainingJobRequest) -> TrainingRequest:
    """Every check that needs no I/O, in field order; raises InvalidArgument naming the field."""
    return TrainingRequest(
        adapter_name=validate_name("adapter_name", request.adapter_name),
        base_model=_check_uri("base_model", request.base_model),
        dataset_uri=_check_uri("dataset_uri", request.dataset_uri),
        lora=lora_from_proto(request.lora),
        training=training_from_proto(request.training),
        request_id=validate_request_id(request.request_id),
        labels=validate_labels(dict(request.labels)),
    )


class TrainerServiceServicer(trainer_pb2_grpc.TrainerServiceServicer):
    """budget: what a worker may take (None: the process's, loraflow.options.budget.process_budget)."""

    def __init__(self, queue: JobQueue, registry: Registry, store: ObjectStore, *,
                 inputs: InputPolicy | None = None, budget: ResourceBudget | None = None,
                 inspector: ModelInspector | None = None):
        self.queue = queue
        self.registry = registry
        self.store = store
        self.inputs = inputs or InputPolicy()  # default: no local paths beyond the store's own directory
        self.redis: redis.Redis = queue.redis
        self._budget = budget
        self.inspector = inspector or _INSPECTOR

    @property
    def budget(self) -> ResourceBudget:
        return self._budget or process_budget()

    # --- submit --------------------------------------------------------------------------------

    def SubmitTrainingJob(self, request, context):
        try:
            return self._submit(request, context)
        except ClientGone as exc:
            log.info("SubmitTrainingJob for %r abandoned: %s", request.adapter_name[:64], exc)
            context.abort(grpc.StatusCode.CANCELLED, str(exc))

    def _submit(self, request, context):
        def alive() -> bool:
            return context is None or context.is_active()

        def still_wanted(step: str) -> None:
            if not alive():
                raise ClientGone(f"the client went away before {step}")

        req = validate_request(request)
        if req.request_id:
            existing = self.redis.hget(self.queue.request_ids_key, req.request_id)
            if existing is not None:
                return job_to_proto(self.queue.get(existing.decode()))

        config = read_base_config(req.base_model, self.store, self.inputs)
        model_type = check_causal_lm(config)
        # An adapter no compile target can serve is refused now, not at compile time after the training.
        check_model_family(model_type, field="base_model", value=req.base_model)
        model = HfModelConfig.from_dict(config, field="base_model")
        self.budget.check(estimate_training(model, req.lora, req.training), field="base_model",
                          value=req.base_model)
        still_wanted("the base model was inspected")
        info = self.inspector.inspect(config, alive)
        req.lora.check_targets(info.linear_modules)
        still_wanted("the dataset was read")
        # Up to MAX_DATASET_BYTES to read, parse, hash and copy: the preparation pool's work, not this thread's.
        pool = self.inspector.pool
        dataset_key, num_records = pool.run(lambda: self._stage_dataset(req.dataset_uri), alive=alive,
                                            what="SubmitTrainingJob")
        still_wanted("the job was queued")

        payload = {
            "adapter_name": req.adapter_name, "base_model": req.base_model, "dataset_uri": req.dataset_uri,
            "dataset_key": dataset_key, "dataset_records": num_records, "model_type": info.model_type,
            "lora": req.lora.to_dict(), "training": req.training.to_dict(),
        }
        lock = self.redis.lock(_NAME_LOCK_PREFIX + req.adapter_name, timeout=30, blocking_timeout=10)
        if not lock.acquire():
            raise FailedPrecondition(f"adapter_name {req.adapter_name!r} is being submitted concurrently; retry",
                                     field="adapter_name", value=req.adapter_name)
        try:
            self._check_name_free(req.adapter_name)
            record = self.queue.submit(payload, request_id=req.request_id, labels=req.labels)
            if record.payload.get("adapter_name") == req.adapter_name:
                self.redis.hset(NAME_RESERVATIONS_KEY, req.adapter_name, record.id)
        finally:
            lock.release()
        log.info("queued training job %s for adapter %s (%d records)", record.id, req.adapter_name, num_records)
        return job_to_proto(record)

    def _stage_dataset(self, dataset_uri: str) -> tuple[str, int]:
        """The dataset read, validated line by line and copied into the store under its sha256; its key and
        record count. Content-addressed: the worker never reads the client's filesystem."""
        data = read_dataset_bytes(dataset_uri, self.store, self.inputs)
        num_records = len(parse_jsonl(data))
        dataset_key = f"datasets/{hashlib.sha256(data).hexdigest()}.jsonl"
        if not self.store.exists(dataset_key):
            self.store.put_bytes(dataset_key, data)
        return dataset_key, num_records

    def _check_name_free(self, name: str) -> None:
        if self.registry.find_adapter(name) is not None:
            raise AlreadyExists(f"an adapter named {name!r} is already registered", field="adapter_name", value=name)
        holder = self.redis.hget(NAME_RESERVATIONS_KEY, name)
        if holder is None:
            return
        job = self.queue.find(holder.decode())
        # A failed or cancelled job gives its name back; a queued or running one holds it.
        if job is not None and not job.terminal:
            raise AlreadyExists(f"adapter name {name!r} is taken by {job.state.lower()} job {job.id}",
                                field="adapter_name", value=name, metadata={"job_id": job.id})

    # --- registry ------------------------------------------------------------------------------

    def ListAdapters(self, request, context):
        page_size = page_size_from_proto(request.page_size)
        if len(request.page_token) > MAX_URI_LEN:
            raise InvalidArgument("page_token is not a token returned by this service", field="page_token",
                                  value=request.page_token)
        records, token = self.registry.list_adapters(page_size, request.page_token)
        return trainer_pb2.ListAdaptersResponse(adapters=[adapter_to_proto(r) for r in records],
                                                next_page_token=token)

    def GetAdapter(self, request, context):
        validate_name("name", request.name)
        return adapter_to_proto(self.registry.get_adapter(request.name))

    def DeleteAdapter(self, request, context):
        validate_name("name", request.name)
        # Redis is not trusted to say what to delete: only a directory inside this store's adapters/ prefix.
        key = self.store.key_of(self.registry.get_adapter(request.name).uri)
        if not is_under(key, ADAPTERS_PREFIX):
            log.error("refusing to delete adapter %s: its recorded uri is outside the store's adapters/ prefix",
                      request.name)
            raise FailedPrecondition(f"adapter {request.name!r} is recorded at a location outside this store's "
                                     "adapters/; nothing was deleted", field="name", value=request.name)
        record = self.registry.delete_adapter(request.name)
        self.redis.hdel(NAME_RESERVATIONS_KEY, request.name)
        try:
            self.store.delete(key)
        except Exception:  # noqa: BLE001 - the registry entry is gone; stray bytes are only garbage
            log.warning("adapter %s deleted from the registry, but its files at %s could not be removed",
                        record.name, record.uri, exc_info=True)
        return trainer_pb2.DeleteAdapterResponse(adapter=adapter_to_proto(record))

    def RegisterAdapter(self, request, context):
        req = RegistrationRequest.validate(request.name, request.uri, request.base_model)
        existing = self.registry.find_adapter(req.name)
        if existing is not None and existing.job_id:  # a trained adapter's name: refused before any file is read
            raise AlreadyExists(f"an adapter named {req.name!r} is already registered (trained by job "
                                f"{existing.job_id})", field="name", value=req.name)
        if existing is None:
            self._check_name_unreserved(req.name)
        base_config = read_base_config(req.base_model, self.store, self.inputs)
        prepared = prepare_registration(req, base_config, self.store, self.inputs)
        lock = self.redis.lock(_NAME_LOCK_PREFIX + req.name, timeout=30, blocking_timeout=10)
        if not lock.acquire():
            raise FailedPrecondition(f"adapter name {req.name!r} is being registered concurrently; retry",
                                     field="name", value=req.name)
        try:
            existing = self.registry.find_adapter(req.name)
            if existing is not None and existing.uri == prepared.record.uri:
                return trainer_pb2.RegisterAdapterResponse(adapter=adapter_to_proto(existing),
                                                           already_registered=True)
            try:
                if existing is not None:
                    raise AlreadyExists(f"an adapter named {req.name!r} is already registered with other files or "
                                        f"another base model ({existing.base_model!r}); delete it first or choose "
                                        "another name", field="name", value=req.name,
                                        metadata={"registered_uri": existing.uri})
                self._check_name_unreserved(req.name)
            except AlreadyExists:
                if prepared.published_now:  # nothing refers to the copy just published
                    self.store.delete(prepared.key)
                raise
            self.registry.put_adapter(prepared.record)
        finally:
            lock.release()
        log.info("registered adapter %s from %s (base %s)", req.name, req.uri, req.base_model)
        return trainer_pb2.RegisterAdapterResponse(adapter=adapter_to_proto(prepared.record))

    def _check_name_unreserved(self, name: str) -> None:
        """AlreadyExists naming RegisterAdapter's field when a queued or running training job holds ``name``."""
        try:
            self._check_name_free(name)
        except AlreadyExists as err:
            raise AlreadyExists(err.message, field="name", value=name,
                                metadata={k: v for k, v in err.metadata.items() if k not in ("field", "value")}) \
                from None
