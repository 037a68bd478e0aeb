"""In-process compile and serve: the compiler library builds the artifact into the local cache, and
the inference engine runs it on a thread of this process. No Redis, no services.

Artifacts are content-addressed: the directory is `<cache>/artifacts/<artifact_id>` with the id the
compiler computes from the base weights, adapters and options, so compiling the same inputs again
returns at once. A build goes to a temporary directory renamed into place, so a crashed build is
never mistaken for a finished one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from loraflow.api.adapter_set import AdapterSet, LoadedAdapter
from loraflow.api.generation import GenerationRow, Timer, stream_to
from loraflow.api.registered import RegisteredAdapter, room_check, with_first_use_room
from loraflow.artifact import lora_bank
from loraflow.artifact.manifest import Manifest
from loraflow.errors import FailedPrecondition
from services.compiler.options import CompileOptions

# Base-weight fingerprints memoised on (path, sizes, mtimes) across models of this process; CompileInputs
# keeps that memo and needs no store or registry for it.
_fingerprints = None
_fingerprints_lock = threading.Lock()


def _fingerprint(base_dir: Path) -> str:
    global _fingerprints
    with _fingerprints_lock:
        if _fingerprints is None:
            from services.compiler.inputs import CompileInputs

            _fingerprints = CompileInputs(store=None, registry=None, cache_dir=".")
    return _fingerprints.fingerprint(base_dir)


class LocalBackend:
    def __init__(self, base_dir: Path, *, base_source: str, cache_dir: Path, device: str = "cpu",
                 num_threads: int = 0):
        self.base_dir = base_dir
        self.base_source = base_source
        self.cache_dir = cache_dir
        self.device = device
        self.num_threads = num_threads
        self.model = None  # services.inference.model_manager.LoadedModel once compiled
        self.registered: dict[str, RegisteredAdapter] = {}  # name -> adapter served on first use
        self._digests: dict[str, str] = {}  # hot-added adapter -> weights digest

    # ---- compile ------------------------------------------------------------------------------
    def compile(self, adapters: AdapterSet, options: CompileOptions, progress=None) -> tuple[Path, bool]:
        """(artifact dir, cache hit); the artifact is opened on the engine."""
        from services.compiler.artifact import build_artifact, plan_artifact

        self.registered = adapters.registered  # the same dict: adapters registered later are served too
        options = with_first_use_room(options, [(a.adapter.max_module_rank, a.adapter.target_modules)
                                                for a in adapters], list(adapters.registered.values()))
        pairs = [(a.name, a.path) for a in adapters]
        plan = plan_artifact(self.base_dir, pairs, options, fingerprint=_fingerprint(self.base_dir))
        final = self.cache_dir / "artifacts" / plan.artifact_id
        hit = (final / "manifest.json").is_file()
        if not hit:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{plan.artifact_id}-", dir=final.parent))
            try:
                build_artifact(self.base_dir, pairs, options, tmp / "out", plan=plan, base_source=self.base_source,
                               progress=progress)
                try:
                    os.replace(tmp / "out", final)
                except OSError:
                    if not (final / "manifest.json").is_file():  # not another process's finished build
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        self._open(final, plan.artifact_id)
        return final, hit

    def _open(self, artifact_dir: Path, artifact_id: str) -> None:
        from services.inference.model_manager import open_model

        if self.model is not None and self.model.artifact_id == artifact_id:
            return
        self.close()
        self._digests.clear()
        self.model = open_model(artifact_dir, device=self.device, num_threads=self.num_threads,
                                manifest=Manifest.load(artifact_dir), resolve_adapter=self._registered_origin)

    def _registered_origin(self, name: str):
        """Where the engine reads a registered adapter on its first use (None: not registered)."""
        from services.inference.on_demand_adapters import AdapterOrigin

        entry = self.registered.get(name)
        if entry is None or entry.path is None:
            return None
        return AdapterOrigin(str(entry.path), lambda path=entry.path: path, "path")

    @property
    def manifest(self) -> Manifest:
        return self.model.manifest

    @property
    def ctx_len(self) -> int:
        return int(self.manifest.options["ctx_len"])

    def slot_ids(self) -> dict[str, int]:
        return self.model.runtime.adapter_names()

    # ---- adapters after compile ----------------------------------------------------------------
    def hot_add(self, entry: LoadedAdapter) -> int:
        """Serve an adapter on the open artifact without recompiling; FailedPrecondition saying why not."""
        runtime = self.model.runtime
        served = runtime.adapter_names()
        if entry.name in served:
            # Still in its slot (unload_adapter only hides a name): the same weights serve again.
            if self._digests.get(entry.name, self._slot_digest(entry.name)) == entry.digest:
                return served[entry.name]
            raise FailedPrecondition(f"adapter {entry.name!r} is compiled into artifact {self.manifest.artifact_id} "
                                     "with other weights; call compile() again to serve the new ones",
                                     field="adapter_name", value=entry.name)
        spec = lora_bank.BankSpec.from_manifest(self.manifest)
        try:
            lora_bank.check_fits(entry.adapter, spec)
        except FailedPrecondition as exc:
            raise FailedPrecondition(f"adapter {entry.name!r} does not fit the compiled artifact "
                                     f"{self.manifest.artifact_id}: {exc.message}; it is loaded for the next "
                                     "compile(): call compile() again to serve it", field=exc.field,
                                     value=exc.value, metadata={"adapter": entry.name}) from None
        if runtime.free_adapter_slots() == 0:
            # The runtime would reuse an idle slot, silently dropping an adapter this model still lists.
            raise FailedPrecondition(f"adapter {entry.name!r}: all {runtime.adapter_slots} adapter slots of artifact "
                                     f"{self.manifest.artifact_id} are taken; it is loaded for the next compile(): "
                                     "call compile() again (or compile(adapter_slots=N) for room to hot-add)",
                                     field="adapter_slots", value=runtime.adapter_slots)
        slot = runtime.load_adapter(entry.name, entry.path, source=str(entry.path))
        self._digests[entry.name] = entry.digest
        return slot

    def check_room(self, entry: RegisteredAdapter) -> None:
        """FailedPrecondition unless the open artifact's banks fit ``entry`` (rank and target modules)."""
        room_check(entry, self.manifest.max_rank, tuple(self.manifest.graph.lora_modules), self.manifest.artifact_id)

    def _slot_digest(self, name: str) -> str | None:
        for a in self.manifest.adapters:
            if a.name == name:
                return a.digest
        return None

    # ---- generate ------------------------------------------------------------------------------
    def generate(self, rows: list[GenerationRow], sampling: dict[str, Any], timer: Timer,
                 streamer=None) -> list[tuple[list[int], str]]:
        from services.inference.engine import GenerationRequest
        from services.inference.sampling import SamplingParams

        engine = self.model.engine
        requests = [GenerationRequest(prompt_ids=tuple(r.prompt_ids), adapter=r.adapter,
                                      sampling=SamplingParams(max_new_tokens=r.max_new_tokens, **sampling))
                    for r in rows]  # every row's parameters are checked before any is queued
        handles: list = [None] * len(rows)
        ready = [threading.Event() for _ in rows]
        gave_up = threading.Event()
        failure: list[BaseException] = []

        def submit_all() -> None:
            try:
                for i, request in enumerate(requests):
                    if gave_up.is_set():
                        return
                    # Waits for room in the engine's bounded queue instead of failing a long list.
                    handles[i] = engine.submit(request, wait_for_room=gave_up)
                    ready[i].set()
            except BaseException as err:  # noqa: BLE001 - re-raised by the caller
                failure.append(err)
            finally:
                for event in ready:
                    event.set()

        def consume(i: int) -> tuple[list[int], str]:
            ready[i].wait()
            if handles[i] is None:
                return [], "not_submitted"
            ids: list[int] = []
            reason = ""
            if i == 0 and streamer is not None:
                stream_to(streamer, rows[0].prompt_ids)
            for chunk in handles[i]:
                ids.extend(chunk.token_ids)
                timer.token(i, len(chunk.token_ids))
                if i == 0:
                    stream_to(streamer, chunk.token_ids)
                if chunk.finish_reason is not None:
                    reason = chunk.finish_reason.value
            return ids, reason

        submitter = threading.Thread(target=submit_all, name="loraflow-api-submit", daemon=True)
        submitter.start()
        workers = max(1, min(len(rows), engine.runtime.full_batch_size + 8))
        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="loraflow-api-row") as pool:
                results = list(pool.map(consume, range(len(rows))))
        except BaseException:
            gave_up.set()
            for h in handles:
                if h is not None:
                    h.cancel()
            raise
        finally:
            submitter.join()
            if streamer is not None:
                streamer.end()
        if failure:
            raise failure[0]
        return results

    def close(self) -> None:
        if self.model is not None:
            self.model.close()
            self.model = None
