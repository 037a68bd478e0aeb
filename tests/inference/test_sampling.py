"""Sampling on numpy logits: validation, greedy, top-k/top-p support, penalty, per-request seeds."""

from __future__ import annotations

import numpy as np
import pytest

from loraflow.errors import InvalidArgument
from services.inference.sampling import Sampler, SamplingParams


@pytest.mark.parametrize("field,kwargs", [
    ("sampling.temperature", {"temperature": -0.5}),
    ("sampling.top_p", {"top_p": 1.5}),
    ("sampling.top_k", {"top_k": -1}),
    ("sampling.max_new_tokens", {"max_new_tokens": 0}),
    ("sampling.repetition_penalty", {"repetition_penalty": -1.0}),
    ("sampling.stop", {"stop": ("",)}),
])
def test_bad_values_name_the_field(field, kwargs):
    with pytest.raises(InvalidArgument) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field


def test_greedy_is_argmax_and_repetition_penalty_moves_it():
    logits = np.array([1.0, 3.0, 2.9, -1.0], dtype=np.float32)
    assert Sampler(SamplingParams())(logits, [0]) == 1
    # 3.0 / 1.2 = 2.5 < 2.9: the seen token loses to the unseen one.
    assert Sampler(SamplingParams(repetition_penalty=1.2))(logits, [1]) == 2


def test_top_k_and_top_p_restrict_the_support():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=50).astype(np.float32)
    top3 = set(np.argsort(-logits)[:3].tolist())
    s = Sampler(SamplingParams(temperature=1.0, top_k=3, seed=1))
    assert {s(logits, []) for _ in range(200)} <= top3
    peaked = np.full(50, -10.0, dtype=np.float32)
    peaked[[4, 9]] = [5.0, 4.0]  # ~73% and ~27%: top_p=0.5 keeps only token 4
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=2))
    assert {s(peaked, []) for _ in range(100)} == {4}


def test_same_seed_same_draws_different_seed_different_draws():
    logits = np.zeros(1000, dtype=np.float32)
    draws = [[Sampler(SamplingParams(temperature=1.0, seed=seed)) for _ in range(2)] for seed in (7, 8)]
    seq = [[[s(logits, []) for _ in range(20)] for s in pair] for pair in draws]
    assert seq[0][0] == seq[0][1] and seq[1][0] == seq[1][1] and seq[0][0] != seq[1][0]


# Values that used to pass and turned finite logits into NaN probabilities (or asked for unbounded work).
@pytest.mark.parametrize("field,kwargs", [
    ("sampling.temperature", {"temperature": 1e-320}),
    ("sampling.temperature", {"temperature": 1e-3}),
    ("sampling.temperature", {"temperature": float("nan")}),
    ("sampling.temperature", {"temperature": float("inf")}),
    ("sampling.temperature", {"temperature": 1e6}),
    ("sampling.repetition_penalty", {"repetition_penalty": 1e-320}),
    ("sampling.repetition_penalty", {"repetition_penalty": float("nan")}),
    ("sampling.repetition_penalty", {"repetition_penalty": 1e300}),
    ("sampling.top_p", {"top_p": float("nan")}),
    ("sampling.top_k", {"top_k": 2**31 - 1}),
    ("sampling.max_new_tokens", {"max_new_tokens": 2**31 - 1}),
    ("sampling.seed", {"seed": -1}),
    ("sampling.stop", {"stop": ("x" * 10_000,)}),
    ("sampling.stop", {"stop": tuple(str(i) for i in range(17))}),
])
def test_values_that_could_make_nan_or_unbounded_work_are_refused(field, kwargs):
    with pytest.raises(InvalidArgument) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field
    assert field in str(err.value)
    assert len(str(err.value)) < 400  # an oversized value is summarised, not echoed


def test_every_accepted_extreme_keeps_probabilities_finite():
    # Logits as large as a real model's, sampled at each bound of every parameter.
    logits = np.linspace(-1e4, 1e4, 4096).astype(np.float32)
    for kw in ({"temperature": 1e-2}, {"temperature": 100.0}, {"temperature": 1.0, "repetition_penalty": 1e-2},
               {"temperature": 1.0, "repetition_penalty": 100.0}, {"temperature": 1.0, "top_p": 1e-300},
               {"temperature": 1.0, "top_k": 1 << 20}):
        token = Sampler(SamplingParams(seed=3, **kw))(logits, list(range(0, 4096, 7)))
        assert 0 <= token < 4096


def test_non_finite_logits_raise_instead_of_drawing():
    from services.inference.sampling import NonFiniteLogits

    logits = np.array([0.0, np.nan, 1.0], dtype=np.float32)
    for params in (SamplingParams(), SamplingParams(temperature=1.0, seed=1)):
        with pytest.raises(NonFiniteLogits):
            Sampler(params)(logits, [])


def test_the_two_level_draw_is_numpys_inverse_cdf_draw():
    """draw() picks what rng.choice(V, p=weights/sum) picks from the same generator state (one uniform each), on a
    vocabulary that is not a whole number of blocks and has zero weights, which it never draws."""
    from services.inference.sampling import draw

    gen = np.random.default_rng(5)
    weights = np.exp(gen.normal(scale=3.0, size=49_157))
    weights[gen.random(weights.shape[0]) < 0.3] = 0.0
    weights[-5:] = 0.0  # the last, partial block carries nothing
    ours, numpys = np.random.Generator(np.random.PCG64(11)), np.random.Generator(np.random.PCG64(11))
    picks = [draw(weights, ours) for _ in range(2000)]
    assert picks == [int(numpys.choice(weights.shape[0], p=weights / weights.sum())) for _ in range(2000)]
    assert all(weights[i] > 0 for i in picks)
    # A distribution whose mass sits in three blocks, the last one partial: frequencies follow it.
    few = np.zeros(600)
    few[[5, 300, 599]] = [1.0, 2.0, 7.0]
    rng = np.random.Generator(np.random.PCG64(3))
    counts = np.bincount([draw(few, rng) for _ in range(20_000)], minlength=600)
    assert set(np.flatnonzero(counts)) == {5, 300, 599}
    assert np.allclose(counts[[5, 300, 599]] / 20_000, [0.1, 0.2, 0.7], atol=0.02)
