"""Per-request token sampling on numpy logits: greedy, temperature, top-k, top-p, repetition penalty.

Each request owns its generator (seeded from its own seed), so the same request and seed give the
same tokens whatever else shares the batch. The order of processing follows Hugging Face's
``generate``: repetition penalty → temperature → top-k → top-p → draw.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import numpy as np

from loraflow.errors import InvalidArgument

DEFAULT_MAX_NEW_TOKENS = 64
MAX_STOP_STRINGS = 16


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 0.0  # 0 = off (same as 1)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 0.0  # 0 = off (same as 1)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, value, why: str):
            raise InvalidArgument(f"sampling.{name} {why}, got {value!r}", field=f"sampling.{name}", value=value)

        if self.max_new_tokens < 1:
            bad("max_new_tokens", self.max_new_tokens, "must be >= 1")
        if not np.isfinite(self.temperature) or self.temperature < 0:
            bad("temperature", self.temperature, "must be a finite number >= 0")
        if self.top_k < 0:
            bad("top_k", self.top_k, "must be >= 0")
        if not np.isfinite(self.top_p) or not 0 <= self.top_p <= 1:
            bad("top_p", self.top_p, "must be in [0, 1]")
        if not np.isfinite(self.repetition_penalty) or self.repetition_penalty < 0:
            bad("repetition_penalty", self.repetition_penalty, "must be >= 0 (0 = off)")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            bad("seed", self.seed, "must be in [0, 2**63)")
        if len(self.stop) > MAX_STOP_STRINGS:
            bad("stop", len(self.stop), f"may hold at most {MAX_STOP_STRINGS} strings")
        if any(not s for s in self.stop):
            bad("stop", list(self.stop), "must not contain empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Samples one request's tokens; owns that request's random generator."""

    def __init__(self, params: SamplingParams):
        self.params = params
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.rng = np.random.Generator(np.random.PCG64(seed))

    @property
    def needs_history(self) -> bool:
        return bool(self.params.repetition_penalty) and self.params.repetition_penalty != 1.0

    def __call__(self, logits: np.ndarray, seen_ids: list[int]) -> int:
        """logits: [V] float for the next position; seen_ids: prompt + output so far (read only when
        a repetition penalty is set)."""
        p = self.params
        if p.greedy and not self.needs_history:
            return int(np.argmax(logits))
        logits = logits.astype(np.float64, copy=True)
        if self.needs_history and seen_ids:
            ids = np.unique(np.asarray(seen_ids, dtype=np.int64))
            ids = ids[ids < logits.shape[0]]
            picked = logits[ids]
            logits[ids] = np.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
        if p.greedy:
            return int(np.argmax(logits))
        logits /= p.temperature
        if p.top_k and p.top_k < logits.shape[0]:
            kth = np.partition(logits, -p.top_k)[-p.top_k]
            logits[logits < kth] = -np.inf
        probs = _softmax(logits)
        if p.top_p and p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
            keep = int(np.searchsorted(cumulative, p.top_p) + 1)
            mask = np.zeros_like(probs, dtype=bool)
            mask[order[:keep]] = True
            probs = np.where(mask, probs, 0.0)
            probs /= probs.sum()
        return int(self.rng.choice(probs.shape[0], p=probs))


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - np.max(x)
    e = np.exp(x)
    return e / e.sum()


def greedy_batch(logits: np.ndarray) -> np.ndarray:
    """Argmax of [B, V] logits → [B]; the fast path when every row is greedy without a penalty."""
    return np.argmax(logits, axis=-1)
