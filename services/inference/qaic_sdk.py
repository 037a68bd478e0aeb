"""The Qualcomm Cloud AI 100 platform SDK's Python runtime, found where QEfficient looks for it.

Its own module so that the device check (runtime.check_device) and the AI 100 runtime both import it
without importing each other.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

SDK_PYTHON_DIRS = (f"/opt/qti-aic/dev/lib/{platform.machine()}", "/opt/qti-aic/dev/python")


def import_qaic():
    """(qaicrt, QAicApi_pb2) from the platform SDK, where QEfficient looks for them; ImportError if absent."""
    try:
        import QAicApi_pb2  # its IO descriptor protobuf
        import qaicrt  # the Cloud AI 100 platform runtime
    except ImportError:
        for d in SDK_PYTHON_DIRS:
            if d not in sys.path and Path(d).is_dir():
                sys.path.append(d)
        import QAicApi_pb2
        import qaicrt
    return qaicrt, QAicApi_pb2
