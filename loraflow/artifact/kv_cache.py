"""SharedKvCache: the fused graph's KV cache, one buffer that GroupQueryAttention updates in place.

Per kind (K, V) one array [L, F, H, C, D] (layers, slots, KV heads, ctx_len, head_dim): layer i is the
contiguous view [i], and any contiguous slot range [i, lo:hi] is one block too, so a call over slots
lo..hi-1 binds that view as both past_key.{i} and present_key.{i} and the operator writes the new
tokens' K/V straight into the cache: no per-step copy of the past.
"""

from __future__ import annotations

import numpy as np

from loraflow.errors import InvalidArgument


class SharedKvCache:
    def __init__(self, *, layers: int, slots: int, kv_heads: int, ctx_len: int, head_dim: int, dtype=np.float32):
        shape = (layers, slots, kv_heads, ctx_len, head_dim)
        self.k = np.zeros(shape, dtype)
        self.v = np.zeros(shape, dtype)
        self.layers, self.slots, self.ctx_len = layers, slots, ctx_len
        # Tokens whose K/V are in each slot (what a dummy decode row may overwrite: position lengths[s]).
        self.lengths = np.zeros(slots, np.int64)

    def views(self, lo: int, hi: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per layer (k, v) [hi-lo, H, C, D] views of slots lo..hi-1 (no copy)."""
        if not 0 <= lo < hi <= self.slots:
            raise InvalidArgument(f"slot range {lo}..{hi - 1} is outside 0..{self.slots - 1}", field="slot",
                                  value=[lo, hi])
        return [(self.k[i, lo:hi], self.v[i, lo:hi]) for i in range(self.layers)]

    def move(self, src: int, dst: int) -> None:
        """Copy slot ``src``'s cached tokens into slot ``dst`` (the scheduler compacting its running rows)."""
        for slot in (src, dst):
            if not 0 <= slot < self.slots:
                raise InvalidArgument(f"slot {slot} is outside 0..{self.slots - 1}", field="slot", value=slot)
        n = int(self.lengths[src])
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]  # [L, H, n, D] of each kind
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n

    def reset(self, slot: int) -> None:
        """Zero one slot: a failed request may have left NaN/inf there."""
        if not 0 <= slot < self.slots:
            raise InvalidArgument(f"slot {slot} is outside 0..{self.slots - 1}", field="slot", value=slot)
        self.k[:, slot] = 0
        self.v[:, slot] = 0
        self.lengths[slot] = 0

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)
