"""`generate(...)`'s inputs checked and tokenized, and its result (QEfficient's exec info).

Rows are tokenized with the caller's tokenizer (a Hugging Face tokenizer, or anything with
`encode`/`decode`), the way QEfficient encodes prompts: no chat template. Timings are taken as the
tokens arrive: prefill time is until every row has its first token, decode tokens/s counts the
tokens after each row's first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from loraflow.api.adapter_set import BASE, AdapterSet
from loraflow.options.sampling_params import SAMPLING_FIELDS

# generate()'s sampling keywords; max_new_tokens is its generation_len.
SAMPLING_KEYS = tuple(f.name for f in SAMPLING_FIELDS if f.name != "max_new_tokens")


@dataclass(frozen=True)
class PerfMetrics:
    prefill_time: float  # seconds until every prompt had its first generated token
    decode_perf: float  # generated tokens per second after the first token of each prompt
    total_perf: float  # generated tokens per second over the whole call
    total_time: float  # seconds for the whole call


@dataclass(frozen=True)
class GenerationResult:
    """Like QEfficient's CloudAI100ExecInfo: texts, token ids per prompt, and timings."""

    batch_size: int
    generated_texts: list[str]
    generated_ids: list[list[int]]
    perf_metrics: PerfMetrics
    finish_reasons: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        p = self.perf_metrics
        return (f"GenerationResult(prompts={self.batch_size}, prefill_time={p.prefill_time:.3f}s, "
                f"decode={p.decode_perf:.1f} tok/s, total={p.total_perf:.1f} tok/s, total_time={p.total_time:.2f}s)")


@dataclass(frozen=True)
class GenerationRow:
    prompt_ids: list[int]
    adapter: str  # engine name, "" = base
    max_new_tokens: int


def plan_rows(tokenizer: Any, prompts: Sequence[str] | str, mapping: Sequence[str] | None, adapters: AdapterSet,
              *, generation_len: int | None, ctx_len: int) -> list[GenerationRow]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must not be empty")
    if mapping is None:
        mapping = [BASE] * len(prompts)
    mapping = list(mapping)
    if len(mapping) != len(prompts):
        raise RuntimeError(f"Number of prompts should match number of prompt_to_adapter_mapping, got "
                           f"len(prompts) = {len(prompts)}, len(prompt_to_adapter_mapping) = {len(mapping)}")
    if generation_len is not None and (not isinstance(generation_len, int) or isinstance(generation_len, bool)
                                       or generation_len < 1):
        raise ValueError(f"generation_len must be a positive integer, got {generation_len!r}")
    engine_names = [adapters.engine_name(m) for m in mapping]  # unknown names fail before any work
    rows = []
    for prompt, name in zip(prompts, engine_names, strict=True):
        ids = encode(tokenizer, prompt)
        if len(ids) >= ctx_len:
            raise ValueError(f"prompt has {len(ids)} tokens but ctx_len is {ctx_len}; compile with a larger ctx_len")
        # QEfficient's default: fill the context.
        rows.append(GenerationRow(ids, name, generation_len or ctx_len - len(ids)))
    return rows


def encode(tokenizer: Any, prompt: str) -> list[int]:
    if not isinstance(prompt, str):
        raise TypeError(f"prompts must be strings, got {type(prompt).__name__}")
    if callable(tokenizer) and not hasattr(tokenizer, "encode_chat"):  # a Hugging Face tokenizer
        return [int(t) for t in tokenizer(prompt)["input_ids"]]
    return [int(t) for t in tokenizer.encode(prompt)]


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def sampling_kwargs(sampling: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
    if unknown:
        raise TypeError(f"generate() got unexpected keyword argument(s) {unknown}; sampling takes {list(SAMPLING_KEYS)}")
    out = {k: v for k, v in sampling.items() if v is not None}
    if "stop" in out and isinstance(out["stop"], str):
        out["stop"] = (out["stop"],)
    return out


class Timer:
    """First-token and token counts as rows stream, → PerfMetrics."""

    def __init__(self, rows: int):
        self.start = time.perf_counter()
        self.first: list[float | None] = [None] * rows
        self.tokens = 0
        self._lock = threading.Lock()  # rows are consumed on several threads

    def token(self, row: int, n: int = 1) -> None:
        now = time.perf_counter()
        with self._lock:
            if n and self.first[row] is None:
                self.first[row] = now
            self.tokens += n

    def metrics(self) -> PerfMetrics:
        end = time.perf_counter()
        total = end - self.start
        firsts = [t for t in self.first if t is not None]
        prefill = (max(firsts) - self.start) if firsts else total
        decode_tokens = self.tokens - len(firsts)
        decode_time = max(total - prefill, 1e-9)
        return PerfMetrics(prefill_time=prefill, decode_perf=decode_tokens / decode_time if decode_tokens else 0.0,
                           total_perf=self.tokens / max(total, 1e-9), total_time=total)


def stream_to(streamer: Any, ids: Sequence[int]) -> None:
    """Feed a transformers-style streamer (`put(ids)`, `end()`)."""
    if streamer is not None and ids:
        import numpy as np

        streamer.put(np.asarray(list(ids)))
