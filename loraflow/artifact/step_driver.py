"""FusedStepDriver: runs prefill chunks and decode steps on a fused ("shared-buffer") graph.

The one copy of the runtime's part of the fused graph contract (loraflow/artifact/graph_contract.py):
verification before publishing and the inference service both run an artifact through this class.

* First prefill chunks (position 0) of rows in adjacent KV slots run as one call over those slots, each
  right-padded to the longest (S): the padding's K/V lands past the row's real length (the next real
  token overwrites it, no real token attends it), and ``logits_index`` returns each row's logits at its
  last real token. Any other chunk runs as a call of its own with B = 1: ONNX Runtime's CPU
  GroupQueryAttention takes several rows with S > 1 only when none has a past ("batch_size must be 1
  when sequence_length > 1 and past context is given"), except that short continuing chunks of rows in
  adjacent slots are fed as decode calls of one token per row (see ``_prefill_groups``). A graph
  without ``logits_index`` (compiled before it) prefills first chunks one row per call.
* A decode step runs every decoding row in one call over the contiguous slot range lo..hi that
  holds them. Slots in that range that are not decoding ride along as dummy rows: token 0, base
  model, written at their own next free position (which their next real token overwrites), their
  logits discarded. The scheduler hands out the lowest free slot, and for a fused runtime moves running rows
  down into freed slots (``SchedulerOutput.moves``, ``SharedKvCache.move``), so the range has no holes and the
  rows admitted together hold adjacent slots (their first chunks share one padded call).
* ``seqlens_k[b]`` = tokens in row b's cache after the call minus one; ``total_sequence_length`` =
  the longest row's total. The graph writes the new K/V into the bound cache views itself.
* ``lora_ranks`` [N] (graph5-7) or [N, P] (graph8: per slot and adapted module) is bound once, like the banks:
  the caller's array, updated in place when a slot's adapter changes. A graph without the input (compiled before it) is fed nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from loraflow.artifact import graph_contract as gc
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
                 logits_dtype=np.float32, lora_ranks: np.ndarray | None = None,
                 lora_module_ranks: np.ndarray | None = None):
        """``banks``: graph input name -> OrtValue or numpy array [L*N, in, R] / [L*N, R, out], bound once
        (on CPU an OrtValue over a numpy array aliases it, so writes into the array serve at once).
        ``lora_ranks``: int64 [N], each slot's rank (the max over modules of ``lora_module_ranks``), and
        ``lora_module_ranks``: int64 [N, P], each slot's rank per bank module (bank_module_ranks), bound once the
        same way: a graph with a ``lora_ranks`` input takes the one of its shape (graph5-7 [N], graph8 [N, P])."""
        import onnxruntime as ort

        self._ort = ort
        self.session = session
        self.cache = cache
        self.vocab_size = vocab_size
        self.logits_dtype = np.dtype(logits_dtype)
        self.binding = session.io_binding()
        self._bank_values = {}
        self._ranks_value = None
        for name, bank in banks.items():
            value = bank if isinstance(bank, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(bank)
            self._bank_values[name] = value
            self.binding.bind_ortvalue_input(name, value)
        graph_inputs = {i.name: i for i in session.get_inputs()}
        if gc.LORA_RANKS in graph_inputs:
            shape = graph_inputs[gc.LORA_RANKS].shape
            self._bind_ranks(shape, lora_module_ranks if len(shape) == 2 else lora_ranks)
        self._bound_range: tuple[int, int] | None = None
        self._range_values: dict[tuple[int, int], list[object]] = {}
        self._logits: dict[int, tuple[np.ndarray, object]] = {}
        self.batched_prefill = gc.LOGITS_INDEX in {i.name for i in session.get_inputs()}
        self._last_index: dict[int, np.ndarray] = {}  # B -> [B, 1] of -1 (each row's last token)
        self.calls = 0

    # --- binding ----------------------------------------------------------------------------------
    def _bind_ranks(self, shape, lora_ranks: np.ndarray | None) -> None:
        per_module = len(shape) == 2
        what = "[N, P] (each adapter slot's rank per module): pass lora_module_ranks=loraflow.artifact.lora_bank." \
            "bank_module_ranks(...)" if per_module else "[N] (each adapter slot's rank): pass " \
            "lora_ranks=loraflow.artifact.lora_bank.bank_module_ranks(...).max(axis=1, initial=0)"
        if lora_ranks is None:
            raise InvalidArgument(f"this graph takes {gc.LORA_RANKS} {what}", field=gc.LORA_RANKS, value=None)
        fixed = [(i, d) for i, d in enumerate(shape) if isinstance(d, int)]
        if (not isinstance(lora_ranks, np.ndarray) or lora_ranks.dtype != np.int64 or lora_ranks.ndim != len(shape)
                or not lora_ranks.flags.c_contiguous or any(lora_ranks.shape[i] != d for i, d in fixed)):
            raise InvalidArgument(f"{gc.LORA_RANKS} must be a contiguous int64 array of shape {list(shape)}, got "
                                  f"{getattr(lora_ranks, 'dtype', type(lora_ranks).__name__)} "
                                  f"{list(np.shape(lora_ranks))}", field=gc.LORA_RANKS, value=list(np.shape(lora_ranks)))
        # An OrtValue over the array aliases it (CPU): a slot's new rank serves at the next call.
        self._ranks_value = self._ort.OrtValue.ortvalue_from_numpy(lora_ranks)
        self.binding.bind_ortvalue_input(gc.LORA_RANKS, self._ranks_value)

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

    def _run(self, ids: np.ndarray, lora_ids: np.ndarray, seqlens: np.ndarray, lo: int, hi: int,
             logits_index: np.ndarray | None = None) -> np.ndarray:
        """``logits_index`` [B, 1]: the token of each row whose logits are returned (None: the last)."""
        ort = self._ort
        total = np.asarray(int(seqlens.max()) + 1, np.int32)  # [] scalar
        names = [gc.INPUT_IDS, gc.LORA_IDS, gc.SEQLENS_K, gc.TOTAL_SEQUENCE_LENGTH]
        small = [ids, lora_ids, seqlens, total]  # kept alive until the run returns
        if self.batched_prefill:  # a graph3 input, bound on every call (its shape follows B)
            if logits_index is None:
                logits_index = self._last_index.get(ids.shape[0])
                if logits_index is None:
                    logits_index = self._last_index[ids.shape[0]] = np.full((ids.shape[0], 1), -1, np.int64)
            names.append(gc.LOGITS_INDEX)
            small.append(logits_index)
        elif logits_index is not None:
            raise InvalidArgument(f"this graph has no {gc.LOGITS_INDEX} input (compiled before batched prefill)",
                                  field=gc.LOGITS_INDEX, value=logits_index.ravel().tolist())
        for name, array in zip(names, small, strict=True):
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

    def prefill_rows(self, rows: Sequence[Row]) -> np.ndarray:
        """Prefill chunks of several rows (distinct slots); returns logits [len(rows), V] at each row's
        last token, in ``rows`` order. Rows in adjacent slots share a call (see the module docstring)."""
        for row in rows:
            self._check(row)
        slots = [r.slot for r in rows]
        if len(set(slots)) != len(slots):
            raise InvalidArgument(f"two prefill rows share a KV slot: {slots}", field="slot", value=slots)
        out = np.empty((len(rows), self.vocab_size), self.logits_dtype)
        for kind, group in self._prefill_groups(rows):
            members = [rows[i] for i in group]
            if kind == "one":
                out[group[0]] = self.prefill(members[0])
            elif kind == "stepped":
                # Token t of every member that has one, in one decode call per t.
                for t in range(max(len(r.token_ids) for r in members)):
                    live = [j for j, r in enumerate(members) if len(r.token_ids) > t]
                    logits = self.decode([Row(members[j].slot, members[j].lora_id, (members[j].token_ids[t],),
                                              members[j].start_position + t) for j in live])
                    for k, j in enumerate(live):
                        if t == len(members[j].token_ids) - 1:
                            out[group[j]] = logits[k]
            else:
                out[group] = self._prefill_padded(members)
        return out

    def _prefill_padded(self, members: Sequence[Row]) -> np.ndarray:
        """First chunks of rows in adjacent slots, in one call, right-padded; logits [len(members), V]."""
        S = max(len(r.token_ids) for r in members)
        B = len(members)  # adjacent slots: lo..hi holds exactly these rows
        ids = np.zeros((B, S), np.int64)  # [B, S], right-padded with token 0
        lora_ids = np.empty((B, 1), np.int64)  # [B, 1]
        seqlens = np.empty(B, np.int32)  # [B]: padding counts (it sits in the cache past the row)
        index = np.empty((B, 1), np.int64)  # [B, 1]: each row's last real token
        for b, row in enumerate(members):
            n = len(row.token_ids)
            ids[b, :n] = row.token_ids
            lora_ids[b, 0] = row.lora_id
            seqlens[b] = row.start_position + S - 1
            index[b, 0] = n - 1
        logits = self._run(ids, lora_ids, seqlens, members[0].slot, members[-1].slot + 1, index)
        for row in members:
            self.cache.lengths[row.slot] = row.start_position + len(row.token_ids)
        return logits

    def _prefill_groups(self, rows: Sequence[Row]) -> list[tuple[str, list[int]]]:
        """Indices of ``rows`` by call kind, each group a run of adjacent slots:

        * "padded": first chunks (position 0), one call, padded to the group's longest (which fits, as
          each fits alone); only on a graph with ``logits_index``;
        * "stepped": chunks that continue a prompt, at most half as long as the group has rows, fed as
          that many decode calls over the group (one token per row each: a decode call over 8 rows cost
          ~45 ms on SmolLM2-135M, a 4-token chunk of one row ~31 ms, so 4 calls beat 8);
        * "one": any other row, a call of its own (B = 1).
        """
        order = sorted(range(len(rows)), key=lambda i: rows[i].slot)
        runs: list[list[int]] = []
        for i in order:
            prev = rows[runs[-1][-1]] if runs else None
            first = rows[i].start_position == 0
            if (prev is not None and rows[i].slot == prev.slot + 1 and first == (prev.start_position == 0)
                    and (not first or self.batched_prefill)):
                runs[-1].append(i)
            else:
                runs.append([i])
        groups: list[tuple[str, list[int]]] = []
        for run in runs:
            longest = max(len(rows[i].token_ids) for i in run)
            if len(run) > 1 and rows[run[0]].start_position == 0:
                groups.append(("padded", run))
            elif len(run) > 1 and 2 * longest <= len(run):
                groups.append(("stepped", run))
            else:
                groups += [("one", [i]) for i in run]
        return groups

    def decode(self, rows: Sequence[Row]) -> np.ndarray:
        """One token for each row, all in one call; returns logits [len(rows), V] in ``rows`` order (valid
        until the next call)."""
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
        if len(rows) == B and all(r.slot == lo + b for b, r in enumerate(rows)):
            return logits  # every slot of the range, in order: the bound buffer itself, no copy
        return logits[[r.slot - lo for r in rows]]  # [B, V] -> [len(rows), V]

    def step(self, rows: Sequence[Row]) -> np.ndarray:
        """Logits [len(rows), V] for a scheduler step (valid until the next call): single-token rows decode
        together, longer rows are prefilled (rows in adjacent slots together)."""
        singles = [i for i, r in enumerate(rows) if len(r.token_ids) == 1]
        longer = [i for i, r in enumerate(rows) if len(r.token_ids) != 1]
        if singles and not longer:
            return self.decode(rows)  # a decode step: no gathering copy of [B, V]
        out = np.empty((len(rows), self.vocab_size), self.logits_dtype)
        if longer:
            out[longer] = self.prefill_rows([rows[i] for i in longer])
        if singles:
            out[singles] = self.decode([rows[i] for i in singles])
        return out

    def close(self) -> None:
        self.binding.clear_binding_inputs()
        self.binding.clear_binding_outputs()
        self._range_values.clear()
        self._bank_values.clear()
        self._ranks_value = None
