"""Zeroed arrays whose memory the OS commits one small page at a time, where it is first written.

``np.zeros`` of a large array is a fresh anonymous mapping too (untouched pages cost no memory), but numpy asks
the kernel for transparent huge pages on it (``madvise(MADV_HUGEPAGE)`` above 4 MiB), so the first write anywhere
in a 2 MiB range commits and zeroes all of it. Adapter banks are written one slot at a time, and a slot is a
36-98 KiB block per layer and module, N slots away from its next layer's: a first-use load into a never-written
slot committed the 2 MiB around each of its blocks (every layer, every module it touches), ~20 MB for any
adapter, and zeroing that in the loading thread took most of a load's CPU (27-85 ms per load against 7-8 ms
with small pages, SmolLM2-135M's banks at 161 slots, rank 16; the spread is how much of the host's memory had
been touched before). Banks allocated here commit only the pages a load writes.
"""

from __future__ import annotations

import mmap

import numpy as np


def small_page_zeros(shape: tuple[int, ...], dtype: str | np.dtype = np.float32) -> np.ndarray:
    """A zeroed, writable, C-contiguous array on an anonymous mapping of its own with transparent huge pages
    off: nothing is committed until written, then only the (4 KiB) pages written. Lives as long as the array
    (and its views) does. Empty shapes and platforms without ``mmap.madvise`` get ``np.zeros``."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0 or not hasattr(mmap, "MADV_NOHUGEPAGE"):
        return np.zeros(shape, dtype)
    mapping = mmap.mmap(-1, count * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_NOHUGEPAGE)  # whatever the system's THP mode: small pages, committed as written
    return np.frombuffer(mapping, dtype, count).reshape(shape)
