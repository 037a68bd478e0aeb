"""Continuous-batching scheduler: token ids in, which rows to run out (no runtime, no tokenizer).

One step is ``schedule() -> SchedulerOutput`` → the runtime executes it → ``update(output, sampled)``.
Requests wait in a bounded queue, are admitted into free KV-cache slots and prefilled in chunks of
at most ``prefill_seq_len`` tokens (``idle_prefill_seq_len`` while no row decodes); all prefilled slots
decode together, each row with its own adapter (``lora_id``) and position; prefill chunks and decode
steps alternate while both have work. A finished or aborted request frees its slot at once, so the next
waiting request is admitted on the following step.

Two options serve runtimes for which every call costs a pass over the weights and a prompt's continuing chunk
is a call of its own (ONNX Runtime's CPU GroupQueryAttention takes one row per call once a row has a past):
``prefill_token_budget`` lets a prefill step next to decoding rows take whole prompts (up to
``idle_prefill_seq_len`` tokens each) of as many rows as fit the budget, instead of a ``prefill_seq_len`` chunk
of every row, and ``compact_slots`` keeps the running rows in the lowest KV slots (a row above a freed slot is
moved down into it: ``SchedulerOutput.moves``), so the rows admitted together hold adjacent slots and their
first chunks can share one call.

Admission groups by adapter. A request may wait while its adapter is loaded (``lora_id`` None until
``adapter_ready``): it holds no KV slot meanwhile and every request whose adapter is resident (or the
base model) is admitted past it, so a hot adapter never waits behind a cold load. Among ready requests
the oldest is admitted first, followed (while KV slots are free) by the other waiting requests of its
adapter, so requests that waited on one load start together and the adapter's slot goes idle (evictable)
as early as possible. The unfairness is bounded: a ready request jumped ``MAX_BYPASSES`` times by later
requests of another adapter's group stops the group, and it is the oldest ready request, hence the next
admitted, from then on; a loading request waits for its load only (which the caller bounds).
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass, field

from loraflow.errors import InvalidArgument, ResourceExhausted

# How many later requests of another adapter's group may be admitted ahead of a ready waiting request
# before it goes first (the bound on admission grouping's unfairness).
MAX_BYPASSES = 4


class FinishReason(enum.Enum):
    STOP = "stop"  # an EOS token
    LENGTH = "length"  # max_new_tokens or the context is full
    STOP_STRING = "stop_string"
    CANCELLED = "cancelled"


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One request as the scheduler sees it."""

    request_id: str
    prompt_ids: list[int]
    lora_id: int | None = 0  # None: its adapter is being loaded (not admissible until adapter_ready)
    max_new_tokens: int = 64
    eos_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    output_ids: list[int] = field(default_factory=list)
    # Tokens whose K/V are in the cache.
    num_computed: int = 0
    slot: int | None = None
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    bypassed: int = 0  # later requests admitted ahead of it while it was ready (bounded by MAX_BYPASSES)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_at(self, index: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[index] if index < n else self.output_ids[index - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefilled(self) -> bool:
        return self.num_computed >= len(self.prompt_ids)


@dataclass(frozen=True)
class ScheduledRow:
    request_id: str
    slot: int
    lora_id: int
    token_ids: tuple[int, ...]
    start_position: int
    # True when this row's logits give the request's next token (last prefill chunk or decode).
    samples: bool


@dataclass(frozen=True)
class SchedulerOutput:
    """One runtime call: ``rows`` padded to ``seq_len`` tokens each (padding positions are -1)."""

    kind: str  # "prefill" | "decode"
    rows: tuple[ScheduledRow, ...]
    seq_len: int
    # (from, to) KV slots whose cached tokens the runtime moves, in order, before the call (compact_slots).
    moves: tuple[tuple[int, int], ...] = ()

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    def padded_inputs(self, pad_position: int = -1) -> tuple[list[list[int]], list[list[int]]]:
        """(input_ids [B][S], position_ids [B][S]) with padding on the right."""
        ids, positions = [], []
        for row in self.rows:
            n = len(row.token_ids)
            ids.append(list(row.token_ids) + [0] * (self.seq_len - n))
            positions.append(list(range(row.start_position, row.start_position + n))
                             + [pad_position] * (self.seq_len - n))
        return ids, positions

    @property
    def past_len(self) -> int:
        """P: past positions any row attends to (at least 1, as the graph contract asks)."""
        return max([1] + [row.start_position for row in self.rows])


class Scheduler:
    """Admission, chunked prefill and decode batching over ``full_batch_size`` KV slots."""

    def __init__(self, *, full_batch_size: int, prefill_seq_len: int, ctx_len: int,
                 max_waiting: int = 64, max_prefill_rows: int | None = None, idle_prefill_seq_len: int | None = None,
                 prefill_token_budget: int | None = None, compact_slots: bool = False):
        """``idle_prefill_seq_len``: the chunk limit while no row is decoding (nobody waits on the chunk),
        for runtimes whose graph takes any chunk length; default ``prefill_seq_len``.
        ``prefill_token_budget``: while rows decode, a prefill step takes chunks of up to ``idle_prefill_seq_len``
        tokens from the prefilling rows in admission order while rows x longest chunk stays within it (one row
        at least); None: a ``prefill_seq_len`` chunk of every prefilling row.
        ``compact_slots``: keep running rows in the lowest KV slots, moving them down as slots free (the runtime
        applies ``SchedulerOutput.moves``)."""
        idle = prefill_seq_len if idle_prefill_seq_len is None else idle_prefill_seq_len
        for name, value in (("full_batch_size", full_batch_size), ("prefill_seq_len", prefill_seq_len),
                            ("ctx_len", ctx_len)):
            if value < 1:
                raise InvalidArgument(f"{name} must be >= 1, got {value}", field=name, value=value)
        if idle < prefill_seq_len:
            raise InvalidArgument(f"idle_prefill_seq_len must be >= prefill_seq_len ({prefill_seq_len}), got {idle}",
                                  field="idle_prefill_seq_len", value=idle)
        self.idle_prefill_seq_len = idle
        if prefill_token_budget is not None and prefill_token_budget < prefill_seq_len:
            raise InvalidArgument(f"prefill_token_budget must be >= prefill_seq_len ({prefill_seq_len}), got "
                                  f"{prefill_token_budget}", field="prefill_token_budget", value=prefill_token_budget)
        self.prefill_token_budget = prefill_token_budget
        self.compact_slots = compact_slots
        if max_waiting < 0:
            raise InvalidArgument(f"max_waiting must be >= 0, got {max_waiting}", field="max_waiting",
                                  value=max_waiting)
        self.full_batch_size = full_batch_size
        self.prefill_seq_len = prefill_seq_len
        self.ctx_len = ctx_len
        self.max_waiting = max_waiting
        self.max_prefill_rows = max_prefill_rows or full_batch_size
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: dict[str, Sequence] = {}
        self.slots: list[str | None] = [None] * full_batch_size
        self._last_kind = ""

    # ---- admission -------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if not seq.prompt_ids:
            raise InvalidArgument("prompt must have at least one token", field="prompt", value="")
        if len(seq.prompt_ids) >= self.ctx_len:
            raise InvalidArgument(
                f"prompt has {len(seq.prompt_ids)} tokens but the context is {self.ctx_len} tokens "
                f"(at most {self.ctx_len - 1} prompt tokens fit)",
                field="prompt", value=len(seq.prompt_ids),
                metadata={"prompt_tokens": len(seq.prompt_ids), "ctx_len": self.ctx_len})
        if seq.max_new_tokens < 1:
            raise InvalidArgument(f"max_new_tokens must be >= 1, got {seq.max_new_tokens}",
                                  field="sampling.max_new_tokens", value=seq.max_new_tokens)
        if seq.request_id in self.running or any(s.request_id == seq.request_id for s in self.waiting):
            raise InvalidArgument(f"request_id {seq.request_id!r} is already in flight", field="request_id",
                                  value=seq.request_id)
        if len(self.waiting) >= self.max_waiting:
            raise ResourceExhausted(
                f"the waiting queue is full ({self.max_waiting} requests); retry later",
                metadata={"max_waiting": self.max_waiting})
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def adapter_ready(self, request_id: str, lora_id: int) -> bool:
        """A waiting request's adapter is loaded into slot ``lora_id``: it may be admitted from now on.
        False when the request is no longer waiting (aborted meanwhile)."""
        for seq in self.waiting:
            if seq.request_id == request_id:
                seq.lora_id = lora_id
                return True
        return False

    def abort(self, request_id: str) -> Sequence | None:
        """Cancel a waiting or running request; its slot is free for the next schedule()."""
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                self._finish(seq, FinishReason.CANCELLED)
                return seq
        seq = self.running.get(request_id)
        if seq is not None:
            self._finish(seq, FinishReason.CANCELLED)
        return seq

    def finish(self, request_id: str, reason: FinishReason) -> Sequence | None:
        """End a running request from outside (a stop string matched by the detokenizer)."""
        seq = self.running.get(request_id)
        if seq is not None:
            self._finish(seq, reason)
        return seq

    # ---- state -----------------------------------------------------------------------------
    @property
    def num_free_slots(self) -> int:
        return sum(1 for s in self.slots if s is None)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput | None:
        """Admit waiting requests into free slots, then one call: a prefill chunk or a decode of every
        prefilled row (alternating when both are pending)."""
        moves = self._compact() if self.compact_slots else ()
        self._admit()

        prefilling = [s for s in self.running.values() if not s.prefilled][: self.max_prefill_rows]
        decoding = [s for s in self.running.values() if s.prefilled]
        # Prefill chunks and decode steps alternate while both have work, so a long prompt being
        # prefilled delays the running requests' next tokens by one chunk, not by the whole prompt.
        if prefilling and not (self._last_kind == "prefill" and decoding):
            rows = []
            # With no row decoding nobody waits on this call: a longer chunk saves calls (a 36-token prompt
            # in one call instead of 32 + 4, the 4 costing a call of their own).
            budget = self.prefill_token_budget if decoding else None
            limit = self.prefill_seq_len if decoding and budget is None else self.idle_prefill_seq_len
            longest = 0
            for seq in prefilling:
                start = seq.num_computed
                chunk = seq.prompt_ids[start:start + limit]
                # The call is padded to its longest chunk: rows x longest is what the decoding rows wait for.
                if budget is not None and rows and (len(rows) + 1) * max(longest, len(chunk)) > budget:
                    break
                longest = max(longest, len(chunk))
                rows.append(ScheduledRow(seq.request_id, seq.slot, seq.lora_id, tuple(chunk), start,
                                         samples=start + len(chunk) == len(seq.prompt_ids)))
            self._last_kind = "prefill"
            return SchedulerOutput("prefill", tuple(rows), longest, moves)

        if not decoding:
            return None
        rows = []
        for seq in sorted(decoding, key=lambda s: s.slot):
            # Decode feeds the last sampled token at the first position not yet in the cache.
            rows.append(ScheduledRow(seq.request_id, seq.slot, seq.lora_id, (seq.token_at(seq.num_computed),),
                                     seq.num_computed, samples=True))
        self._last_kind = "decode"
        return SchedulerOutput("decode", tuple(rows), 1, moves)

    def _compact(self) -> tuple[tuple[int, int], ...]:
        """Move the running rows of the highest slots into the lowest free ones until no free slot lies below a
        running row: the free slots are then one range, so the rows admitted next are adjacent.

        Only rows with tokens in the cache move (the runtime copies them). Rows that have not started (admitted,
        nothing computed) are then seated again, in admission order, in the slots right above: free, and the rows
        admitted next follow them, so every first chunk waiting is in one range of adjacent slots (one padded call,
        where a started row moved down between them split a prefill step into several calls) and a decode's
        slot range holds no waiting row (a dummy row)."""
        unstarted = [seq for seq in self.running.values() if seq.num_computed == 0]  # admission order
        for seq in unstarted:
            self.slots[seq.slot] = None
        moves = []
        while None in self.slots:
            low = self.slots.index(None)
            high = max((i for i, rid in enumerate(self.slots) if rid is not None), default=-1)
            if high < low:
                break
            seq = self.running[self.slots[high]]
            self.slots[low], self.slots[high] = seq.request_id, None
            seq.slot = low
            moves.append((high, low))
        for seq in unstarted:
            seq.slot = self.slots.index(None)
            self.slots[seq.slot] = seq.request_id
        return tuple(moves)

    def _admit(self) -> None:
        """Free KV slots to ready waiting requests: the oldest, then its adapter's other requests (see the
        module docstring for the order and its bound)."""
        while self.waiting and None in self.slots:
            ready = [s for s in self.waiting if s.lora_id is not None]  # arrival order
            if not ready:
                return
            head = ready[0]
            self._start(head)
            if head.lora_id == 0:  # the base model holds no adapter slot: nothing to group
                continue
            jumped: list[Sequence] = []  # older ready requests of other adapters the group passes
            for seq in ready[1:]:
                if None not in self.slots:
                    return
                if seq.lora_id != head.lora_id:
                    jumped.append(seq)
                    continue
                if any(o.bypassed >= MAX_BYPASSES for o in jumped):
                    break
                for o in jumped:
                    o.bypassed += 1
                self._start(seq)

    def _start(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        seq.slot = self.slots.index(None)
        self.slots[seq.slot] = seq.request_id
        seq.status = Status.RUNNING
        self.running[seq.request_id] = seq

    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Sequence]:
        """Record what the call computed and the tokens sampled for sampling rows.

        Returns the sequences that received a new token (finished ones included, with their reason set).
        A request aborted while its step ran is skipped.
        """
        touched = []
        for row in output.rows:
            seq = self.running.get(row.request_id)
            if seq is None:
                continue
            seq.num_computed = row.start_position + len(row.token_ids)
            if not row.samples:
                continue
            token = sampled[row.request_id]
            seq.output_ids.append(token)
            touched.append(seq)
            if token in seq.eos_ids and not seq.ignore_eos:
                self._finish(seq, FinishReason.STOP)
            elif len(seq.output_ids) >= seq.max_new_tokens or seq.num_tokens >= self.ctx_len:
                # The context holds ctx_len tokens in all: the last one never needs its K/V stored.
                self._finish(seq, FinishReason.LENGTH)
        return touched

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        if seq.slot is not None and self.slots[seq.slot] == seq.request_id:
            self.slots[seq.slot] = None
        self.running.pop(seq.request_id, None)
