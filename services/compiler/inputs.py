"""Resolve what a compile request names into local directories, and plan the artifact.

Adapters are named by their registered name (looked up in the registry) or by a path/URI of a
PEFT directory. Both the API (to validate and detect cache hits before queueing) and the worker
(to build) go through `CompileInputs.plan`, so they agree on the artifact id.

The budget comes first: config.json alone (bounded, strict) and the options give the compile job's memory
(loraflow.options.budget.compile_estimate); a request over it is RESOURCE_EXHAUSTED before the base model is
fetched, and again, exactly, once the adapters are read, before the worker allocates anything.

Planning reads no base-model weight when the store has them: a published model directory's manifest
records every file's sha256, so the fingerprint (and the artifact id) comes from config.json, the shard
index and those hashes; the worker fetches the weights only to build (``base_dir``), and checks that
what it fetched is what was planned. A local directory outside the store is hashed (memoised).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from pathlib import Path

from loraflow.errors import FailedPrecondition, InvalidArgument, NotFound
from loraflow.jobs.registry import Registry
from loraflow.options.budget import MemoryEstimate, ResourceBudget, compile_estimate, process_budget
from loraflow.options.hf_config import HfModelConfig
from loraflow.options.names import validate_name
from loraflow.storage.model_source import (
    InputPolicy,
    check_uri,
    is_location,
    materialize,
    read_json_file,
    require_published,
)
from loraflow.storage.store import MANIFEST_NAME, FileStore, ObjectStore, resolve
from services.compiler.artifact import ArtifactPlan, base_fingerprint, fingerprint_from_hashes, plan_artifact
from services.compiler.modeling.checkpoint import INDEX_FILE, SINGLE_FILE, weight_files
from services.compiler.modeling.config import DecoderConfig
from services.compiler.options import DEFAULT_CTX_LEN, CompileOptions

MAX_ADAPTERS = 256


@dataclass(frozen=True)
class ResolvedAdapter:
    name: str
    uri: str  # what the request named, resolved to a URI or path
    path: Path  # local directory


@dataclass(frozen=True)
class ResolvedInputs:
    base_dir: Path | None  # None: the base model is still in the store (``CompileInputs.fetch_base``)
    adapters: tuple[ResolvedAdapter, ...]
    plan: ArtifactPlan


@dataclass(frozen=True)
class _PublishedBase:
    """A base model the store has: its config and the sha256 of each of its files, as published."""

    config: dict
    hashes: dict[str, str]  # file -> sha256


class CompileInputs:
    """Turns (base_model, adapter specs, options) into a validated plan. Thread-safe."""

    def __init__(self, store: ObjectStore, registry: Registry, cache_dir: str | Path, *,
                 policy: InputPolicy | None = None, budget: ResourceBudget | None = None):
        self.store = store
        self._budget = budget  # None: the process's (loraflow.options.budget.process_budget)
        self.registry = registry
        self.cache_dir = Path(cache_dir)
        # The API and the worker both plan through here, so the worker re-checks a (possibly planted) payload.
        self.policy = policy or InputPolicy()
        self._fingerprints: dict[tuple, str] = {}
        self._lock = threading.Lock()

    @property
    def budget(self) -> ResourceBudget:
        return self._budget or process_budget()

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

    def precheck(self, base_model: str, adapter_specs: list[str], options: CompileOptions) -> HfModelConfig:
        """The cheap half of plan (fields, config.json, the memory budget): no weights fetched or hashed."""
        check_uri(base_model, "base_model")
        if len(adapter_specs) > MAX_ADAPTERS:
            raise InvalidArgument(f"adapters lists {len(adapter_specs)} entries; at most {MAX_ADAPTERS}",
                                  field="adapters", value=len(adapter_specs))
        options.validate(num_adapters=len(adapter_specs))
        # config.json alone (no weights fetched yet): a malformed or unsupported model, or options over the
        # budget, are refused before the base model is downloaded or hashed.
        config = read_json_file(base_model, "config.json", self.store, field="base_model", policy=self.policy)
        decoder = DecoderConfig.from_hf_dict(config)
        model = HfModelConfig.from_dict(config, field="base_model")
        self._check_budget(model, decoder, _least_options(options, len(adapter_specs)), adapter_bytes=0)
        return model

    def _published(self, base_model: str) -> _PublishedBase | None:
        """The store's record of ``base_model`` (an s3:// URI, or a path inside a file store's own directory
        that was published there); None for any other local directory. Reads only small files."""
        location = self.policy.check(base_model, self.store, field="base_model")
        if location.remote:
            src, key = resolve(base_model, self.store, field="base_model")
            require_published(src, key, base_model, field="base_model")
        elif isinstance(self.store, FileStore) and self.store.key_of(str(location.path)) and \
                (location.path / MANIFEST_NAME).is_file():
            src, key = self.store, self.store.key_of(str(location.path))
        else:
            return None
        files = {rel: info["sha256"] for rel, info in src.read_manifest(key)["files"].items()}
        if "config.json" not in files:
            raise InvalidArgument(f"base_model {base_model!r} has no config.json (not a Hugging Face checkpoint)",
                                  field="base_model", value=base_model)
        config = read_json_file(base_model, "config.json", self.store, field="base_model", policy=self.policy)
        if INDEX_FILE in files:
            index = read_json_file(base_model, INDEX_FILE, self.store, field="base_model", policy=self.policy)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise InvalidArgument(f"base_model {INDEX_FILE} has no weight_map of shard names", field="base_model",
                                      value=base_model)
            shards = sorted(set(weight_map.values()))
        else:
            shards = [SINGLE_FILE]
        for shard in shards:
            if shard not in files:
                raise InvalidArgument(f"base_model {shard} is missing from {base_model!r}"
                                      f"{f' (named by {INDEX_FILE})' if INDEX_FILE in files else ''}",
                                      field="base_model", value=base_model, metadata={"file": shard})
        return _PublishedBase(config=config, hashes={shard: files[shard] for shard in shards})

    def fetch_base(self, base_model: str, plan: ArtifactPlan) -> Path:
        """The base model's local directory for building; refuses one whose files are not those planned."""
        base_dir = materialize(base_model, self.store, self.cache_dir, field="base_model", kind="models",
                               policy=self.policy)
        published = self._published(base_model)
        if published is not None and fingerprint_from_hashes(published.config, published.hashes.items()) \
                != plan.base_fingerprint:
            raise FailedPrecondition(f"base_model {base_model!r} changed after the job was planned; submit it again",
                                     field="base_model", value=base_model)
        return base_dir

    def plan(self, base_model: str, adapter_specs: list[str], options: CompileOptions) -> ResolvedInputs:
        model = self.precheck(base_model, adapter_specs, options)
        published = self._published(base_model)
        if published is not None:  # no weight read: the store recorded their hashes when it published them
            base_dir, cfg = None, DecoderConfig.from_hf_dict(published.config)
            fingerprint = fingerprint_from_hashes(published.config, published.hashes.items())
        else:
            base_dir = materialize(base_model, self.store, self.cache_dir, field="base_model", kind="models",
                                   policy=self.policy)
            if not (base_dir / "config.json").is_file():
                raise InvalidArgument(f"base_model {base_model!r} has no config.json (not a Hugging Face checkpoint)",
                                      field="base_model", value=base_model)
            cfg = DecoderConfig.from_model_dir(base_dir)  # the copy read is the one checked, before hashing weights
            fingerprint = None
        adapters = tuple(self.resolve_adapter(i, spec) for i, spec in enumerate(adapter_specs))
        try:
            plan = plan_artifact(base_dir, [(a.name, a.path) for a in adapters], options,
                                 fingerprint=fingerprint or self.fingerprint(base_dir), config=cfg)
        except FailedPrecondition as exc:
            # An adapter that does not fit the requested artifact is a bad request here (the same
            # check on LoadAdapter into a loaded model stays FAILED_PRECONDITION).
            index = next((i for i, a in enumerate(adapters) if a.name == exc.metadata.get("adapter")), None)
            if index is None:
                raise
            raise InvalidArgument(exc.message, field=f"adapters[{index}].{exc.field}", value=exc.value,
                                  metadata={"adapter": adapters[index].name}) from None
        read = sum(a.nbytes + b.nbytes for adapter in plan.adapters for a, b in adapter.weights.values())
        self._check_budget(model, plan.config, plan.options, adapter_bytes=read)
        return ResolvedInputs(base_dir=base_dir, adapters=adapters, plan=plan)

    def _check_budget(self, model: HfModelConfig, decoder: DecoderConfig, options: CompileOptions, *,
                      adapter_bytes: int) -> None:
        """ResourceExhausted naming the option (or the base model) that makes the compile job not fit."""
        ctx = options.ctx_len or min(DEFAULT_CTX_LEN, decoder.max_position_embeddings)
        needed = compile_estimate(model, dtype=options.dtype, adapter_slots=int(options.adapter_slots),
                                  max_rank=int(options.max_rank), target_modules=options.target_modules,
                                  ctx_len=int(ctx), full_batch_size=int(options.full_batch_size),
                                  adapter_bytes=adapter_bytes)
        self.budget.check(needed, field=_blamed_field(needed), value=_blamed_value(needed, options))


def _least_options(options: CompileOptions, num_adapters: int) -> CompileOptions:
    """The options resolved as far as the request alone allows, erring small where the adapters decide: rank
    at least the default, target modules as given (or, with adapters to come, the single smallest)."""
    if num_adapters and not options.target_modules:
        options = replace(options, target_modules=("k_proj",))
    return options.resolve(adapter_ranks=(), adapter_targets=[()] * num_adapters)


def _blamed_field(needed: MemoryEstimate) -> str:
    part = max(needed.parts, key=lambda p: p[1])[0]
    if part == "adapter banks":
        return "options.adapter_slots"
    if part == "KV caches":
        return "options.ctx_len"
    if part == "adapters read":
        return "adapters"
    return "base_model"


def _blamed_value(needed: MemoryEstimate, options: CompileOptions):
    field = _blamed_field(needed)
    if field == "options.adapter_slots":
        return f"adapter_slots={options.adapter_slots}, max_rank={options.max_rank}"
    if field == "options.ctx_len":
        return f"ctx_len={options.ctx_len}, full_batch_size={options.full_batch_size}"
    return None
