"""Verify a fused graph before publishing: the runtime's own step driver against the PyTorch decoder.

The graph runs through ``loraflow.artifact.step_driver.FusedStepDriver`` (the code the inference service
runs) in the scenario traced graphs are verified in too (services.compiler.verify.run_scenario): rows in
shuffled KV slots with a gap (so decode calls carry a dummy row), chunked prefill with rows in adjacent
slots sharing a call (a shorter chunk right-padded), mixed adapters with slot 0 (base) among them, and one
request joining alone after the others have decoded. Each row's logits at every sampled token are compared
with the PyTorch decoder run on that row's whole sequence. For int4/int8 the reference holds the
dequantised weights the graph multiplies by (so the check is of the wiring, tight); the quantisation error
itself is measured against the float decoder and reported (relative logit error, share of greedy tokens
equal to the float model's).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from loraflow.artifact.kv_cache import SharedKvCache
from loraflow.artifact.step_driver import FusedStepDriver, flat_bank
from loraflow.manifest import GraphSpec
from services.compiler.verify import SCENARIO_SLOTS, VerifyReport, run_scenario

# Max |ORT - reference| / max(1, max |reference|). fp32 and MatMulNBits with float activations
# (accuracy_level 0) compute the same sums in another order; accuracy_level 4 rounds activations
# to int8 per block inside the kernel, measured at up to 0.03 on SmolLM2-135M.
TOLERANCE = {0: 1e-4, 1: 1e-4, 2: 5e-3, 3: 5e-3, 4: 0.1}
QUANTIZED_SLACK = 10.0  # int4/int8 at level 0: sums of dequantised products, a little looser than fp32


@dataclass(frozen=True)
class FusedVerifyReport(VerifyReport):
    # Quantised artifacts only: error of the graph against the float model (not a check, a measurement).
    quant_relative_diff: float | None = None
    quant_token_agreement: float | None = None


def flat_bank_views(banks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """[L, N, in, R] / [L, N, R, out] banks as the fused graph's [L*N, ...] float32 inputs."""
    return {name: flat_bank(np.ascontiguousarray(bank, dtype=np.float32)) for name, bank in banks.items()}


def verify_fused_graph(session, reference, graph: GraphSpec, banks: Mapping[str, np.ndarray], *, ctx_len: int,
                       occupied_slots: int, chunk: int, accuracy_level: int | None = None, float_decoder=None,
                       decode_steps: int = 3, seed: int = 0) -> FusedVerifyReport:
    """``reference``: the decoder whose weights the graph holds (banks installed); ``float_decoder``: the
    unquantised one, given for int4/int8 to measure their error. ``ctx_len``: the graph's cache length."""
    level = 0 if accuracy_level is None else int(accuracy_level)
    tol = TOLERANCE[level] * (QUANTIZED_SLACK if float_decoder is not None and level < 2 else 1.0)
    cache = SharedKvCache(layers=graph.layers, slots=SCENARIO_SLOTS, kv_heads=graph.num_kv_heads, ctx_len=ctx_len,
                          head_dim=graph.head_dim)
    driver = FusedStepDriver(session, cache, flat_bank_views(banks), vocab_size=graph.vocab_size)
    try:
        result = run_scenario(driver, reference, banks, vocab_size=graph.vocab_size, ctx_len=ctx_len,
                              occupied_slots=occupied_slots, chunk=chunk, tolerance=tol, label="fused graph",
                              float_decoder=float_decoder, decode_steps=decode_steps, seed=seed)
    finally:
        driver.close()
    return FusedVerifyReport(
        max_abs_diff=result.max_abs_diff, relative_diff=result.relative_diff, tolerance=result.tolerance,
        calls=result.calls, tokens_match=result.tokens_match, quant_relative_diff=result.quant_relative_diff,
        quant_token_agreement=result.quant_token_agreement)
