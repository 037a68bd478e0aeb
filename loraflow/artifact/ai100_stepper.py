"""Driving a retained-state AI 100 program: its static shapes and scheduler steps in its two specializations.

``Ai100Stepper`` turns a scheduler step into the QPC's two specializations: prefill runs
``batch_size`` rows of ``prefill_seq_len`` tokens, decode runs every cache row with one token; rows
the step does not use are idle (position -1 writes and reads nothing). With continuous batching a
row names its KV slot in ``batch_index``; without it row b is slot b.

Shared by the inference service (``Ai100Runtime`` over the card's ``QaicSession``) and the compiler's
verification (``ai100_verify`` over ONNX Runtime playing the card), so both drive the program the same way.
No torch here: the inference image runs this.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from loraflow.artifact import graph_contract as gc
from loraflow.artifact.scheduler import SchedulerOutput
from loraflow.errors import FailedPrecondition, InvalidArgument


class RetainedStateSession(Protocol):
    """What the stepper needs: QAICInferenceSession's calls (QaicSession, or ONNX Runtime in verification)."""

    input_names: list[str]
    output_names: list[str]

    def set_buffers(self, buffers: Mapping[str, np.ndarray]) -> None: ...

    def skip_buffers(self, names: Sequence[str]) -> None: ...

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Ai100Layout:
    """The QPC's static shapes (from the resolved compile options)."""

    batch_size: int
    full_batch_size: int
    prefill_seq_len: int
    ctx_len: int
    continuous_batching: bool

    @property
    def cache_rows(self) -> int:
        return self.full_batch_size if self.continuous_batching else self.batch_size

    @classmethod
    def from_options(cls, options: Mapping[str, object]) -> Ai100Layout:
        bs, fbs = int(options["batch_size"]), int(options["full_batch_size"])
        return cls(batch_size=bs, full_batch_size=fbs, prefill_seq_len=int(options["prefill_seq_len"]),
                   ctx_len=int(options["ctx_len"]), continuous_batching=fbs > bs)


class Ai100Stepper:
    """Runs scheduler steps on a retained-state session in the QPC's two specializations."""

    def __init__(self, session: RetainedStateSession, layout: Ai100Layout, num_layers: int, vocab_size: int):
        self.session = session
        self.layout = layout
        self.vocab_size = vocab_size
        self._logits_rows = 0  # rows of the logits buffer currently set
        missing = [n for n in (gc.INPUT_IDS, gc.POSITION_IDS, gc.LORA_IDS) if n not in session.input_names]
        if layout.continuous_batching and gc.BATCH_INDEX not in session.input_names:
            missing.append(gc.BATCH_INDEX)
        if missing:
            raise FailedPrecondition(f"the AI 100 program lacks inputs {missing}", field="artifact_id",
                                     value=str(missing))
        # The KV cache never leaves the device: skip past_* in and *_RetainedState out.
        kv = [n for i in range(num_layers) for n in (gc.past_key(i), gc.past_value(i))]
        session.skip_buffers(kv + [f"{n}_RetainedState" for n in kv])

    def feeds(self, step: SchedulerOutput) -> tuple[dict[str, np.ndarray], list[int]]:
        """(inputs for the matching specialization, index of each step row in them)."""
        lay = self.layout
        prefill = step.kind == "prefill"
        rows = lay.batch_size if prefill else lay.cache_rows
        seq = lay.prefill_seq_len if prefill else 1
        if step.seq_len > seq:
            raise InvalidArgument(f"a {step.kind} step of {step.seq_len} tokens exceeds the QPC's {seq}",
                                  field="seq_len", value=step.seq_len)
        if step.num_rows > rows:
            raise InvalidArgument(f"a {step.kind} step of {step.num_rows} rows exceeds the QPC's {rows}",
                                  field="rows", value=step.num_rows)
        ids = np.zeros((rows, seq), np.int64)
        pos = np.full((rows, seq), gc.PAD_POSITION, np.int64)  # idle rows: nothing written, nothing read
        lora = np.zeros((rows, 1), np.int64)
        slot = np.zeros((rows, 1), np.int64)
        if not prefill:
            slot[:, 0] = np.arange(rows)  # decode: row r is slot r
        where = []
        for k, row in enumerate(step.rows):
            if not 0 <= row.slot < lay.cache_rows:
                raise InvalidArgument(f"KV slot {row.slot} is outside 0..{lay.cache_rows - 1}", field="slot",
                                      value=row.slot)
            # Without batch_index a row's cache row is its index, so the row goes where its slot is.
            r = k if (prefill and lay.continuous_batching) else row.slot
            if prefill and r >= rows:
                raise InvalidArgument(f"KV slot {row.slot} cannot prefill in a {rows}-row QPC", field="slot",
                                      value=row.slot)
            n = len(row.token_ids)
            ids[r, :n] = row.token_ids
            pos[r, :n] = np.arange(row.start_position, row.start_position + n)
            lora[r, 0] = row.lora_id
            slot[r, 0] = row.slot
            where.append(r)
        if (pos.max(initial=-1)) >= lay.ctx_len:
            raise InvalidArgument(f"position {int(pos.max())} is outside ctx_len {lay.ctx_len}",
                                  field="position_ids", value=int(pos.max()))
        inputs = {gc.INPUT_IDS: ids, gc.POSITION_IDS: pos, gc.LORA_IDS: lora}
        if lay.continuous_batching:
            inputs[gc.BATCH_INDEX] = slot
        return inputs, where

    def execute(self, step: SchedulerOutput) -> np.ndarray:
        """Logits [B, V] float32 for the step's rows, in order."""
        inputs, where = self.feeds(step)
        rows = inputs[gc.INPUT_IDS].shape[0]
        if rows != self._logits_rows:
            # As QEfficient does: an output buffer of this specialization's shape before the run.
            self.session.set_buffers({gc.LOGITS: np.zeros((rows, 1, self.vocab_size), np.float32)})
            self._logits_rows = rows
        logits = self.session.run(inputs)[gc.LOGITS]  # [rows, 1, V]
        return np.asarray(logits[where, -1, :], np.float32)
