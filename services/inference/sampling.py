"""Per-request token sampling on numpy logits: greedy, temperature, top-k, top-p, repetition penalty.

Each request owns its generator (seeded from its own seed), so the same request and seed give the
same tokens whatever else shares the batch. The order of processing follows Hugging Face's
``generate``: repetition penalty → temperature → top-k → top-p → draw.
"""

from __future__ import annotations

import secrets

import numpy as np

# The fields, their defaults and checks are declared once in the library (front doors, client and CLI read them).
from loraflow.options.sampling_params import DEFAULT_MAX_NEW_TOKENS, MAX_NEW_TOKENS, SamplingParams  # noqa: F401


class NonFiniteLogits(ArithmeticError):
    """A row's logits (or the distribution made from them) hold NaN or inf: that request cannot go on."""


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
        if not np.isfinite(logits).all():
            raise NonFiniteLogits(f"{int(np.count_nonzero(~np.isfinite(logits)))} of {logits.shape[0]} logits "
                                  "are NaN or inf")
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
        if not np.isfinite(probs).all():
            raise NonFiniteLogits("the next-token distribution is not finite")
        return int(self.rng.choice(probs.shape[0], p=probs))


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - np.max(x)
    e = np.exp(x)
    return e / e.sum()


def greedy_batch(logits: np.ndarray) -> np.ndarray:
    """Argmax of [B, V] logits → [B]; the fast path when every row is greedy without a penalty."""
    return np.argmax(logits, axis=-1)
