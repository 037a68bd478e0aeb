"""Per-request token sampling on numpy logits: greedy, temperature, top-k, top-p, repetition penalty.

Each request owns its generator (seeded from its own seed), so the same request and seed give the
same tokens whatever else shares the batch. The order of processing follows Hugging Face's
``generate``: repetition penalty → temperature → top-k → top-p → draw.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

from loraflow.errors import InvalidArgument

DEFAULT_MAX_NEW_TOKENS = 64
# Bounds chosen so no accepted value can turn finite logits into inf/NaN probabilities:
# below TEMPERATURE_MIN, logits / T overflows float64 for any |logit| > ~1.8e306 * T (1e-320 is a
# subnormal: every logit becomes +-inf and the softmax is inf - inf = NaN); T = 0.01 already makes
# a 0.1 logit gap a 22000x probability ratio, so smaller values are greedy in all but name.
# Above TEMPERATURE_MAX the distribution is uniform in all but name.
TEMPERATURE_MIN = 1e-2
TEMPERATURE_MAX = 100.0
# The repetition penalty divides or multiplies logits by the penalty: the same overflow argument.
REPETITION_PENALTY_MIN = 1e-2
REPETITION_PENALTY_MAX = 100.0
# No vocabulary is near a million tokens; top_k above the vocabulary is simply "off".
MAX_TOP_K = 1 << 20
# The context bounds a request anyway; this keeps a single field from asking for absurd work.
MAX_NEW_TOKENS = 1 << 16
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_SEED = 2**63


def _is_number(value) -> bool:
    return isinstance(value, int | float | np.floating | np.integer) and not isinstance(value, bool)


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

        def finite(name: str, value) -> None:
            if not _is_number(value) or not math.isfinite(value):
                bad(name, value, "must be a finite number")

        for name in ("max_new_tokens", "top_k"):
            if not isinstance(getattr(self, name), int | np.integer) or isinstance(getattr(self, name), bool):
                bad(name, getattr(self, name), "must be an integer")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            bad("max_new_tokens", self.max_new_tokens, f"must be in 1..{MAX_NEW_TOKENS}")
        finite("temperature", self.temperature)
        if self.temperature != 0 and not TEMPERATURE_MIN <= self.temperature <= TEMPERATURE_MAX:
            bad("temperature", self.temperature,
                f"must be 0 (greedy) or in [{TEMPERATURE_MIN}, {TEMPERATURE_MAX}]")
        if not 0 <= self.top_k <= MAX_TOP_K:
            bad("top_k", self.top_k, f"must be in 0..{MAX_TOP_K} (0 = off)")
        finite("top_p", self.top_p)
        if not 0 <= self.top_p <= 1:
            bad("top_p", self.top_p, "must be in (0, 1] (0 = off)")
        finite("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty != 0 and not \
                REPETITION_PENALTY_MIN <= self.repetition_penalty <= REPETITION_PENALTY_MAX:
            bad("repetition_penalty", self.repetition_penalty,
                f"must be 0 (off) or in [{REPETITION_PENALTY_MIN}, {REPETITION_PENALTY_MAX}]")
        if self.seed is not None and (not isinstance(self.seed, int | np.integer) or not 0 <= self.seed < MAX_SEED):
            bad("seed", self.seed, "must be in [0, 2**63)")
        if len(self.stop) > MAX_STOP_STRINGS:
            bad("stop", len(self.stop), f"may hold at most {MAX_STOP_STRINGS} strings")
        for i, s in enumerate(self.stop):
            if not isinstance(s, str) or not s:
                bad("stop", list(self.stop), f"must hold non-empty strings (stop[{i}] is empty)")
            if len(s) > MAX_STOP_STRING_CHARS:
                bad("stop", f"<{len(s)} chars>", f"strings must be at most {MAX_STOP_STRING_CHARS} characters "
                    f"(stop[{i}] is longer)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


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
