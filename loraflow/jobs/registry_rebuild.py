"""Re-create the adapter and artifact registry in Redis from the object store after a Redis loss.

The store is the source of truth for bytes, and what the registry records is recoverable from it:

* an adapter is a published directory ``adapters/<name>/<job_id>-a<attempt>/`` holding the PEFT files
  (``adapter_config.json``, ``adapter_model.safetensors``) and ``metrics.json`` (metrics, lora settings);
  its ``.manifest.json`` gives the create time and the weights' sha256 (the record's digest). When a
  name has several directories (an attempt fenced after publishing), the newest one wins.
* an artifact is ``artifacts/<artifact_id>/`` with the compiler's ``manifest.json`` (base model, slot
  order, options, architecture); its size is the sum of the published files.

Idempotent: an entry already in the registry is left as it is ("present"); only missing ones are
written ("restored"). Directories that cannot be read back are reported ("skipped") and never stop
the others. Reads are bounded: a config or manifest larger than MAX_JSON_BYTES is skipped unread.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from loraflow.errors import LoraflowError
from loraflow.jobs.registry import (
    MAX_ARTIFACT_ID_LEN,
    AdapterRecord,
    ArtifactAdapterRecord,
    ArtifactRecord,
    Registry,
)
from loraflow.options.names import validate_name
from loraflow.storage.store import ADAPTERS_PREFIX, ARTIFACTS_PREFIX, ObjectStore, join_key

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
METRICS_FILE = "metrics.json"
ARTIFACT_MANIFEST = "manifest.json"
MAX_JSON_BYTES = 4 << 20
_LORA_FIELDS = ("r", "lora_alpha", "target_modules", "lora_dropout", "bias", "use_rslora")


@dataclass(frozen=True)
class RebuildEntry:
    """One line of the rebuild report."""

    kind: str  # "adapter" | "artifact"
    name: str  # adapter name or artifact id
    uri: str
    status: str  # "restored" | "present" | "skipped"
    detail: str = ""


class _Skip(Exception):
    """This directory cannot be turned into a registry record; the message says why."""


def _read_json(store: ObjectStore, key: str, sizes: dict[str, dict], rel: str) -> Any:
    info = sizes.get(rel)
    if info is None:
        raise _Skip(f"{rel} is missing")
    if int(info["size"]) > MAX_JSON_BYTES:
        raise _Skip(f"{rel} is {info['size']} bytes (limit {MAX_JSON_BYTES})")
    try:
        return json.loads(store.get_bytes(join_key(key, rel)))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Skip(f"{rel} is not valid JSON ({type(exc).__name__})") from None


def _float_map(value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        return {}
    out = {}
    for k, v in value.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[str(k)] = float(v)
    return out


def adapter_record_from_store(store: ObjectStore, key: str) -> AdapterRecord:
    """The AdapterRecord the trainer registered for the published directory `key`."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != ADAPTERS_PREFIX:
        raise _Skip(f"not an adapter directory ({ADAPTERS_PREFIX}/<name>/<job>-a<attempt>)")
    name, leaf = parts[1], parts[2]
    try:
        validate_name("name", name)
    except LoraflowError:
        raise _Skip("the directory name is not a valid adapter name") from None
    manifest = store.read_manifest(key)
    files = manifest["files"]
    if ADAPTER_WEIGHTS not in files:
        raise _Skip(f"{ADAPTER_WEIGHTS} is missing")
    config = _read_json(store, key, files, ADAPTER_CONFIG)
    if not isinstance(config, dict):
        raise _Skip(f"{ADAPTER_CONFIG} is not a JSON object")
    extra = _read_json(store, key, files, METRICS_FILE) if METRICS_FILE in files else {}
    if not isinstance(extra, dict):
        extra = {}
    lora = extra.get("lora") if isinstance(extra.get("lora"), dict) else {
        f: config[f] for f in _LORA_FIELDS if f in config}
    if isinstance(lora.get("target_modules"), (set, tuple)):
        lora["target_modules"] = sorted(lora["target_modules"])
    base_model = extra.get("base_model") or config.get("base_model_name_or_path") or ""
    job_id = leaf.rsplit("-a", 1)[0] if "-a" in leaf else ""
    created = manifest.get("created")
    return AdapterRecord(name=name, uri=store.uri(key), base_model=str(base_model), lora=dict(lora),
                         metrics=_float_map(extra.get("metrics")),
                         create_time=float(created) if isinstance(created, (int, float)) else 0.0,
                         job_id=job_id, digest=str(files[ADAPTER_WEIGHTS]["sha256"]))


def _rfc3339(text: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def artifact_record_from_store(store: ObjectStore, key: str) -> ArtifactRecord:
    """The ArtifactRecord the compiler registered for the published directory `key`."""
    parts = key.split("/")
    if len(parts) != 2 or parts[0] != ARTIFACTS_PREFIX:
        raise _Skip(f"not an artifact directory ({ARTIFACTS_PREFIX}/<artifact_id>)")
    artifact_id = parts[1]
    try:
        validate_name("artifact_id", artifact_id, max_len=MAX_ARTIFACT_ID_LEN)
    except LoraflowError:
        raise _Skip("the directory name is not a valid artifact id") from None
    published = store.read_manifest(key)
    files = published["files"]
    manifest = _read_json(store, key, files, ARTIFACT_MANIFEST)
    try:
        if manifest["artifact_id"] != artifact_id:
            raise _Skip(f"{ARTIFACT_MANIFEST} names another artifact id")
        base = manifest["base_model"]
        adapters = tuple(ArtifactAdapterRecord(slot=int(a["slot"]), name=str(a["name"]), digest=str(a["digest"]),
                                               r=int(a["r"])) for a in manifest["adapters"])
        options = dict(manifest["options"])
        created = _rfc3339(manifest.get("created"))
        return ArtifactRecord(
            artifact_id=artifact_id, uri=store.uri(key), base_model=str(base["source"]), adapters=adapters,
            options=options, size_bytes=sum(int(info["size"]) for info in files.values()),
            create_time=created if created is not None else float(published.get("created") or 0.0),
            architecture=str(base.get("architecture", "")))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        # The exception's text may quote the file; name only its kind.
        raise _Skip(f"{ARTIFACT_MANIFEST} lacks what the registry records ({type(exc).__name__})") from None


def _newest_per_name(store: ObjectStore, keys: Iterable[str]) -> tuple[dict[str, str], list[RebuildEntry]]:
    """adapter name -> its newest published directory; the others as "skipped" entries."""
    by_name: dict[str, list[tuple[float, str]]] = {}
    for key in keys:
        name = key.split("/")[1] if key.count("/") == 2 else key
        try:
            created = float(store.read_manifest(key).get("created") or 0.0)
        except LoraflowError:
            created = 0.0
        by_name.setdefault(name, []).append((created, key))
    newest: dict[str, str] = {}
    superseded: list[RebuildEntry] = []
    for name, found in by_name.items():
        found.sort()
        newest[name] = found[-1][1]
        superseded += [RebuildEntry("adapter", name, store.uri(k), "skipped", f"superseded by {found[-1][1]}")
                       for _, k in found[:-1]]
    return newest, superseded


def rebuild_registry(store: ObjectStore, registry: Registry) -> list[RebuildEntry]:
    """Write every adapter and artifact found in `store` that `registry` lacks; returns the report."""
    report: list[RebuildEntry] = []
    newest, superseded = _newest_per_name(store, store.list_dirs(ADAPTERS_PREFIX))
    report += superseded
    for name, key in sorted(newest.items()):
        report.append(_restore("adapter", name, store.uri(key), lambda key=key: adapter_record_from_store(store, key),
                               registry.find_adapter, registry.put_adapter))
    for key in store.list_dirs(ARTIFACTS_PREFIX):
        artifact_id = key.split("/", 1)[1] if "/" in key else key
        report.append(_restore("artifact", artifact_id, store.uri(key),
                               lambda key=key: artifact_record_from_store(store, key),
                               registry.find_artifact, registry.put_artifact))
    return report


def _restore(kind: str, name: str, uri: str, build, find, put) -> RebuildEntry:
    try:
        existing = find(name)
    except LoraflowError:  # an invalid name cannot be in the registry either
        existing = None
    if existing is not None:
        detail = "" if existing.uri == uri else f"registry keeps {existing.uri}"
        return RebuildEntry(kind, name, uri, "present", detail)
    try:
        record = build()
    except (_Skip, LoraflowError) as exc:
        log.warning("registry rebuild: %s %s at %s skipped: %s", kind, name, uri, exc)
        return RebuildEntry(kind, name, uri, "skipped", str(exc))
    put(record)
    return RebuildEntry(kind, name, uri, "restored")
