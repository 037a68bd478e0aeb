"""Loaded models: artifact → cache → runtime + tokenizer + engine, and adapters hot-added to them.

``open_model`` builds a LoadedModel from a local artifact directory (benchmarks, tests);
``ModelManager`` adds the registry (artifact id → URI, adapter name → URI), the store and the
local cache, and keeps the loaded models by id. No protobuf here: the servicer converts.

Memory is decided before it is taken: LoadArtifact estimates the artifact (graph weights + KV cache +
adapter banks, loraflow.options.budget.serving_estimate) from its manifest — read from the store before the
artifact is downloaded, and again from the verified copy before a session opens — and refuses it
(RESOURCE_EXHAUSTED naming artifact_id, the estimate and the limit) when it does not fit beside the
models already loaded or loading and the host adapter cache's cap, within ``--memory-budget``. An
adapter (LoadAdapter, or one loaded on first use) whose files are larger than any adapter that fits one
bank slot can be is refused before it is fetched or read.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loraflow.artifact.manifest import MANIFEST_FILE, Manifest
from loraflow.errors import AlreadyExists, InvalidArgument, LoraflowError, NotFound, ResourceExhausted
from loraflow.options.budget import (
    MemoryEstimate,
    ResourceBudget,
    adapter_dir_limit,
    format_bytes,
    process_budget,
    serving_estimate,
)
from loraflow.options.names import validate_name
from loraflow.security.safe_files import check_tree
from loraflow.storage.model_source import InputPolicy, is_location
from loraflow.storage.store import MANIFEST_NAME, ObjectStore, artifact_key, join_key, resolve
from services.inference import metrics
from services.inference.adapter_cache import DEFAULT_ADAPTER_CACHE_BYTES, HostAdapterCache
from services.inference.adapter_slots import resident_slots
from services.inference.artifact_cache import ArtifactCache
from services.inference.engine import Engine
from services.inference.on_demand_adapters import (
    DEFAULT_ADAPTER_WAIT_S,
    MAX_ADAPTER_WAIT_S,
    AdapterOrigin,
    OnDemandAdapters,
)
from services.inference.registry_cache import CachedAdapterRecords
from services.inference.runtime import OrtRuntime, check_device
from services.inference.spinning import DEFAULT_SPINNING, check_spinning
from services.inference.tokenization import TextTokenizer


@dataclass
class LoadedModel:
    model_id: str
    artifact_id: str
    device: str
    manifest: Manifest
    runtime: OrtRuntime
    tokenizer: TextTokenizer
    engine: Engine
    adapters: OnDemandAdapters
    memory: MemoryEstimate | None = None  # what the budget counted for it (ModelManager)

    @property
    def base_model(self) -> str:
        return self.manifest.base_model.source

    def close(self) -> None:
        self.engine.stop()
        self.runtime.close()


def compiled_in_origin(artifact_dir: Path, manifest: Manifest, name: str) -> AdapterOrigin | None:
    """Where an adapter compiled into the artifact is read from again after its eviction."""
    for entry in manifest.adapters:
        if entry.name == name:
            return AdapterOrigin(f"artifact:{entry.path}", lambda p=artifact_dir / entry.path: p, "artifact")
    return None


def open_model(artifact_dir: str | Path, *, device: str = "cpu", num_threads: int = 0, model_id: str = "",
               max_waiting: int = 64, manifest: Manifest | None = None, spinning: str = DEFAULT_SPINNING,
               allow_spinning: bool | None = None,
               resolve_adapter: Callable[[str], AdapterOrigin | None] | None = None,
               adapter_cache: HostAdapterCache | None = None,
               adapter_wait_s: float = DEFAULT_ADAPTER_WAIT_S,
               may_grow: Callable[[int], bool] | None = None, adapter_slots: int | None = None) -> LoadedModel:
    """Open a local, already verified artifact directory and start its engine; ``adapter_slots``: the
    resident slots (None: the compiled count; see adapter_slots.resident_slots).

    A request naming an adapter that is not in a slot loads it on first use from the artifact (one
    compiled in) or from ``resolve_adapter(name)`` (the registry, for a ModelManager)."""
    artifact_dir = Path(artifact_dir)
    manifest = manifest or Manifest.load(artifact_dir)
    if check_device(device) == "ai100":  # a QPC on Cloud AI 100 through qaicrt
        from services.inference.ai100_runtime import Ai100Runtime

        runtime = Ai100Runtime(artifact_dir, manifest)
    else:
        if allow_spinning is not None:  # the old boolean (bench/scale.py): on or off
            spinning = "on" if allow_spinning else "off"
        runtime = OrtRuntime(artifact_dir, manifest, device=device, num_threads=num_threads, spinning=spinning,
                             may_grow=may_grow, adapter_slots=adapter_slots)
    eos = tuple(manifest.generation_config.get("eos_token_ids") or ())
    tokenizer = TextTokenizer(artifact_dir / manifest.tokenizer_dir, chat_template=manifest.chat_template,
                              eos_ids=eos)
    model_id = model_id or manifest.artifact_id

    def resolve(name: str) -> AdapterOrigin:
        origin = compiled_in_origin(artifact_dir, manifest, name) or (resolve_adapter and resolve_adapter(name))
        if origin is None:
            raise NotFound(f"adapter {name!r} is neither loaded on model {model_id!r} nor registered",
                           field="adapter", value=name)
        return origin

    adapters = OnDemandAdapters(runtime, model_id=model_id, artifact_id=manifest.artifact_id, resolve=resolve,
                                cache=adapter_cache if adapter_cache is not None else HostAdapterCache(),
                                wait_s=adapter_wait_s)
    engine = Engine(runtime, tokenizer, model_id=model_id, max_waiting=max_waiting, adapters=adapters).start()
    return LoadedModel(model_id, manifest.artifact_id, runtime.device, manifest, runtime, tokenizer, engine,
                       adapters)


MAX_MANIFEST_BYTES = 16 << 20  # an artifact manifest lists a few dozen files


def adapter_limit(manifest: Manifest) -> int:
    """The most bytes an adapter directory may hold to fit one bank slot of `manifest`'s artifact."""
    return adapter_dir_limit(manifest.graph.layers, manifest.max_rank,
                             {m: (s.in_features, s.out_features) for m, s in manifest.graph.lora_modules.items()})


def _check_adapter_size(uri: str, nbytes: int, max_bytes: int) -> None:
    if nbytes > max_bytes:
        raise ResourceExhausted(
            f"adapter {uri!r} holds {format_bytes(nbytes)} of files, more than the {format_bytes(max_bytes)} an "
            "adapter that fits one slot of this model can hold (every layer and adapted module at the artifact's "
            "max_rank); it was not fetched", field="adapter", value=uri, reason="ADAPTER_TOO_LARGE",
            metadata={"estimate_bytes": str(nbytes), "limit_bytes": str(max_bytes)})


def model_identity(artifact_id: str, device: str, model_id: str) -> tuple[str, str]:
    """(device, model_id) of a LoadArtifact, validated; the model id defaults to the artifact id (plus the
    device when it is not the CPU), so every replica names the same load the same way."""
    validate_name("artifact_id", artifact_id)
    device = check_device(device or "cpu")
    if model_id:
        validate_name("model_id", model_id)
    return device, model_id or (artifact_id if device == "cpu" else f"{artifact_id}-{device}")


class ModelManager:
    """Thread-safe set of loaded models; ``on_change(n_models)`` lets the server flip its health.

    Registered adapters load on first use (see services.inference.on_demand_adapters); evicted ones
    stay in one host cache of ``adapter_cache_bytes`` shared by every model; a request waits at most
    ``adapter_wait_s`` for an idle adapter slot."""

    def __init__(self, *, store: ObjectStore, registry, cache_dir: str | Path, max_waiting: int = 64,
                 on_change: Callable[[int], None] | None = None, spinning: str = DEFAULT_SPINNING,
                 inputs: InputPolicy | None = None, adapter_cache_bytes: int = DEFAULT_ADAPTER_CACHE_BYTES,
                 adapter_wait_s: float = DEFAULT_ADAPTER_WAIT_S, budget: ResourceBudget | None = None,
                 adapter_slots: str | int | None = None):
        """``adapter_slots``: resident adapter slots of each loaded model, ``"auto"`` (sized from the memory
        budget), a count, or None (the compiled count); see adapter_slots.resident_slots."""
        self._budget = budget  # None: the process's (loraflow.options.budget.process_budget)
        self.adapter_slots = adapter_slots
        self._reserved: dict[str, MemoryEstimate] = {}  # loads in flight, counted before they allocate
        self.adapter_cache = HostAdapterCache(adapter_cache_bytes)  # InvalidArgument outside its bounds
        if not isinstance(adapter_wait_s, int | float) or not 0 <= adapter_wait_s <= MAX_ADAPTER_WAIT_S:
            raise InvalidArgument(f"adapter_wait_s must be in 0..{MAX_ADAPTER_WAIT_S:g} seconds, got {adapter_wait_s!r}",
                                  field="adapter_wait_s", value=adapter_wait_s)
        self.adapter_wait_s = float(adapter_wait_s)
        self.store = store
        self.inputs = inputs or InputPolicy()  # which local paths / buckets LoadAdapter may name
        self.registry = registry
        # Registered adapters' records, read from Redis once and invalidated by it (registry_cache.py).
        self.adapter_records = CachedAdapterRecords(registry)
        self.cache_dir = Path(cache_dir)
        self.cache = ArtifactCache(cache_dir, store)
        self.max_waiting = max_waiting
        self.spinning = check_spinning(spinning)
        self._on_change = on_change or (lambda n: None)
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()
        self._loading: set[str] = set()

    def load_artifact(self, artifact_id: str, device: str = "cpu", model_id: str = "",
                      num_threads: int = 0) -> LoadedModel:
        device, model_id = model_identity(artifact_id, device, model_id)
        with self._lock:
            existing = self._models.get(model_id)
            if existing is not None:
                if existing.artifact_id == artifact_id and existing.device == device:
                    return existing  # loading the same thing twice is a no-op
                raise AlreadyExists(f"model_id {model_id!r} is already loaded (artifact {existing.artifact_id} "
                                    f"on {existing.device})", field="model_id", value=model_id)
            if model_id in self._loading:
                raise AlreadyExists(f"model_id {model_id!r} is being loaded", field="model_id", value=model_id)
            self._loading.add(model_id)
        try:
            record = self.registry.get_artifact(artifact_id)  # NotFound for an unknown id
            announced = self._stored_manifest(artifact_id)
            if announced is not None:  # before downloading a byte of it
                self._reserve(model_id, serving_estimate(announced, device=device), artifact_id)
            local_dir, manifest = self.cache.fetch(artifact_id, record.uri)
            memory = self._reserve(model_id, serving_estimate(manifest, device=device), artifact_id)
            slots = resident_slots(manifest, self.adapter_slots, free_bytes=self._free_bytes(model_id),
                                   device=device)
            if slots != manifest.adapter_slots:  # its banks counted again at the chosen size
                memory = self._reserve(model_id, serving_estimate(manifest, device=device, adapter_slots=slots),
                                       artifact_id, field="adapter_slots", value=slots)
            limit = adapter_limit(manifest)
            model = open_model(local_dir, device=device, num_threads=num_threads, model_id=model_id,
                               max_waiting=self.max_waiting, manifest=manifest,
                               spinning=self.spinning,
                               resolve_adapter=lambda name: self._registered_origin(name, limit),
                               adapter_cache=self.adapter_cache, adapter_wait_s=self.adapter_wait_s,
                               may_grow=self._fits, adapter_slots=slots)
            model.memory = memory
        finally:
            with self._lock:
                self._loading.discard(model_id)
                self._reserved.pop(model_id, None)
        with self._lock:
            self._models[model_id] = model
            count = len(self._models)
        metrics.log_event("model_loaded", model=model_id, artifact_id=artifact_id, device=device,
                          lora_kernel=getattr(model.runtime, "lora_kernel", ""),
                          adapter_slots=getattr(model.runtime, "adapter_slots", 0))
        self._on_change(count)
        return model

    @property
    def budget(self) -> ResourceBudget:
        return self._budget or process_budget()

    def _reserve(self, model_id: str, needed: MemoryEstimate, artifact_id: str, *, field: str = "artifact_id",
                 value: object = None) -> MemoryEstimate:
        """Count `needed` for a load in flight, unless it does not fit beside what is loaded or loading and the
        adapter cache's cap (ResourceExhausted naming `field` (artifact_id, or adapter_slots for the banks of
        an explicit --adapter-slots), the estimate and the limit)."""
        with self._lock:
            loaded, loading = self._held(but_loading=model_id)
            in_use = sum(loaded) + sum(loading) + self.adapter_cache.max_bytes
            what = (f"{len(loaded)} loaded model(s), {len(loading)} loading and the adapter cache's "
                    f"{format_bytes(self.adapter_cache.max_bytes)} (--adapter-cache-bytes)")
            self.budget.check(needed, field=field, value=artifact_id if value is None else value, in_use=in_use,
                              in_use_what=what)
            self._reserved[model_id] = needed
        return needed

    def _held(self, but_loading: str | None = None) -> tuple[list[int], list[int]]:
        """Estimated bytes of each loaded model and of each load in flight (but ``but_loading``'s); under the
        lock."""
        loaded = [m.memory.total for m in self._models.values() if m.memory is not None]
        loading = [e.total for k, e in self._reserved.items() if k != but_loading]
        return loaded, loading

    def _free_bytes(self, model_id: str) -> int:
        """The budget not held by other loaded or loading models and the adapter cache's cap."""
        with self._lock:
            loaded, loading = self._held(but_loading=model_id)
        return self.budget.memory_bytes - sum(loaded) - sum(loading) - self.adapter_cache.max_bytes

    def _fits(self, extra_bytes: int) -> bool:
        """Whether a loaded model may grow by ``extra_bytes`` (auto's sleeping session) within the budget."""
        with self._lock:
            loaded, loading = self._held()
        return sum(loaded) + sum(loading) + self.adapter_cache.max_bytes + extra_bytes <= self.budget.memory_bytes

    def _stored_manifest(self, artifact_id: str) -> Manifest | None:
        """The artifact's manifest as the store holds it (small, bounded), or None when it cannot be read
        that way: the fetch that follows then verifies it and fails with the precise error."""
        key = artifact_key(artifact_id)
        try:
            if not self.store.dir_exists(key):
                return None
            raw = self.store.get_bytes(join_key(key, MANIFEST_FILE), max_bytes=MAX_MANIFEST_BYTES)
            return Manifest.from_dict(json.loads(raw))
        except (LoraflowError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
            return None

    def get(self, model_id: str) -> LoadedModel:
        with self._lock:
            model = self._models.get(model_id)
        if model is None:
            raise NotFound(f"model {model_id!r} is not loaded", field="model_id", value=model_id)
        return model

    def list(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._models.values())

    def unload(self, model_id: str) -> LoadedModel:
        with self._lock:
            model = self._models.pop(model_id, None)
            count = len(self._models)
        if model is None:
            raise NotFound(f"model {model_id!r} is not loaded", field="model_id", value=model_id)
        model.close()
        with self._lock:
            artifact_in_use = any(m.artifact_id == model.artifact_id for m in self._models.values())
        if not artifact_in_use:  # its evicted adapters' weights fit no other loaded model
            self.adapter_cache.forget_artifact(model.artifact_id)
            metrics.ADAPTER_CACHE_BYTES.set(self.adapter_cache.nbytes)
        metrics.log_event("model_unloaded", model=model_id)
        self._on_change(count)
        return model

    def load_adapter(self, model_id: str, adapter: str, name: str = "") -> LoadedModel:
        """Hot-add a registered adapter (by name) or a PEFT dir (store URI or local path) into a free slot
        (or the least recently used idle one)."""
        model = self.get(model_id)
        if not adapter:
            raise InvalidArgument("adapter must name a registered adapter or a URI", field="adapter", value=adapter)
        limit = adapter_limit(model.manifest)
        if is_location(adapter):
            # confined (PermissionDenied outside the allowed roots) and bounded before a byte is fetched
            local = self._fetch_adapter_uri(adapter, limit)
            name = name or local.name
            origin = AdapterOrigin(adapter, lambda: local, "path")
        else:
            validate_name("adapter", adapter)
            record = self.registry.get_adapter(adapter)  # NotFound for an unknown name
            name = name or record.name
            origin = AdapterOrigin(record.uri, lambda: self._fetch_adapter_uri(record.uri, limit), "store")
        slot = model.adapters.load(name, origin)
        metrics.log_event("adapter_hot_added", model=model_id, adapter=name, slot=slot, source=origin.source)
        return model

    def _registered_origin(self, name: str, max_bytes: int) -> AdapterOrigin | None:
        """A registered adapter's origin (its record's URI, confined and bounded when fetched), or None."""
        record = self.find_adapter(name)
        if record is None:
            return None
        return AdapterOrigin(record.uri, lambda: self._fetch_adapter_uri(record.uri, max_bytes), "store")

    def _fetch_adapter_uri(self, uri: str, max_bytes: int) -> Path:
        # Requests and registry records alike: Redis could hold a planted uri.
        location = self.inputs.check(uri, self.store, field="adapter")
        store, key = resolve(uri, self.store, field="adapter")
        if store.dir_exists(key):
            files = store.read_manifest(key)["files"]
            _check_adapter_size(uri, sum(int(info["size"]) for info in files.values()), max_bytes)
            dest = self.cache_dir / "adapters" / key.replace("/", "__")
            return store.fetch_dir(key, dest)
        # A plain local PEFT directory (not published to a store) is read in place, once no link in it
        # leads outside it.
        if location.path is not None and location.path.is_dir():
            rels = check_tree(location.path, field="adapter")
            _check_adapter_size(uri, sum((location.path / rel).stat().st_size for rel in rels
                                         if rel != MANIFEST_NAME), max_bytes)
            return location.path
        raise NotFound(f"no adapter directory at {uri}", field="adapter", value=uri)

    def find_adapter(self, name: str):
        """The registered adapter's record (AdapterRecord) or None; a repeated lookup costs no Redis round trip."""
        return self.adapter_records.find_adapter(name)

    def close(self) -> None:
        for model_id in [m.model_id for m in self.list()]:
            try:
                self.unload(model_id)
            except NotFound:
                pass
        self.adapter_records.close()

    def clear_cache(self) -> None:
        shutil.rmtree(self.cache.root, ignore_errors=True)
