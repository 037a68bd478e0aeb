"""Tests that need loraflow/native's library: skipped where it is not built (no C++ compiler), failed
instead when LORAFLOW_REQUIRE_NATIVE=1 (CI builds it, so there a missing library is a bug)."""

from __future__ import annotations

import os

import pytest

from loraflow import native as native_lora


def require_native() -> None:
    """Return if the library is built; else skip, or fail under LORAFLOW_REQUIRE_NATIVE=1."""
    if native_lora.library_path() is not None:
        return
    if os.environ.get("LORAFLOW_REQUIRE_NATIVE") == "1":
        pytest.fail(f"LORAFLOW_REQUIRE_NATIVE=1 but {native_lora.LIBRARY_NAME} is not built (make native)")
    pytest.skip(f"{native_lora.LIBRARY_NAME} is not built here (make native)")
