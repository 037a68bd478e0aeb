"""Transparent huge pages for the compiler's large torch buffers.

A compile allocates and frees one model-sized tensor after another: the bf16 -> float32 conversion, the [K, N]
copy the fused graph stores, the reference's float32/float64 layers. Each buffer is fresh memory from the
kernel, faulted in and zeroed 4 KiB at a time; with PyTorch's ``THP_MEM_ALLOC_ENABLE`` its buffers of 2 MiB
and more are madvise(MADV_HUGEPAGE)d and faulted 2 MiB at a time (numpy already does this by itself). On the
1B fp32 shape the export's convert-and-transpose ran ~1.5x faster (docs/internals.md has the numbers).

PyTorch reads the variable once, at its first allocation, so the process must set it before importing torch:
the compiler's entry points call ``prefer_huge_pages()`` first. An operator's own setting (e.g. ``0``) wins;
a host with THP off (``/sys/kernel/mm/transparent_hugepage/enabled`` = never) is unaffected.
"""

from __future__ import annotations

import os
import sys

ENV = "THP_MEM_ALLOC_ENABLE"


def prefer_huge_pages() -> bool:
    """Ask PyTorch for huge pages unless the environment says otherwise; False when torch is imported
    already (too late to take effect in this process)."""
    if "torch" in sys.modules:
        return False
    os.environ.setdefault(ENV, "1")
    return True
