"""FusedStepDriver: runs prefill chunks and decode steps on a fused ("shared-buffer") graph.

The one copy of the runtime's part of the fused graph contract (loraflow/graph_contract.py):
verification before publishing and the inference service both run an artifact through this class.

* A prefill chunk runs as its own call with B = 1 over the row's KV slot (no padding anywhere:
  every token of a call is real, and GroupQueryAttention places them after the row's past).
* A decode step runs every decoding row in one call over the contiguous slot range lo..hi that
  holds them. Slots in that range that are not decoding ride along as dummy rows: token 0, base
  model, written at their own next free position (which their next real token overwrites), their
  logits discarded. The scheduler hands out the lowest free slot, so the range stays tight.
* ``seqlens_k[b]`` = tokens in row b's cache after the call minus one; ``total_sequence_length`` =
  the longest row's total. The graph writes the new K/V into the bound cache views itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from loraflow import graph_contract as gc
from loraflow.artifact.kv_cache import SharedKvCache
from loraflow.errors import InvalidArgument


def flat_bank(bank: np.ndarray) -> np.ndarray:
    """A bank [L, N, in, R] / [L, N, R, out] as the fused graph's [L*N, ...] input: a view (no copy) of a
    C-contiguous array, so writes into the bank reach the bound input."""
    if not bank.flags.c_contiguous:
        raise InvalidArgument(f"bank of shape {list(bank.shape)} is not C-contiguous (a reshape would copy it)",
                              field="bank", value=list(bank.shape))
    return bank.reshape(bank.shape[0] * bank.shape[1], *bank.shape[2:])  # [L, N, ...] -> [L*N, ...]


@dataclass(frozen=True)
class Row:
    """One row of a call: KV slot, adapter slot (0 = base), its new tokens and the first one's position."""

    slot: int
    lora_id: int
    token_ids: tuple[int, ...]
    start_position: int


class FusedStepDriver:
    """Owns the IOBinding of one session; the cache and the (flat) banks are the caller's arrays."""

    def __init__(self, session, cache: SharedKvCache, banks: Mapping[str, object], *, vocab_size: int,
                 logits_dtype=np.float32):
        """``banks``: graph input name -> OrtValue or numpy array [L*N, in, R] / [L*N, R, out], bound once
        (on CPU an OrtValue over a numpy array aliases it, so writes into the array serve at once)."""
        import onnxruntime as ort

        self._ort = ort
        self.session = session
        self.cache = cache
        self.vocab_size = vocab_size
        self.logits_dtype = np.dtype(logits_dtype)
        self.binding = session.io_binding()
        self._bank_values = {}
        for name, bank in banks.items():
            value = bank if isinstance(bank, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(bank)
            self._bank_values[name] = value
            self.binding.bind_ortvalue_input(name, value)
        self._bound_range: tuple[int, int] | None = None
        self._range_values: dict[tuple[int, int], list[object]] = {}
        self._logits: dict[int, tuple[np.ndarray, object]] = {}
        self.calls = 0

    # --- binding ----------------------------------------------------------------------------------
    def _bind_slots(self, lo: int, hi: int) -> None:
        """Bind cache[i, lo:hi] as past and present of every layer (the same memory: updated in place)."""
        if self._bound_range == (lo, hi):
            return
        values = self._range_values.get((lo, hi))
        if values is None:
            ort = self._ort
            values = []
            for k, v in self.cache.views(lo, hi):
                values += [ort.OrtValue.ortvalue_from_numpy(k), ort.OrtValue.ortvalue_from_numpy(v)]
            if len(self._range_values) > 64:  # a handful of ranges recur; bound the memo
                self._range_values.clear()
            self._range_values[(lo, hi)] = values
        for i in range(self.cache.layers):
            k, v = values[2 * i], values[2 * i + 1]
            self.binding.bind_ortvalue_input(gc.past_key(i), k)
            self.binding.bind_ortvalue_input(gc.past_value(i), v)
            self.binding.bind_ortvalue_output(gc.present_key(i), k)
            self.binding.bind_ortvalue_output(gc.present_value(i), v)
        self._bound_range = (lo, hi)

    def _bind_logits(self, rows: int) -> np.ndarray:
        if rows not in self._logits:
            array = np.empty((rows, 1, self.vocab_size), self.logits_dtype)
            self._logits[rows] = (array, self._ort.OrtValue.ortvalue_from_numpy(array))
        array, value = self._logits[rows]
        self.binding.bind_ortvalue_output(gc.LOGITS, value)
        return array

    def _run(self, ids: np.ndarray, lora_ids: np.ndarray, seqlens: np.ndarray, lo: int, hi: int) -> np.ndarray:
        ort = self._ort
        total = np.asarray(int(seqlens.max()) + 1, np.int32)  # [] scalar
        small = (ids, lora_ids, seqlens, total)  # kept alive until the run returns
        for name, array in zip((gc.INPUT_IDS, gc.LORA_IDS, gc.SEQLENS_K, gc.TOTAL_SEQUENCE_LENGTH), small,
                               strict=True):
            self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
        self._bind_slots(lo, hi)
        logits = self._bind_logits(ids.shape[0])
        self.session.run_with_iobinding(self.binding)
        self.calls += 1
        return logits[:, 0, :]  # [B, 1, V] -> [B, V]

    # --- calls ----------------------------------------------------------------------------------
    def _check(self, row: Row) -> None:
        n = len(row.token_ids)
        if not 0 <= row.slot < self.cache.slots:
            raise InvalidArgument(f"slot {row.slot} is outside 0..{self.cache.slots - 1}", field="slot",
                                  value=row.slot)
        if n == 0 or row.start_position < 0 or row.start_position + n > self.cache.ctx_len:
            raise InvalidArgument(f"tokens {row.start_position}..{row.start_position + n - 1} do not fit "
                                  f"ctx_len {self.cache.ctx_len}", field="position_ids", value=row.start_position + n)

    def prefill(self, row: Row) -> np.ndarray:
        """One chunk of one row (B = 1); returns the logits [V] at its last token (valid until the next call)."""
        self._check(row)
        n = len(row.token_ids)
        ids = np.asarray([row.token_ids], np.int64)  # [1, S]
        lora_ids = np.asarray([[row.lora_id]], np.int64)  # [1, 1]
        seqlens = np.asarray([row.start_position + n - 1], np.int32)  # [1]
        logits = self._run(ids, lora_ids, seqlens, row.slot, row.slot + 1)
        self.cache.lengths[row.slot] = row.start_position + n
        return logits[0]

    def decode(self, rows: Sequence[Row]) -> np.ndarray:
        """One token for each row, all in one call; returns logits [len(rows), V] in ``rows`` order."""
        if not rows:
            raise InvalidArgument("a decode step needs at least one row", field="rows", value=0)
        for row in rows:
            self._check(row)
            if len(row.token_ids) != 1:
                raise InvalidArgument(f"a decode row feeds one token, slot {row.slot} has {len(row.token_ids)}",
                                      field="token_ids", value=len(row.token_ids))
        slots = [r.slot for r in rows]
        if len(set(slots)) != len(slots):
            raise InvalidArgument(f"two decode rows share a KV slot: {slots}", field="slot", value=slots)
        lo, hi = min(slots), max(slots) + 1
        B = hi - lo
        ids = np.zeros((B, 1), np.int64)  # [B, 1]
        lora_ids = np.zeros((B, 1), np.int64)  # [B, 1]
        # Dummy rows write at their own next free position (ctx_len - 1 at most; a full slot decodes no more).
        seqlens = np.minimum(self.cache.lengths[lo:hi], self.cache.ctx_len - 1).astype(np.int32)  # [B]
        for row in rows:
            b = row.slot - lo
            ids[b, 0] = row.token_ids[0]
            lora_ids[b, 0] = row.lora_id
            seqlens[b] = row.start_position
        logits = self._run(ids, lora_ids, seqlens, lo, hi)
        for row in rows:
            self.cache.lengths[row.slot] = row.start_position + 1
        return logits[[r.slot - lo for r in rows]]  # [B, V] -> [len(rows), V]

    def step(self, rows: Sequence[Row]) -> np.ndarray:
        """Logits [len(rows), V] for a scheduler step: single-token rows decode together, longer rows
        are prefilled one call each."""
        out = np.empty((len(rows), self.vocab_size), self.logits_dtype)
        singles = [i for i, r in enumerate(rows) if len(r.token_ids) == 1]
        for i, row in enumerate(rows):
            if len(row.token_ids) != 1:
                out[i] = self.prefill(row)
        if singles:
            out[singles] = self.decode([rows[i] for i in singles])
        return out

    def close(self) -> None:
        self.binding.clear_binding_inputs()
        self.binding.clear_binding_outputs()
        self._range_values.clear()
        self._bank_values.clear()
