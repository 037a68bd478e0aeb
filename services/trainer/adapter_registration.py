"""RegisterAdapter's work: a PEFT adapter trained elsewhere, checked as LoadAdapter checks it, copied into the store.

Cheap checks come first and nothing heavy runs under the name lock:

1. syntax: the name (loraflow.options.names), ``uri`` and ``base_model`` (bounded, printable, path / file:// / s3://);
2. where: ``InputPolicy`` confines both (PERMISSION_DENIED outside the allowed roots and buckets); a store URI must
   be a published directory (``loraflow adapters push``);
3. the base model's config.json alone (bounded) → its layer count and projection shapes, from the model built on
   the meta device (no weights);
4. the adapter's two files, size-checked, are copied into a private directory (a local directory is walked
   first: no link may lead out of it; a store copy is sha256-checked against its manifest), and that copy goes
   through ``lora_bank.read_adapter`` (the PEFT config and safetensors checks) and ``lora_bank.check_fits``
   against the base: what LoadAdapter runs, on exactly the bytes that are then published;
5. the copy, with a metrics.json so ``loraflow registry rebuild`` restores the record, is published at
   ``adapters/<name>/registered.<id>``, the id hashing both files and the base model: the same registration
   always lands on the same key, and a repeat finds its record and writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from loraflow.artifact import lora_bank
from loraflow.artifact.graph_contract import ALL_LORA_MODULES
from loraflow.errors import FailedPrecondition, InvalidArgument, LoraflowError, ResourceExhausted
from loraflow.jobs.registry import AdapterRecord
from loraflow.options.names import validate_name
from loraflow.security.safe_files import MAX_CONFIG_BYTES, check_tree, confined_file
from loraflow.storage.model_source import InputPolicy, check_uri, is_location, require_published
from loraflow.storage.store import ADAPTERS_PREFIX, MANIFEST_NAME, ObjectStore, join_key, resolve, sha256_file

ADAPTER_FILES = (lora_bank.CONFIG_FILE, lora_bank.WEIGHTS_FILE)
METRICS_FILE = "metrics.json"  # what `registry rebuild` reads back (services/trainer/training.py writes the same)
# The weights are read whole as float32 to be checked (read_adapter), in the API process: a bound keeps that an
# adapter's worth of memory. A rank-64 all-linear adapter of a 7B model is about 320 MB in bf16.
MAX_WEIGHTS_BYTES = 1 << 30
# Registrations checking weights at once in one process (each holds up to ~3x its weights file in memory); one
# more waits up to VALIDATION_WAIT_S, then is RESOURCE_EXHAUSTED.
MAX_CONCURRENT_VALIDATIONS = 2
VALIDATION_WAIT_S = 60.0
KEY_LEAF_PREFIX = "registered."  # no "-a": `registry rebuild` reads "<job>-a<attempt>" leaves as trained ones

_validations = threading.BoundedSemaphore(MAX_CONCURRENT_VALIDATIONS)
_MAX_REMEMBERED_BASES = 16
_shapes: dict[str, lora_bank.BankSpec] = {}  # config.json digest -> shapes (max_rank 0)
_shapes_lock = threading.Lock()
_LAYER_MODULE = re.compile(r"(?:^|\.)layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<module>[a-z_]+)$")


@dataclass(frozen=True)
class RegistrationRequest:
    """A request whose fields passed the checks that need no I/O."""

    name: str
    uri: str
    base_model: str

    @classmethod
    def validate(cls, name: str, uri: str, base_model: str) -> RegistrationRequest:
        validate_name("name", name)
        check_uri(uri, "uri")
        if not is_location(uri):
            raise InvalidArgument(f"uri must be a PEFT adapter directory (a store URI or a local path), got {uri!r}; "
                                  "to register another name for a registered adapter, pull it first",
                                  field="uri", value=uri)
        check_uri(base_model, "base_model")
        return cls(name=name, uri=uri, base_model=base_model)


@dataclass(frozen=True)
class PreparedRegistration:
    """A checked adapter published in the store, not yet in the registry."""

    record: AdapterRecord
    key: str  # the published directory
    published_now: bool  # False when an identical registration had already published it


def base_bank_spec(config_json: dict[str, Any], *, max_rank: int, field: str = "base_model") -> lora_bank.BankSpec:
    """The layers and LoRA-servable projection shapes of the base model config.json describes (meta device);
    remembered per config, since registering many adapters names one base many times."""
    key = hashlib.sha256(json.dumps(config_json, sort_keys=True, default=str).encode()).hexdigest()
    # One builder at a time: concurrent first imports of transformers' lazy modules fail ("cannot import name
    # AutoConfig"), and a second registration for the same base waits for the first one's shapes.
    with _shapes_lock:
        shape = _shapes.get(key)
        if shape is None:
            shape = _shapes[key] = _base_shapes(config_json, field)
            while len(_shapes) > _MAX_REMEMBERED_BASES:
                _shapes.pop(next(iter(_shapes)))
    return replace(shape, max_rank=max_rank)


def _base_shapes(config_json: dict[str, Any], field: str) -> lora_bank.BankSpec:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from services.trainer.training import inspect_base_model

    info = inspect_base_model(config_json, field=field)  # a supported causal LM that builds, or InvalidArgument
    config = AutoConfig.for_model(info.model_type, **{k: v for k, v in config_json.items() if k != "model_type"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes: dict[str, tuple[int, int]] = {}
    layers = 0
    for module_name, module in model.named_modules():
        m = _LAYER_MODULE.search(module_name)
        if m is None or not isinstance(module, torch.nn.Linear) or m["module"] not in ALL_LORA_MODULES:
            continue
        layers = max(layers, int(m["layer"]) + 1)
        shapes.setdefault(m["module"], (module.in_features, module.out_features))
    if not shapes:
        raise InvalidArgument(f"base model config.json describes a {info.model_type} model with none of the "
                              f"projections loraflow serves adapters on ({list(ALL_LORA_MODULES)})",
                              field=field, value=info.model_type)
    return lora_bank.BankSpec(num_layers=layers, max_rank=0, adapter_slots=1,
                              modules={m: shapes[m] for m in ALL_LORA_MODULES if m in shapes},
                              architecture=info.model_type)


def _copy_local(path: Path, dest: Path, uri: str) -> None:
    """The two PEFT files of a local directory (already confined by the policy) into dest, bounded."""
    check_tree(path, field="uri")  # no link leads out of it, nothing but regular files
    for rel in ADAPTER_FILES:
        if not (path / rel).exists():
            raise InvalidArgument(f"uri {uri!r} is not a PEFT adapter directory: it has no {rel}", field="uri",
                                  value=uri)
        source = confined_file(path, rel, field="uri")
        _check_size(rel, source.stat().st_size, uri)
        shutil.copyfile(source, dest / rel)
        _check_size(rel, (dest / rel).stat().st_size, uri)  # it may have grown meanwhile


def _copy_published(store: ObjectStore, uri: str, dest: Path) -> None:
    """The two PEFT files of a published store directory into dest, sizes checked first, sha256 after."""
    src, key = resolve(uri, store, field="uri")
    require_published(src, key, uri, field="uri")
    files = src.read_manifest(key)["files"]
    for rel in ADAPTER_FILES:
        info = files.get(rel)
        if info is None:
            raise InvalidArgument(f"uri {uri!r} is not a PEFT adapter directory: it has no {rel}", field="uri",
                                  value=uri)
        _check_size(rel, int(info["size"]), uri)
        src.get_file(join_key(key, rel), dest / rel)
        if sha256_file(dest / rel) != info["sha256"]:
            raise FailedPrecondition(f"uri {uri!r}: {rel} does not match the sha256 its {MANIFEST_NAME} records "
                                     "(changed after it was published); push it again", field="uri", value=uri)


def _check_size(rel: str, size: int, uri: str) -> None:
    limit = MAX_WEIGHTS_BYTES if rel == lora_bank.WEIGHTS_FILE else MAX_CONFIG_BYTES
    if size > limit:
        raise InvalidArgument(f"uri {uri!r}: {rel} is {size} bytes, more than the {limit} bytes an adapter may "
                              "have", field="uri", value=uri)


def _lora_settings(adapter: lora_bank.Adapter) -> dict[str, Any]:
    """The record's LoraConfig fields (what the weights carry, config values only when they are sane)."""
    dropout = adapter.config.get("lora_dropout", 0.0)
    if not isinstance(dropout, int | float) or isinstance(dropout, bool) or not math.isfinite(dropout) \
            or not 0 <= dropout < 1:
        dropout = 0.0
    return {"r": adapter.r, "lora_alpha": adapter.lora_alpha, "target_modules": list(adapter.target_modules),
            "lora_dropout": float(dropout), "bias": "none", "use_rslora": adapter.use_rslora}


def _as_request_error(err: LoraflowError, work: Path, uri: str) -> LoraflowError:
    """read_adapter names files of the private copy; the caller named ``uri``."""
    message = err.message.replace(str(work), uri)
    value = err.value.replace(str(work), uri) if isinstance(err.value, str) else err.value
    return type(err)(message, field=err.field, value=value, reason=err.reason,
                     metadata={k: v.replace(str(work), uri) for k, v in err.metadata.items()})


def registration_key(name: str, weights_sha256: str, config_sha256: str, base_model: str) -> str:
    ident = hashlib.sha256(json.dumps([weights_sha256, config_sha256, base_model]).encode()).hexdigest()[:24]
    return f"{ADAPTERS_PREFIX}/{name}/{KEY_LEAF_PREFIX}{ident}"


def prepare_registration(req: RegistrationRequest, base_config: dict[str, Any], store: ObjectStore,
                         inputs: InputPolicy) -> PreparedRegistration:
    """Copy, check and publish the adapter ``req`` names; raises the LoadAdapter errors, naming ``uri``."""
    location = inputs.check(req.uri, store, field="uri")  # PermissionDenied outside the allowed roots/buckets
    if not location.remote and not location.path.is_dir():
        raise InvalidArgument(f"uri {req.uri!r} is not a directory", field="uri", value=req.uri)
    if not _validations.acquire(timeout=VALIDATION_WAIT_S):
        raise ResourceExhausted(f"{MAX_CONCURRENT_VALIDATIONS} adapter registrations are being checked in this "
                                f"process; retry", field="uri", value=req.uri)
    try:
        with tempfile.TemporaryDirectory(prefix="loraflow-register-") as tmp:
            work = Path(tmp) / req.name
            work.mkdir()
            if location.remote:
                _copy_published(store, req.uri, work)
            else:
                _copy_local(location.path, work, req.uri)
            try:
                adapter = lora_bank.read_adapter(req.name, work)
                lora_bank.check_fits(adapter, base_bank_spec(base_config, max_rank=adapter.max_module_rank))
            except FailedPrecondition as err:  # the adapter and the base named in one request disagree
                raise InvalidArgument(f"adapter {req.name!r} does not fit base_model {req.base_model!r}: "
                                      f"{err.message}", field=err.field, value=err.value,
                                      metadata={"base_model": req.base_model}) from None
            except InvalidArgument as err:
                raise _as_request_error(err, work, req.uri) from None
            lora = _lora_settings(adapter)
            key = registration_key(req.name, adapter.digest, sha256_file(work / lora_bank.CONFIG_FILE),
                                   req.base_model)
            record = AdapterRecord(name=req.name, uri=store.uri(key), base_model=req.base_model, lora=lora,
                                   metrics={}, create_time=time.time(), job_id="", digest=adapter.digest)
            if store.dir_exists(key):
                return PreparedRegistration(record, key, published_now=False)
            (work / METRICS_FILE).write_text(json.dumps(
                {"base_model": req.base_model, "lora": lora, "metrics": {}, "registered_from": req.uri}, indent=2))
            store.publish_dir(key, work)
            return PreparedRegistration(record, key, published_now=True)
    finally:
        _validations.release()
