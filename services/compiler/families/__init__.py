"""The model families the compiler supports, one module each (see spec.py); ``FAMILIES`` by model_type.

Adding a family: a module here exposing ``FAMILY``, its entry below and in loraflow/artifact/model_families.py,
and its tiny test model (tests/support/tiny_models.py)."""

from __future__ import annotations

from loraflow.artifact.model_families import check_model_family
from services.compiler.families import gemma2, gemma3, llama, mistral, phi3, qwen2, qwen3
from services.compiler.families.spec import BlockStructure, FamilyFields, FamilySpec

_MODULES = (llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3)
FAMILIES: dict[str, FamilySpec] = {m.FAMILY.model_type: m.FAMILY for m in _MODULES}


def family(model_type: object, *, field: str = "base_model.model_type") -> FamilySpec:
    """The family of config.json's ``model_type``; InvalidArgument naming ``field`` and the supported list."""
    check_model_family(model_type, field=field)
    if model_type not in FAMILIES:  # listed in the library but not declared here: the registry test catches it
        raise AssertionError(f"model family {model_type!r} has no module in services/compiler/families")
    return FAMILIES[model_type]


__all__ = ["FAMILIES", "BlockStructure", "FamilyFields", "FamilySpec", "family"]
