"""The adapter-slot table of one loaded model: which adapter each bank slot holds, and the banks themselves.

Adapter banks ``lora_a.{m}`` [L, N, in, R] / ``lora_b.{m}`` [L, N, R, out] are laid out as the compiler lays
them (loraflow.artifact.lora_bank); slot 0 is the base model (zeros) and never holds an adapter. ``module_ranks`` (int64
[N, P], graph8's ``lora_ranks``) holds the rank each slot's weights use in each module, ``ranks`` (int64 [N], graph5-7's)
their max, both kept in step with every write. Both runtimes use
this class (``OrtRuntime`` binds the banks as graph inputs, ``Ai100Runtime`` sets them as QPC buffers); a
runtime passes ``sync``, called after every bank write, to bring the device copy up to date.

A slot is free (None), loading (reserved for a name while its weights are written: no request resolves it)
or serving. Requests count themselves on a serving slot (``acquire``/``release``); a slot with no request
is idle and may be reused, least recently used first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loraflow.artifact.graph_contract import runtime_slots
from loraflow.artifact.lora_bank import (
    Adapter,
    BankSpec,
    check_fits,
    clear_slot,
    empty_banks,
    read_adapter,
    slot_module_ranks,
    write_slot,
    write_slot_tensors,
)
from loraflow.artifact.manifest import Manifest
from loraflow.artifact.small_page_zeros import small_page_zeros
from loraflow.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from loraflow.options.budget import serving_estimate
from loraflow.options.names import validate_name
from loraflow.options.settings import MAX_ADAPTER_SLOTS

# --adapter-slots auto: the share of the memory left after the model's weights and KV cache (and what other
# models and the adapter cache hold) that resident adapter slots may take, and the most slots it picks (a
# slot costs only when written, but every one is counted against the budget up front).
AUTO_SLOTS_SHARE = 0.5
MAX_AUTO_SLOTS = 256


def slots_chosen_at_runtime(manifest: Manifest, device: str = "cpu") -> bool:
    """Whether this artifact on ``device`` serves any slot count: a fused CPU graph whose banks are symbolic
    (compiler 0.5, graph6 on). AI 100 programs, traced graphs and older artifacts keep the compiled count."""
    graph = manifest.graph
    return (device == "cpu" and graph.target == "onnxruntime" and graph.shared_kv
            and runtime_slots(graph.inputs + graph.native_inputs))


def slot_bytes(manifest: Manifest, device: str = "cpu") -> int:
    """Bank bytes of one adapter slot (every layer and adapted module at max_rank): what one more slot adds to
    the serving estimate the budget checks."""
    return (serving_estimate(manifest, device=device, adapter_slots=1).total
            - serving_estimate(manifest, device=device, adapter_slots=0).total)


def resident_slots(manifest: Manifest, requested: str | int | None, *, free_bytes: int, device: str = "cpu") -> int:
    """The adapter slots a model keeps resident (``--adapter-slots``): the compiled count where the artifact
    fixes it (or ``requested`` is None); ``requested`` itself (InvalidArgument below the compiled count, whose
    slots hold the compiled-in adapters); ``"auto"``: as many as fit in ``AUTO_SLOTS_SHARE`` of ``free_bytes``
    (the budget not held by other models and the adapter cache) after the model's weights and KV cache, at
    most ``MAX_AUTO_SLOTS``, never fewer than compiled. Whether an explicit count fits is the caller's
    budget check (field ``adapter_slots``)."""
    compiled = manifest.adapter_slots
    if requested is None or not slots_chosen_at_runtime(manifest, device):
        return compiled
    if requested == "auto":
        fixed = serving_estimate(manifest, device=device, adapter_slots=0).total  # weights, KV, slot 0
        per_slot = max(1, slot_bytes(manifest, device))
        fit = int(max(0, free_bytes - fixed) * AUTO_SLOTS_SHARE) // per_slot
        return max(compiled, min(MAX_AUTO_SLOTS, fit))
    if not isinstance(requested, int) or isinstance(requested, bool) or not compiled <= requested <= MAX_ADAPTER_SLOTS:
        raise InvalidArgument(f"adapter_slots must be 'auto' or {compiled}..{MAX_ADAPTER_SLOTS} (artifact "
                              f"{manifest.artifact_id} was compiled with {compiled}), got {requested!r}",
                              field="adapter_slots", value=requested)
    return requested


@dataclass
class AdapterSlot:
    name: str
    r: int
    source: str
    active_requests: int = 0
    last_used: int = 0  # step counter of the last acquire, for picking an idle slot to reuse
    loading: bool = False  # reserved for ``name`` while its weights are written; serves nothing yet

    @property
    def serving(self) -> bool:
        return not self.loading


class AdapterSlots:
    """``adapter_slots`` bank slots (1..N; 0 is the base model) with their names, counts and banks; thread-safe."""

    def __init__(self, manifest: Manifest, dtype: np.dtype, *, sync: Callable[[], None] = lambda: None,
                 adapter_slots: int | None = None):
        """``adapter_slots``: how many slots the banks hold (None: the compiled count; a fused graph6 artifact
        takes any count, see ``resident_slots``). Banks are zeroed lazily by the OS, in small pages
        (``small_page_zeros``): slots never written cost address space, and a load commits only the pages it
        writes (not the 2 MiB huge page around each of its blocks)."""
        self.manifest = manifest
        self.spec = BankSpec.from_manifest(manifest, adapter_slots)
        self.adapter_slots = self.spec.adapter_slots
        self.lora_a, self.lora_b = empty_banks(self.spec, dtype, zeros=small_page_zeros)
        # Each slot's used rank (0: empty or base) per bank module (graph8's lora_ranks) and overall (graph5-7's);
        # a runtime binds these arrays once, so they are updated in place.
        self.module_ranks = np.zeros((self.adapter_slots + 1, len(self.spec.modules)), np.int64)  # [N, P]
        self.ranks = np.zeros(self.adapter_slots + 1, np.int64)  # [N]
        # Per slot, module -> leading rank columns that may be nonzero (what write_slot_tensors wrote): a write
        # zeroes only those of the previous adapter and a copy takes only them, so neither reads or touches the
        # rest of the slot. Changed only while the slot is reserved (one loader) or at open.
        self._held: list[dict[str, int]] = [{} for _ in range(self.adapter_slots + 1)]
        self.slots: list[AdapterSlot | None] = [None] * (self.adapter_slots + 1)
        self._sync = sync
        self._lock = threading.Lock()
        self._slot_idle = threading.Condition(self._lock)  # notified when a slot's last request ends
        self._clock = 0

    def set_sync(self, sync: Callable[[], None]) -> None:
        """The runtime's device update, once its session exists (called after every bank write)."""
        self._sync = sync

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in list(self.lora_a.values()) + list(self.lora_b.values()))

    # ---- lookups ---------------------------------------------------------------------------
    def names(self) -> dict[str, int]:
        """Serving adapter name -> slot (loading slots are not listed)."""
        with self._lock:
            return {s.name: i for i, s in enumerate(self.slots) if s is not None and s.serving}

    def serving(self) -> list[tuple[int, AdapterSlot]]:
        """(slot, entry) of every serving adapter, slot order (for listings)."""
        with self._lock:
            return [(i, s) for i, s in enumerate(self.slots) if i and s is not None and s.serving]

    def free(self) -> int:
        with self._lock:
            return sum(1 for s in self.slots[1:] if s is None)

    # ---- requests --------------------------------------------------------------------------
    def acquire(self, name: str) -> int:
        """lora_id for ``name`` ("" = base model) and count one more request on it; NotFound if not serving."""
        if not name:
            return 0
        with self._lock:
            for i, s in enumerate(self.slots):
                if s is not None and s.serving and s.name == name:
                    s.active_requests += 1
                    self._clock += 1
                    s.last_used = self._clock
                    return i
            loaded = sorted(s.name for s in self.slots if s is not None and s.serving)
        raise NotFound(f"adapter {name!r} is not loaded on this model (loaded: {loaded})", field="adapter",
                       value=name)

    def release(self, lora_id: int) -> None:
        if lora_id == 0:
            return
        with self._slot_idle:
            s = self.slots[lora_id]
            if s is not None and s.active_requests > 0:
                s.active_requests -= 1
                if s.active_requests == 0:
                    self._slot_idle.notify_all()

    # ---- loading ---------------------------------------------------------------------------
    def tensors_of(self, name: str, path: Path) -> tuple[Adapter, int]:
        """Read a PEFT dir for one slot: (the checked adapter, which ``write`` lays out straight into the banks,
        rank). InvalidArgument when it is not a LoRA adapter the banks can express, FailedPrecondition when it
        does not fit the artifact."""
        adapter = read_adapter(name, Path(path), digest=False)  # the slot needs the weights, not their sha256
        check_fits(adapter, self.spec)
        return adapter, adapter.max_module_rank

    def load(self, name: str, path: str | Path, *, source: str = "") -> int:
        """Bind a PEFT adapter dir into a free slot (or the least recently used idle one); returns the slot.

        The adapter is read and checked before any slot changes (see ``tensors_of``); FailedPrecondition
        when the name is taken, ResourceExhausted when every slot serves a request."""
        validate_name("name", name)
        tensors, rank = self.tensors_of(name, Path(path))
        slot, _ = self.reserve(name)
        self.install(slot, name, tensors, rank, source=source or str(path))
        return slot

    def fill(self, slot: int, name: str, path: Path, *, source: str) -> None:
        """Write an adapter compiled into the artifact into its own slot (at open)."""
        tensors, rank = self.tensors_of(name, path)
        self.write(slot, tensors)
        with self._lock:
            self.slots[slot] = AdapterSlot(name=name, r=rank, source=source)

    def reserve(self, name: str, *, wait_s: float = 0.0) -> tuple[int, AdapterSlot | None]:
        """Reserve a free slot, else the least recently used idle one, for ``name``: (slot, evicted).

        ``evicted`` is the adapter that held the slot (its weights are still in the banks until ``write``;
        ``copy`` saves them). With every slot serving a request, waits up to ``wait_s`` for one to go idle,
        then ResourceExhausted. FailedPrecondition when ``name`` is already loaded or loading."""
        deadline = time.monotonic() + wait_s
        with self._slot_idle:
            while True:
                if any(s is not None and s.name == name for s in self.slots):
                    raise FailedPrecondition(f"adapter {name!r} is already loaded on this model", field="name",
                                             value=name)
                free = [i for i in range(1, len(self.slots)) if self.slots[i] is None]
                idle = [i for i in range(1, len(self.slots))
                        if self.slots[i] is not None and self.slots[i].active_requests == 0
                        and self.slots[i].serving]
                if free or idle:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    waited = f" for {wait_s:g} s" if wait_s else ""
                    raise ResourceExhausted(f"all {self.adapter_slots} adapter slots serve running requests "
                                            f"(waited{waited or ' not at all'}); retry when one is idle",
                                            metadata={"adapter_slots": self.adapter_slots, "adapter": name})
                self._slot_idle.wait(left)
            slot = free[0] if free else min(idle, key=lambda i: self.slots[i].last_used)
            evicted = self.slots[slot]
            # Loading: no request resolves the slot while its weights change.
            self.slots[slot] = AdapterSlot(name=name, r=0, source="", loading=True)
        return slot, evicted

    def copy(self, slot: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """A copy of what one slot holds (of a reserved slot, before ``write`` overwrites it), as ``write`` takes
        it: per module the adapter touched, (A^T [L, in, w], B^T [L, w, out]) of its leading w rank columns; the
        rest of the slot is zero, so writing this back restores the slot exactly."""
        return {m: (self.lora_a[m][:, slot, :, :w].copy(), self.lora_b[m][:, slot, :w, :].copy())
                for m, w in self._held[slot].items()}

    def write(self, slot: int, weights: Adapter | dict) -> None:
        """Write an adapter into a slot (a module the adapter does not touch gets zeros): a checked ``Adapter``
        (``tensors_of``), or slot tensors as ``copy`` takes them (a host-cache entry)."""
        if isinstance(weights, Adapter):
            held = write_slot(self.lora_a, self.lora_b, slot, weights, self.spec, held=self._held[slot])
        else:
            held = write_slot_tensors(self.lora_a, self.lora_b, slot, weights, held=self._held[slot])
        self._held[slot] = held
        # From the weights written (not the declared r): columns past it are zero, so it is exact (the modules
        # left out are zero now), per module (graph8) and their max. The slot is reserved (no request reads it)
        # while weights and ranks change.
        self.module_ranks[slot] = slot_module_ranks(
            {m: (self.lora_a[m][:, slot, :, :w], self.lora_b[m][:, slot, :w, :]) for m, w in held.items()},
            list(self.spec.modules))
        self.ranks[slot] = self.module_ranks[slot].max(initial=0)
        self._sync()

    def commit(self, slot: int, name: str, rank: int, *, source: str, active_requests: int = 0) -> None:
        """Name a written slot so requests resolve it; ``active_requests`` counts requests that acquire it in
        the same instant (so no other load can evict it before they are queued)."""
        with self._lock:
            self._clock += 1
            self.slots[slot] = AdapterSlot(name=name, r=rank, source=source, active_requests=active_requests,
                                           last_used=self._clock)

    def install(self, slot: int, name: str, tensors: Adapter | dict, rank: int, *, source: str) -> None:
        """Write ``tensors`` into a reserved slot and name it (it serves from now on)."""
        self.write(slot, tensors)
        self.commit(slot, name, rank, source=source)

    def release_reservation(self, slot: int) -> None:
        """Free a reserved slot whose load failed (zeroed: it may hold part of the new weights)."""
        clear_slot(self.lora_a, self.lora_b, slot)
        self._held[slot] = {}
        self.module_ranks[slot] = 0
        self.ranks[slot] = 0
        self._sync()
        with self._slot_idle:
            self.slots[slot] = None
            self._slot_idle.notify_all()


class ServesAdapterSlots:
    """The adapter half of the runtime interface the engine and the servers call, for a runtime whose slot
    table is ``self.adapters`` (OrtRuntime and Ai100Runtime both: declared once here)."""

    adapters: AdapterSlots

    @property
    def slots(self) -> list[AdapterSlot | None]:
        return self.adapters.slots

    def adapter_names(self) -> dict[str, int]:
        return self.adapters.names()

    def free_adapter_slots(self) -> int:
        return self.adapters.free()

    def load_adapter(self, name: str, path: str | Path, *, source: str = "") -> int:
        """Bind a PEFT adapter dir into a free slot (or the least recently used idle one); see AdapterSlots.load."""
        return self.adapters.load(name, path, source=source)

    def acquire_adapter(self, name: str) -> int:
        """lora_id for ``name`` ("" = base model) and count one more request on it; NotFound if unknown."""
        return self.adapters.acquire(name)

    def release_adapter(self, lora_id: int) -> None:
        self.adapters.release(lora_id)
