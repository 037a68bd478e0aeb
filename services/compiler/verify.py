"""Verify an exported graph before publishing: the runtime's own step driver against the PyTorch decoder.

One scenario (``run_scenario``) drives either step driver the inference service runs
(loraflow.artifact.traced_step_driver.TracedStepDriver for the traced graph, here in ``verify_graph``;
loraflow.artifact.step_driver.FusedStepDriver for the fused one, in services/compiler/fused/verify.py):
rows in shuffled KV slots with a gap (so a fused decode call carries a dummy row), chunked prefill with
rows sharing calls (shorter chunks right-padded), mixed adapters with slot 0 (base) among them, and one
request joining alone after the others have decoded. Each row's logits at every sampled token are
compared with the PyTorch decoder run on that row's whole sequence from an empty cache; they must agree
within a tolerance, or VerificationFailed says by how much.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from loraflow import graph_contract as gc
from loraflow.artifact.step_driver import Row
from loraflow.errors import InvalidArgument, LoraflowError
from loraflow.manifest import GraphSpec
from services.compiler.modeling.decoder import MultiLoraDecoder

# Max |ORT - reference| allowed, as a fraction of max(1, max |reference logit|). int8 is per-tensor
# dynamic quantisation and only approximates the model: SmolLM2-135M measures 0.22 (lm_head kept
# float), while a miswired graph measures > 1, so 0.3 still catches broken exports.
TOLERANCE = {"fp32": 1e-4, "fp16": 3e-2, "int8": 0.3}

# KV slots the scenario uses (0..4): rows sit in 4, 1, 3 and 0; slot 2 stays free.
SCENARIO_SLOTS = 5
_KV_SLOTS = (4, 1, 3, 0)
# Decode calls row 0 makes besides ``decode_steps``: one with rows 0-2, one with rows 0 and 2.
_EXTRA_DECODES = 2


class VerificationFailed(LoraflowError):
    """The exported graph disagrees with the PyTorch reference."""

    default_reason = "VERIFICATION_FAILED"

    def __init__(self, message: str, max_abs_diff: float):
        super().__init__(message, metadata={"max_abs_diff": f"{max_abs_diff:.6g}"})
        self.max_abs_diff = max_abs_diff


@dataclass(frozen=True)
class VerifyReport:
    max_abs_diff: float
    relative_diff: float
    tolerance: float
    calls: int
    tokens_match: bool


@dataclass(frozen=True)
class ScenarioResult(VerifyReport):
    sampled_tokens: int = 0
    # With a float decoder only: error of the graph against it (a measurement, not a check).
    quant_relative_diff: float | None = None
    quant_token_agreement: float | None = None


def reference_logits(decoder: MultiLoraDecoder, seq: list[int], lora_id: int,
                     banks: Mapping[str, np.ndarray]) -> np.ndarray:
    """[len(seq), V] logits of one row's whole sequence from an empty cache, with ``banks`` [L, N, ...]."""
    pk, pv = decoder.empty_cache(1)
    lora_a = {m: torch.from_numpy(np.asarray(banks[gc.lora_a(m)], np.float32)) for m in decoder.lora_modules}
    lora_b = {m: torch.from_numpy(np.asarray(banks[gc.lora_b(m)], np.float32)) for m in decoder.lora_modules}
    with torch.no_grad():
        logits, _, _ = decoder(torch.tensor([seq]), torch.arange(len(seq)).view(1, -1), torch.tensor([[lora_id]]),
                               torch.tensor([[0]]), pk, pv, lora_a, lora_b, all_logits=True)
    return logits[0].float().numpy()


def run_scenario(driver, reference: MultiLoraDecoder, banks: Mapping[str, np.ndarray], *, vocab_size: int,
                 ctx_len: int, occupied_slots: int, chunk: int, tolerance: float, label: str,
                 float_decoder: MultiLoraDecoder | None = None, decode_steps: int = 3, seed: int = 0
                 ) -> ScenarioResult:
    """Drive ``driver`` (a step driver over at least SCENARIO_SLOTS KV slots of ``ctx_len`` positions,
    with ``banks`` bound) through the scenario and compare every sampled row's logits with ``reference``
    (the decoder whose weights the graph holds; ``banks`` [L, N, ...] by graph input name). Raises
    VerificationFailed on non-finite logits or a relative difference above ``tolerance``; ``label``
    names the graph in the message. ``float_decoder``: the unquantised decoder, whose distance from the
    graph is measured and reported. The caller closes the driver."""
    for name, value in (("chunk", chunk), ("occupied_slots", occupied_slots)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidArgument(f"verification {name} must be a positive integer, got {value!r}", field=name,
                                  value=value)
    if not isinstance(decode_steps, int) or isinstance(decode_steps, bool) or decode_steps < 0:
        raise InvalidArgument(f"verification decode_steps must be >= 0, got {decode_steps!r}",
                              field="decode_steps", value=decode_steps)
    if ctx_len < 1 + _EXTRA_DECODES + decode_steps:
        raise InvalidArgument(f"verification needs ctx_len >= {1 + _EXTRA_DECODES + decode_steps} (a prompt "
                              f"token and {_EXTRA_DECODES + decode_steps} decoded ones), got {ctx_len}",
                              field="ctx_len", value=ctx_len)
    rng = np.random.default_rng(seed)
    B = len(_KV_SLOTS)
    lora_ids = [b % (occupied_slots + 1) for b in range(B)]  # includes slot 0 (base)
    # Row 0 decodes decode_steps + _EXTRA_DECODES tokens after its prompt: all of it fits ctx_len.
    budget = max(1, min(ctx_len, 64) - decode_steps - _EXTRA_DECODES)
    lengths = [max(1, min(budget, n)) for n in (2 * chunk + 1, chunk, 3, chunk + 2)]
    prompts = [rng.integers(0, vocab_size, n).tolist() for n in lengths]
    seqs = [list(p) for p in prompts]
    sampled: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(B)]  # (position, logits) per row

    def prefill(b: int) -> None:
        """One row alone, chunk by chunk."""
        for start in range(0, len(prompts[b]), chunk):
            piece = tuple(prompts[b][start:start + chunk])
            logits = driver.prefill(Row(_KV_SLOTS[b], lora_ids[b], piece, start))
        sampled[b].append((len(seqs[b]) - 1, logits.copy()))

    def prefill_together(rows: list[int]) -> None:
        """Chunk by chunk, all of ``rows`` in each call as the scheduler hands them out (a fused graph runs
        rows in adjacent slots in one call, the shorter chunks right-padded)."""
        done = dict.fromkeys(rows, 0)
        while any(done[b] < len(prompts[b]) for b in rows):
            step = [b for b in rows if done[b] < len(prompts[b])]
            logits = driver.prefill_rows([Row(_KV_SLOTS[b], lora_ids[b], tuple(prompts[b][done[b]:done[b] + chunk]),
                                              done[b]) for b in step])
            for j, b in enumerate(step):
                done[b] = min(len(prompts[b]), done[b] + chunk)
                if done[b] == len(prompts[b]):
                    sampled[b].append((len(seqs[b]) - 1, logits[j].copy()))

    def decode(rows: list[int]) -> None:
        step = [Row(_KV_SLOTS[b], lora_ids[b], (int(np.argmax(sampled[b][-1][1])),), len(seqs[b])) for b in rows]
        logits = driver.decode(step)
        for j, b in enumerate(rows):
            seqs[b].append(step[j].token_ids[0])
            sampled[b].append((len(seqs[b]) - 1, logits[j].copy()))

    prefill_together(list(range(B - 1)))  # fused: slots 4 and 3 in one call (3 tokens padded), 1 alone
    decode([0, 1, 2])
    decode([0, 2])  # row 1 waits: a fused decode call over 1..4 carries it and slot 2 as dummy rows
    prefill(B - 1)  # joins the running batch
    for _ in range(decode_steps):
        decode(list(range(B)))

    worst, scale, agree, total, q_worst, q_agree = 0.0, 1.0, 0, 0, 0.0, 0
    for b in range(B):
        ref = reference_logits(reference, seqs[b], lora_ids[b], banks)
        flt = reference_logits(float_decoder, seqs[b], lora_ids[b], banks) if float_decoder is not None else None
        for pos, got in sampled[b]:
            if not np.isfinite(got).all():
                raise VerificationFailed(f"ONNX Runtime produced non-finite logits ({label}, row {b}, position "
                                         f"{pos})", float("inf"))
            got = got.astype(np.float32)
            worst = max(worst, float(np.abs(got - ref[pos]).max()))
            scale = max(scale, float(np.abs(ref[pos]).max()))
            agree += int(np.argmax(got) == np.argmax(ref[pos]))
            total += 1
            if flt is not None:
                q_worst = max(q_worst, float(np.abs(got - flt[pos]).max() / max(1.0, np.abs(flt[pos]).max())))
                q_agree += int(np.argmax(got) == np.argmax(flt[pos]))
    result = ScenarioResult(
        max_abs_diff=worst, relative_diff=worst / scale, tolerance=tolerance, calls=driver.calls,
        tokens_match=agree == total, sampled_tokens=total,
        quant_relative_diff=q_worst if float_decoder is not None else None,
        quant_token_agreement=q_agree / total if float_decoder is not None else None)
    if worst / scale > tolerance:
        raise VerificationFailed(
            f"{label} differs from the PyTorch reference: max abs diff {worst:.6g} (relative "
            f"{worst / scale:.3g} > tolerance {tolerance:g}) over {total} sampled tokens", worst)
    return result


def verify_graph(session, decoder: MultiLoraDecoder, graph: GraphSpec, banks: Mapping[str, np.ndarray], *,
                 dtype: str, occupied_slots: int, chunk: int, ctx_len: int, decode_steps: int = 3,
                 seed: int = 0) -> VerifyReport:
    """Run a traced graph's ``session`` through TracedStepDriver in the scenario above and compare it with
    the float32 PyTorch ``decoder`` (banks [L, N, ...] by graph input name, already installed in it).
    ``ctx_len``: positions of the driver's cache (the traced graph takes any past length up to it)."""
    from loraflow.artifact.traced_step_driver import TracedStepDriver

    if dtype not in TOLERANCE:
        raise InvalidArgument(f"no verification tolerance for dtype {dtype!r} (known: {sorted(TOLERANCE)})",
                              field="dtype", value=dtype)
    # The graph's own float type; the reference reads the float32 banks.
    feeds = {name: np.ascontiguousarray(bank, dtype=graph.dtype) for name, bank in banks.items()}
    driver = TracedStepDriver.from_graph(session, graph, feeds, slots=SCENARIO_SLOTS, ctx_len=ctx_len)
    try:
        result = run_scenario(driver, decoder, banks, vocab_size=graph.vocab_size, ctx_len=ctx_len,
                              occupied_slots=occupied_slots, chunk=chunk, tolerance=TOLERANCE[dtype],
                              label=f"exported graph ({dtype})", decode_steps=decode_steps, seed=seed)
    finally:
        driver.close()
    return VerifyReport(max_abs_diff=result.max_abs_diff, relative_diff=result.relative_diff,
                        tolerance=result.tolerance, calls=result.calls, tokens_match=result.tokens_match)
