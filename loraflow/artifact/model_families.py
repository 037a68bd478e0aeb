"""The model families (config.json ``model_type`` strings) the compiler can turn into an artifact.

The compiler declares each family in one module (services/compiler/families/); this tuple is the list the
other parts check against without importing the compiler (the trainer refuses a base model no compile
target supports at submit, not hours later at compile time). A compiler test keeps the two equal.
"""

from __future__ import annotations

from loraflow.errors import InvalidArgument

SUPPORTED_MODEL_FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")


def check_model_family(model_type: object, *, field: str = "base_model", value: object = None) -> str:
    """``model_type`` when a compile target supports it; InvalidArgument naming ``field``, the family and the
    supported list otherwise (``value``: what the error reports as the field's value, default the family)."""
    if isinstance(model_type, str) and model_type in SUPPORTED_MODEL_FAMILIES:
        return model_type
    shown = model_type if isinstance(model_type, str | None) and len(str(model_type)) <= 64 else "<not a name>"
    raise InvalidArgument(f"model family (model_type) {shown!r} is not supported by any compile target; "
                          f"supported families: {list(SUPPORTED_MODEL_FAMILIES)}",
                          field=field, value=shown if value is None else value)
