"""The adapters a model holds, with QEfficient's bookkeeping: names in load order, ids from 1.

`active_adapter_to_id` numbers the loaded adapters 1..n in load order (0 is the base model, named
"base" in `prompt_to_adapter_mapping`), renumbered after an unload, as QEfficient does. Each entry
keeps what the user named (spec) and the local directory it resolved to, read and checked once.
Registered adapters (loraflow.api.registered) are kept apart: prompts may name them, they have no id.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from loraflow.api.registered import RegisteredAdapter
from loraflow.artifact.lora_bank import Adapter

BASE = "base"


class UnknownAdapterError(KeyError, ValueError):
    """A prompt named an adapter that is not loaded (both a KeyError and a ValueError, like a lookup)."""

    def __init__(self, name: str, loaded: Iterable[str]):
        self.name = name
        self.loaded = sorted(loaded)
        super().__init__(f"adapter {name!r} is not loaded; loaded adapters: {self.loaded} "
                         f"(use {BASE!r} for the base model)")

    def __str__(self) -> str:  # KeyError would show the repr of the message
        return str(self.args[0])


@dataclass(frozen=True)
class LoadedAdapter:
    name: str
    spec: str  # as the user gave it (path, URI or name)
    path: Path | None  # local directory (None when only the remote service can read it)
    adapter: Adapter | None  # read and validated (None when remote-only)

    @property
    def digest(self) -> str | None:
        return self.adapter.digest if self.adapter is not None else None


class AdapterSet:
    def __init__(self) -> None:
        self._adapters: dict[str, LoadedAdapter] = {}
        self.registered: dict[str, RegisteredAdapter] = {}  # served on first use, never compiled in

    def add(self, entry: LoadedAdapter) -> int:
        """Add an adapter; the same name and weights again is a no-op. Returns its id."""
        if entry.name in self.registered:
            raise ValueError(f"adapter name {entry.name!r} is registered (served on first use) from "
                             f"{self.registered[entry.name].spec!r}; unload_adapter({entry.name!r}) first to load it")
        existing = self._adapters.get(entry.name)
        if existing is not None:
            if existing.digest != entry.digest or (existing.digest is None and existing.spec != entry.spec):
                raise ValueError(f"adapter name {entry.name!r} is already loaded from {existing.spec!r}; "
                                 f"unload_adapter({entry.name!r}) first to load {entry.spec!r} under that name")
            return self.ids()[entry.name]
        self._adapters[entry.name] = entry
        return self.ids()[entry.name]

    def register(self, entry: RegisteredAdapter) -> None:
        """Add a registered adapter; the same name from the same spec again is a no-op."""
        if entry.name in self._adapters:
            raise ValueError(f"adapter name {entry.name!r} is loaded from {self._adapters[entry.name].spec!r}; "
                             f"unload_adapter({entry.name!r}) first to register another under that name")
        existing = self.registered.get(entry.name)
        if existing is not None and existing.spec != entry.spec:
            raise ValueError(f"adapter name {entry.name!r} is registered from {existing.spec!r}; "
                             f"unload_adapter({entry.name!r}) first to register {entry.spec!r} under that name")
        self.registered[entry.name] = entry

    def remove(self, name: str) -> bool:
        return self._adapters.pop(name, None) is not None or self.registered.pop(name, None) is not None

    def get(self, name: str) -> LoadedAdapter:
        if name not in self._adapters:
            raise UnknownAdapterError(name, self._adapters)
        return self._adapters[name]

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    def __iter__(self):
        return iter(list(self._adapters.values()))

    def __len__(self) -> int:
        return len(self._adapters)

    def names(self) -> list[str]:
        return list(self._adapters)

    def ids(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self._adapters, start=1)}

    def engine_name(self, mapped: str) -> str:
        """The engine's adapter name for one `prompt_to_adapter_mapping` entry ("" = base model)."""
        if mapped == BASE:
            return ""
        if not isinstance(mapped, str) or (mapped not in self._adapters and mapped not in self.registered):
            raise UnknownAdapterError(mapped, [*self._adapters, *self.registered])
        return mapped
