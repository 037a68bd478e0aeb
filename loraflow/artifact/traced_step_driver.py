"""TracedStepDriver: runs prefill chunks and decode steps on a traced ("time-major") graph.

The one copy of the runtime's part of the traced graph contract (loraflow/artifact/graph_contract.py, target
"onnxruntime" without kv_layout "shared-buffer": fp16, and fp32/int8 for models the fused builder
refuses): verification before publishing and the inference service both run an artifact through this
class.

* The KV cache is one preallocated array per kind, [L, ctx_len, F, H, D]: layer i's cache is time-major,
  so its first P positions ``k[i, :P]`` are one contiguous block handed to the graph without a copy
  (P rounded up to PAST_BUCKET, so one binding serves many steps); a step costs what is in use, not
  ctx_len.
* Any mix of rows runs as one call: each row carries its KV slot (``batch_index``) and absolute
  positions (``position_ids``, right-padded with -1), and attends only to its own past, so prefill
  chunks of any length, decode tokens and rows in any slots share a call.
* The graph writes the new tokens' K/V (``present_*`` [S, B, H, D]) into preallocated buffers, and one
  indexed assignment per kind stores them at ``cache[:, position, slot]``.
* Adapter banks ``lora_a.{m}`` [L, N, in, R] / ``lora_b.{m}`` [L, N, R, out] are bound once; on CPU an
  OrtValue over a numpy array aliases it, so writes into the bank serve at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from loraflow.artifact import graph_contract as gc
from loraflow.artifact.step_driver import Row
from loraflow.errors import InvalidArgument

# Past inputs are bound in multiples of this many positions (see TracedStepDriver._bind_past).
PAST_BUCKET = 16


class TracedStepDriver:
    """Owns the IOBinding of one session and the time-major KV cache; the banks are the caller's arrays."""

    def __init__(self, session, banks: Mapping[str, object], *, layers: int, slots: int, kv_heads: int,
                 ctx_len: int, head_dim: int, vocab_size: int, dtype=np.float32, logits_dtype=None):
        """``banks``: graph input name -> OrtValue or numpy array [L, N, in, R] / [L, N, R, out], bound once.
        ``slots``: KV-cache slots (F); ``dtype``: the graph's float type (cache and present outputs)."""
        import onnxruntime as ort

        for name, value in (("layers", layers), ("slots", slots), ("kv_heads", kv_heads), ("ctx_len", ctx_len),
                            ("head_dim", head_dim), ("vocab_size", vocab_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidArgument(f"{name} must be a positive integer, got {value!r}", field=name, value=value)
        self._ort = ort
        self.session = session
        self.layers, self.slots, self.kv_heads = layers, slots, kv_heads
        self.ctx_len, self.head_dim, self.vocab_size = ctx_len, head_dim, vocab_size
        self.dtype = np.dtype(dtype)
        self.logits_dtype = np.dtype(logits_dtype if logits_dtype is not None else dtype)
        # One array per kind lets a single indexed write store every layer's new K/V.
        shape = (layers, ctx_len, slots, kv_heads, head_dim)  # [L, C, F, H, D]
        self.k = np.zeros(shape, self.dtype)
        self.v = np.zeros(shape, self.dtype)
        self.binding = session.io_binding()
        self._bank_values: dict[str, object] = {}
        self.adapter_slots_with_base: int | None = None  # N, from the banks' shape (None: no banks)
        for name, bank in banks.items():
            value = bank if isinstance(bank, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(bank)
            self._bank_values[name] = value
            self.binding.bind_ortvalue_input(name, value)
            n = int(value.shape()[1])
            if self.adapter_slots_with_base is None or n < self.adapter_slots_with_base:
                self.adapter_slots_with_base = n
        self._bound_past = 0  # P of the past inputs currently bound
        self._past_values: list[object] = []  # kept alive while bound
        self._out_shape: tuple[int, int] | None = None  # (S, B) of the output buffers currently bound
        self._out_buffers: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.calls = 0

    @classmethod
    def from_graph(cls, session, graph, banks: Mapping[str, object], *, slots: int, ctx_len: int
                   ) -> TracedStepDriver:
        """A driver for a loraflow.artifact.manifest.GraphSpec (layers, heads, vocab and dtypes from the graph)."""
        outputs = {t.name: t.dtype for t in graph.outputs}
        return cls(session, banks, layers=graph.layers, slots=slots, kv_heads=graph.num_kv_heads, ctx_len=ctx_len,
                   head_dim=graph.head_dim, vocab_size=graph.vocab_size, dtype=np.dtype(graph.dtype),
                   logits_dtype=np.dtype(outputs.get(gc.LOGITS, graph.dtype)))

    # --- binding ----------------------------------------------------------------------------------
    def _bind_past(self, past_len: int) -> None:
        """Bind cache[:P'] with P' = past_len rounded up to PAST_BUCKET, rebinding only when P' changes.

        Entries past a row's own position are masked by the graph (row b attends j < position_ids[b, 0]),
        so a few extra positions change nothing but let the same binding serve many decode steps.
        """
        bucket = min(self.ctx_len, -(-past_len // PAST_BUCKET) * PAST_BUCKET)
        if bucket == self._bound_past:
            return
        ort = self._ort
        values = []
        for i in range(self.layers):
            for name, cache in ((gc.past_key(i), self.k[i]), (gc.past_value(i), self.v[i])):
                value = ort.OrtValue.ortvalue_from_numpy(cache[:bucket])  # [P', F, H, D] view, no copy
                self.binding.bind_ortvalue_input(name, value)
                values.append(value)
        self._past_values = values
        self._bound_past = bucket

    def _bind_outputs(self, seq_len: int, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Preallocated output buffers the graph writes into; rebound only when (S, B) changes."""
        if self._out_shape != (seq_len, rows):
            ort = self._ort
            logits = np.empty((rows, 1, self.vocab_size), self.logits_dtype)  # [B, 1, V]
            shape = (self.layers, seq_len, rows, self.kv_heads, self.head_dim)  # [L, S, B, H, D]
            k_out, v_out = np.empty(shape, self.dtype), np.empty(shape, self.dtype)
            self.binding.bind_ortvalue_output(gc.LOGITS, ort.OrtValue.ortvalue_from_numpy(logits))
            for i in range(self.layers):
                self.binding.bind_ortvalue_output(gc.present_key(i), ort.OrtValue.ortvalue_from_numpy(k_out[i]))
                self.binding.bind_ortvalue_output(gc.present_value(i), ort.OrtValue.ortvalue_from_numpy(v_out[i]))
            self._out_buffers = (logits, k_out, v_out)
            self._out_shape = (seq_len, rows)
        return self._out_buffers

    # --- calls ----------------------------------------------------------------------------------
    def _check(self, row: Row) -> None:
        n = len(row.token_ids)
        if not 0 <= row.slot < self.slots:
            raise InvalidArgument(f"slot {row.slot} is outside 0..{self.slots - 1}", field="slot", value=row.slot)
        if n == 0 or row.start_position < 0 or row.start_position + n > self.ctx_len:
            raise InvalidArgument(f"tokens {row.start_position}..{row.start_position + n - 1} do not fit "
                                  f"ctx_len {self.ctx_len}", field="position_ids", value=row.start_position + n)
        if self.adapter_slots_with_base is not None and not 0 <= row.lora_id < self.adapter_slots_with_base:
            raise InvalidArgument(f"lora_id {row.lora_id} is outside 0..{self.adapter_slots_with_base - 1}",
                                  field="lora_ids", value=row.lora_id)

    def step(self, rows: Sequence[Row]) -> np.ndarray:
        """All ``rows`` (distinct KV slots, any lengths) in one call; returns logits [len(rows), V] at each
        row's last token, in ``rows`` order (valid until the next call), and stores the new K/V."""
        if not rows:
            raise InvalidArgument("a step needs at least one row", field="rows", value=0)
        for row in rows:
            self._check(row)
        slots = [r.slot for r in rows]
        if len(set(slots)) != len(slots):
            raise InvalidArgument(f"two rows of one call share a KV slot: {slots}", field="slot", value=slots)
        B, S = len(rows), max(len(r.token_ids) for r in rows)
        input_ids = np.zeros((B, S), np.int64)  # [B, S], right-padded with token 0
        position_ids = np.full((B, S), gc.PAD_POSITION, np.int64)  # [B, S], padding marked -1
        lora_ids = np.empty((B, 1), np.int64)  # [B, 1]
        batch_index = np.empty((B, 1), np.int64)  # [B, 1]
        for b, row in enumerate(rows):
            n = len(row.token_ids)
            input_ids[b, :n] = row.token_ids
            position_ids[b, :n] = np.arange(row.start_position, row.start_position + n)
            lora_ids[b, 0] = row.lora_id
            batch_index[b, 0] = row.slot
        ort = self._ort
        small = (input_ids, position_ids, lora_ids, batch_index)  # kept alive until the run returns
        for name, array in zip((gc.INPUT_IDS, gc.POSITION_IDS, gc.LORA_IDS, gc.BATCH_INDEX), small, strict=True):
            self.binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
        # P: past positions any row attends to (at least 1, as the graph contract asks).
        self._bind_past(max([1] + [r.start_position for r in rows]))
        logits, k_out, v_out = self._bind_outputs(S, B)
        self.session.run_with_iobinding(self.binding)
        self.calls += 1

        b_idx, s_idx = np.nonzero(position_ids >= 0)
        t_idx = position_ids[b_idx, s_idx]
        slot_idx = batch_index[b_idx, 0]
        # k_out [L, S, B, H, D] -> [L, n, H, D] into cache[:, position, slot]
        self.k[:, t_idx, slot_idx] = k_out[:, s_idx, b_idx]
        self.v[:, t_idx, slot_idx] = v_out[:, s_idx, b_idx]
        return logits[:, 0, :]  # [B, 1, V] -> [B, V]

    def prefill(self, row: Row) -> np.ndarray:
        """One chunk of one row (B = 1); returns the logits [V] at its last token (valid until the next call)."""
        return self.step([row])[0]

    def prefill_rows(self, rows: Sequence[Row]) -> np.ndarray:
        """Prefill chunks of several rows (distinct slots), all in one call; returns logits [len(rows), V] at
        each row's last token, in ``rows`` order (valid until the next call)."""
        return self.step(rows)

    def decode(self, rows: Sequence[Row]) -> np.ndarray:
        """One token for each row, all in one call; returns logits [len(rows), V] in ``rows`` order (valid
        until the next call)."""
        if not rows:
            raise InvalidArgument("a decode step needs at least one row", field="rows", value=0)
        for row in rows:
            if len(row.token_ids) != 1:
                raise InvalidArgument(f"a decode row feeds one token, slot {row.slot} has {len(row.token_ids)}",
                                      field="token_ids", value=len(row.token_ids))
        return self.step(rows)

    # --- cache ----------------------------------------------------------------------------------
    def reset(self, slot: int) -> None:
        """Zero one KV slot across layers and positions. A failed request may have left NaN/inf there, and
        masked attention still multiplies stale values by 0 (0 * NaN = NaN)."""
        if not 0 <= slot < self.slots:
            raise InvalidArgument(f"slot {slot} is outside 0..{self.slots - 1}", field="slot", value=slot)
        self.k[:, :, slot] = 0
        self.v[:, :, slot] = 0

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)

    def close(self) -> None:
        self.binding.clear_binding_inputs()
        self.binding.clear_binding_outputs()
        self._past_values = []
        self._out_buffers = None
        self._out_shape = None
        self._bound_past = 0
        self._bank_values.clear()
