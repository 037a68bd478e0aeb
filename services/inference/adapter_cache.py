"""Host-side LRU cache of evicted adapters' bank slices, bounded by bytes.

When an adapter slot is reused, the adapter leaving it is copied out of the banks into this cache,
so a later request for it costs one memory copy back into a slot instead of a store fetch and a
safetensors parse. Entries are keyed by (artifact id, adapter name, source): the artifact fixes the
bank layout (layers, max_rank, modules, dtype), and the source (the registry record's URI) changes
when an adapter is re-registered, so a stale copy is never served under a new record.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from loraflow.errors import InvalidArgument
from loraflow.options.settings import ADAPTER_CACHE_BYTES

# Default bound: holds ~100 SmolLM2-135M all-module r=8 adapters (about 10 MB each in float32; entries are
# rank-trimmed, so a q,v r=4 one is about 0.8 MB).
DEFAULT_ADAPTER_CACHE_BYTES = ADAPTER_CACHE_BYTES.parse(ADAPTER_CACHE_BYTES.default)  # declared in loraflow.options.settings
MAX_ADAPTER_CACHE_BYTES = 1 << 40


@dataclass(frozen=True)
class CachedAdapter:
    """One adapter's slot tensors, as AdapterSlots.copy takes them: per module it touches, (A^T [L, in, w],
    B^T [L, w, out]) of the leading w <= R rank columns it used in the banks (the rest of a slot is zero)."""

    tensors: dict[str, tuple[np.ndarray, np.ndarray]]
    rank: int

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.tensors.values())


CacheKey = tuple[str, str, str]  # (artifact_id, adapter name, source)


class HostAdapterCache:
    """Thread-safe LRU of CachedAdapter; an entry larger than the whole bound is not kept."""

    def __init__(self, max_bytes: int = DEFAULT_ADAPTER_CACHE_BYTES):
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or not 0 <= max_bytes <= MAX_ADAPTER_CACHE_BYTES:
            raise InvalidArgument(f"adapter cache bytes must be in 0..{MAX_ADAPTER_CACHE_BYTES}, got {max_bytes!r}",
                                  field="adapter_cache_bytes", value=max_bytes)
        self.max_bytes = max_bytes
        self._entries: OrderedDict[CacheKey, CachedAdapter] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def put(self, key: CacheKey, entry: CachedAdapter) -> int:
        """Keep ``entry`` (most recently used); returns how many older entries were dropped for it."""
        size = entry.nbytes
        dropped_count = 0
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            if size > self.max_bytes:
                return 0
            self._entries[key] = entry
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= dropped.nbytes
                dropped_count += 1
        return dropped_count

    def get(self, key: CacheKey) -> CachedAdapter | None:
        """The entry (now most recently used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def forget_artifact(self, artifact_id: str) -> None:
        """Drop every entry of one artifact (its last model was unloaded)."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == artifact_id]:
                self._bytes -= self._entries.pop(key).nbytes
