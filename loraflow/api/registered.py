"""Registered adapters: named, checked, served on first use, never compiled in.

`AutoLoraModelForCausalLM.register_adapters("./adapters")` registers a folder of PEFT adapters (PEFT's own
multi-adapter layout: one sub-directory per adapter, named after it). Unlike `load_adapter`, a registered
adapter takes no slot of the artifact: compile() only makes the banks wide enough for it (rank and target
modules) and leaves room for a few of them at once, and a prompt naming it loads it into a slot on first use
(the least recently used idle one when all are taken). In-process the engine reads it from its directory; against
services it is registered with the trainer (`TrainerService.RegisterAdapter`) and the inference service loads it
from the store. `register_adapters(folder, base_model, connect=...)` does the service half alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from loraflow.artifact.graph_contract import LORA_TARGET_MODULES
from loraflow.artifact.lora_bank import CONFIG_FILE
from loraflow.options.names import is_valid_name

# Adapter slots compile() adds for registered adapters (beyond the loaded ones) when adapter_slots is unset:
# the artifact's working set of first-use adapters, as vLLM's --max-loras is.
FIRST_USE_SLOTS = 8


@dataclass(frozen=True)
class RegisteredAdapter:
    name: str
    spec: str  # as the user gave it (a directory or a store URI)
    path: Path | None  # local PEFT directory (None when only the services read it)
    rank: int  # largest rank of any module
    target_modules: tuple[str, ...]


def discover(folder: str | os.PathLike) -> dict[str, Path]:
    """name -> PEFT directory: `folder` itself when it is one (named after it), else each sub-directory holding
    an adapter_config.json (PEFT's layout for several adapters). ValueError for a name loraflow refuses."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"adapters folder {str(folder)!r} is not a directory")
    if (folder / CONFIG_FILE).is_file():
        found = {folder.resolve().name: folder}
    else:
        found = {p.name: p for p in sorted(folder.iterdir()) if p.is_dir() and (p / CONFIG_FILE).is_file()}
    if not found:
        raise FileNotFoundError(f"{str(folder)!r} holds no PEFT adapter (no {CONFIG_FILE} in it or in a "
                                "sub-directory)")
    bad = sorted(name for name in found if not is_valid_name(name))
    if bad:
        raise ValueError(f"adapter directory names {bad} are not valid adapter names ([A-Za-z0-9._-], 1..64 "
                         "chars): rename them, or pass a {name: directory} mapping")
    return found


def as_mapping(adapters: str | os.PathLike | Mapping[str, str | os.PathLike]) -> dict[str, str]:
    """A folder (see `discover`) or a {name: directory or store URI} mapping, as name -> spec."""
    if isinstance(adapters, Mapping):
        return {str(name): os.fspath(spec) for name, spec in adapters.items()}
    if isinstance(adapters, str) and "://" in adapters:
        raise TypeError("a store URI names one adapter: pass {name: uri}")
    return {name: str(path.resolve()) for name, path in discover(adapters).items()}


def with_first_use_room(options, loaded: Sequence[tuple[int, Iterable[str]]],
                        registered: Sequence[RegisteredAdapter]):
    """CompileOptions whose banks also fit every registered adapter: unset max_rank and target_modules cover
    loaded and registered ones alike; unset adapter_slots is the loaded adapters plus FIRST_USE_SLOTS (fewer
    when fewer are registered, at least the compiler's usual 2 spare)."""
    from services.compiler.options import EXTRA_SLOTS, MIN_DEFAULT_RANK

    if not registered:
        return options
    ranks = [r for r, _ in loaded] + [a.rank for a in registered]
    union = {m for _, targets in loaded for m in targets} | {m for a in registered for m in a.target_modules}
    return replace(
        options,
        max_rank=options.max_rank or max([MIN_DEFAULT_RANK, *ranks]),
        target_modules=options.target_modules or tuple(m for m in LORA_TARGET_MODULES if m in union),
        adapter_slots=options.adapter_slots or len(loaded) + max(EXTRA_SLOTS, min(len(registered), FIRST_USE_SLOTS)))


def room_check(entry: RegisteredAdapter, max_rank: int, targets: Sequence[str], artifact: str) -> None:
    """FailedPrecondition unless banks of ``max_rank`` over ``targets`` can hold ``entry``."""
    from loraflow.errors import FailedPrecondition

    extra = [m for m in entry.target_modules if m not in targets]
    if entry.rank > max_rank or extra:
        why = f"rank {entry.rank} > max_rank {max_rank}" if entry.rank > max_rank else \
            f"target_modules {extra} are not adapted (it covers {list(targets)})"
        raise FailedPrecondition(f"registered adapter {entry.name!r} does not fit the compiled artifact {artifact}: "
                                 f"{why}; call compile() again to serve it", field="adapter_name", value=entry.name)


def register_adapters(adapters: str | os.PathLike | Mapping[str, str | os.PathLike], base_model: str | os.PathLike,
                      *, connect: Any = None) -> dict[str, Any]:
    """Register a folder of PEFT adapters (or a {name: directory or store URI} mapping) with the trainer service
    for `base_model` (as compile jobs name it); name -> `loraflow.v1.Adapter`. Local directories are pushed
    first when the trainer is remote. Registering the same files again is a no-op; another adapter under a
    taken name raises AlreadyExists (nothing after it is registered). Inference then serves each by name on
    first use."""
    from loraflow.api.connection import make_client

    client = make_client(connect if connect is not None else True, services=("trainer",))
    mapping = as_mapping(adapters)
    try:
        return {name: client.register_adapter(name, spec, base_model).adapter for name, spec in mapping.items()}
    finally:
        if client is not connect:
            client.close()
