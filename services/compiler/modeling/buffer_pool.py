"""Reused memory for the compiler's stream of same-shaped tensors.

A compile converts one weight after another, and every layer repeats the same shapes: the checkpoint's bytes
read into a staging buffer, converted to float32, converted to float64 for the reference. Each fresh
buffer is memory the kernel faults in and zeroes first (2 MiB at a time with transparent huge pages), work the
conversion then overwrites: on the Llama-3.2-1B shape in fp32 that zeroing was 21 % of the compile's CPU
(perf: ``clear_page_erms`` under the reference's float64 conversion and the export's float32 one). A pool hands
a buffer out for one tensor and takes it back once the tensor is consumed, so the next layer's tensor of the
same size reuses it.

Bounded: a pool keeps at most ``keep`` idle buffers of one size (a given-back buffer beyond that is freed), and
the idle set is only ever buffers that were in use at the same time, so a pass's peak memory does not grow;
``clear()`` frees them all when a pass moves on to other shapes. Thread-safe: the export's writer thread gives
back what the builder's thread took.
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch


class BufferPool:
    """Contiguous tensors taken for one use and given back for the next tensor of the same byte size."""

    def __init__(self, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.keep = keep
        self._lock = threading.Lock()
        self._idle: dict[int, list[torch.Tensor]] = {}  # bytes -> flat uint8 buffers
        # Handed-out buffers by data pointer (flat uint8). Held, not weakly: a numpy view's base is another tensor
        # object than the one handed out, so the caller may keep only the memory. One never given back is freed
        # by clear() or with the pool.
        self._out: dict[int, torch.Tensor] = {}
        self.taken = 0  # tensors handed out
        self.reused = 0  # of them, from an idle buffer (the rest were fresh memory)

    def take(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A contiguous tensor of ``shape`` and ``dtype`` with arbitrary contents (an idle buffer of its byte size
        when there is one)."""
        import torch

        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:
            idle = self._idle.get(nbytes)
            flat = idle.pop() if idle else None
            self.taken += 1
            self.reused += flat is not None
        if flat is None:
            flat = torch.empty(nbytes, dtype=torch.uint8)
        with self._lock:
            self._out[flat.data_ptr()] = flat
        return flat.view(dtype).view(tuple(shape))  # [nbytes] uint8 -> [prod(shape)] dtype -> shape

    def give_back(self, value: torch.Tensor | np.ndarray) -> bool:
        """Return a tensor from ``take`` (or a numpy view of all of it) for reuse; anything else is left alone.
        The caller must not use it afterwards. Returns whether it was taken back."""
        import numpy as np

        if isinstance(value, np.ndarray):
            ptr, nbytes = value.__array_interface__["data"][0], value.nbytes
        else:
            ptr, nbytes = value.data_ptr(), value.nbytes
        with self._lock:
            flat = self._out.get(ptr)
            if flat is None or flat.nbytes != nbytes:  # not ours, or only part of one of ours
                return False
            del self._out[ptr]
            idle = self._idle.setdefault(nbytes, [])
            if len(idle) < self.keep:
                idle.append(flat)
            return True

    def idle_bytes(self) -> int:
        with self._lock:
            return sum(size * len(bufs) for size, bufs in self._idle.items())

    def clear(self) -> None:
        """Free every idle buffer and forget the handed-out ones (they stay the callers', and are not taken back)."""
        with self._lock:
            self._idle.clear()
            self._out.clear()

