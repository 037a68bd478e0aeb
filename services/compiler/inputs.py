"""Resolve what a compile request names into local directories, and plan the artifact.

Adapters are named by their registered name (looked up in the registry) or by a path/URI of a
PEFT directory. Both the API (to validate and detect cache hits before queueing) and the worker
(to build) go through `CompileInputs.plan`, so they agree on the artifact id.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from loraflow.errors import FailedPrecondition, InvalidArgument, NotFound
from loraflow.model_source import InputPolicy, check_uri, is_location, materialize
from loraflow.names import validate_name
from loraflow.registry import Registry
from loraflow.store import ObjectStore
from services.compiler.artifact import ArtifactPlan, base_fingerprint, plan_artifact
from services.compiler.modeling.checkpoint import weight_files
from services.compiler.modeling.config import DecoderConfig
from services.compiler.options import CompileOptions

MAX_ADAPTERS = 256


@dataclass(frozen=True)
class ResolvedAdapter:
    name: str
    uri: str  # what the request named, resolved to a URI or path
    path: Path  # local directory


@dataclass(frozen=True)
class ResolvedInputs:
    base_dir: Path
    adapters: tuple[ResolvedAdapter, ...]
    plan: ArtifactPlan


class CompileInputs:
    """Turns (base_model, adapter specs, options) into a validated plan. Thread-safe."""

    def __init__(self, store: ObjectStore, registry: Registry, cache_dir: str | Path, *,
                 policy: InputPolicy | None = None):
        self.store = store
        self.registry = registry
        self.cache_dir = Path(cache_dir)
        # The API and the worker both plan through here, so the worker re-checks a (possibly planted) payload.
        self.policy = policy or InputPolicy()
        self._fingerprints: dict[tuple, str] = {}
        self._lock = threading.Lock()

    def resolve_adapter(self, index: int, spec: str) -> ResolvedAdapter:
        field = f"adapters[{index}]"
        if not isinstance(spec, str) or not spec.strip():
            raise InvalidArgument(f"{field} must not be empty", field=field, value=spec)
        if is_location(spec):
            check_uri(spec, field)
            path = materialize(spec, self.store, self.cache_dir, field=field, kind="adapters", policy=self.policy)
            name = validate_name(field, spec.rstrip("/").rsplit("/", 1)[-1])
            return ResolvedAdapter(name=name, uri=spec, path=path)
        name = validate_name(field, spec)
        record = self.registry.find_adapter(name)
        if record is None:
            raise NotFound(f"adapter {name!r} is not registered ({field})", field=field, value=name)
        # A registry record is checked like a request: Redis could hold a planted uri.
        path = materialize(record.uri, self.store, self.cache_dir, field=field, kind="adapters", policy=self.policy)
        return ResolvedAdapter(name=name, uri=record.uri, path=path)

    def fingerprint(self, base_dir: Path) -> str:
        """base_fingerprint, memoised on the files' sizes and mtimes (hashing weights takes seconds)."""
        files = [base_dir / "config.json", *weight_files(base_dir)]
        key = (str(base_dir.resolve()),
               tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file()))
        with self._lock:
            cached = self._fingerprints.get(key)
        if cached is None:
            cached = base_fingerprint(base_dir)
            with self._lock:
                self._fingerprints[key] = cached
        return cached

    def plan(self, base_model: str, adapter_specs: list[str], options: CompileOptions) -> ResolvedInputs:
        check_uri(base_model, "base_model")
        if len(adapter_specs) > MAX_ADAPTERS:
            raise InvalidArgument(f"adapters lists {len(adapter_specs)} entries; at most {MAX_ADAPTERS}",
                                  field="adapters", value=len(adapter_specs))
        options.validate(num_adapters=len(adapter_specs))
        base_dir = materialize(base_model, self.store, self.cache_dir, field="base_model", kind="models",
                               policy=self.policy)
        if not (base_dir / "config.json").is_file():
            raise InvalidArgument(f"base_model {base_model!r} has no config.json (not a Hugging Face checkpoint)",
                                  field="base_model", value=base_model)
        DecoderConfig.from_model_dir(base_dir)  # unsupported architecture: say so before hashing weights
        adapters = tuple(self.resolve_adapter(i, spec) for i, spec in enumerate(adapter_specs))
        try:
            plan = plan_artifact(base_dir, [(a.name, a.path) for a in adapters], options,
                                 fingerprint=self.fingerprint(base_dir))
        except FailedPrecondition as exc:
            # An adapter that does not fit the requested artifact is a bad request here (the same
            # check on LoadAdapter into a loaded model stays FAILED_PRECONDITION).
            index = next((i for i, a in enumerate(adapters) if a.name == exc.metadata.get("adapter")), None)
            if index is None:
                raise
            raise InvalidArgument(exc.message, field=f"adapters[{index}].{exc.field}", value=exc.value,
                                  metadata={"adapter": adapters[index].name}) from None
        return ResolvedInputs(base_dir=base_dir, adapters=adapters, plan=plan)
