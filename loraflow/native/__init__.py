"""loraflow's ONNX Runtime custom operators (domain ``ai.loraflow``), built from ``lora_rows.cc``.

``LoraRows`` adds each batch row's LoRA delta to a projection in one CPU kernel (see the .cc file for
its contract). The library is built by ``make native`` (``make install`` runs it) into this directory;
where it is absent (no compiler, another platform, an image built without it) everything still works:
the compiler keeps only the standard-operator graph and the runtime runs that one.
"""

from __future__ import annotations

from pathlib import Path

from loraflow.errors import FailedPrecondition
from loraflow.options import settings

DOMAIN = "ai.loraflow"
OPSET = 1
LIBRARY_NAME = "liblora_rows.so"
# An operator may point at another build of the library (e.g. one baked into an image elsewhere).
LIBRARY_ENV = settings.NATIVE_LIBRARY.env
DISABLE_ENV = settings.NATIVE_DISABLE.env  # "1": behave as if the library were absent


def library_path() -> Path | None:
    """The built library, or None where there is none (or it is disabled)."""
    if settings.NATIVE_DISABLE.from_env():
        return None
    configured = settings.NATIVE_LIBRARY.raw()
    path = Path(configured) if configured else Path(__file__).with_name(LIBRARY_NAME)
    return path if path.is_file() else None


def register(session_options) -> None:
    """Make the operators known to an onnxruntime.SessionOptions; FailedPrecondition without the library."""
    path = library_path()
    if path is None:
        raise FailedPrecondition(f"the native LoRA kernel ({LIBRARY_NAME}) is not built here: run `make native`, "
                                 f"or set {LIBRARY_ENV}", field="lora_kernel", value="native")
    session_options.register_custom_ops_library(str(path))
