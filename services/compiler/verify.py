"""Verify an exported graph before publishing: the runtime's own step driver against the PyTorch reference.

One scenario (``drive_scenario``) drives either step driver the inference service runs
(loraflow.artifact.traced_step_driver.TracedStepDriver for the traced graph, here in ``verify_graph``;
loraflow.artifact.step_driver.FusedStepDriver for the fused one, in services/compiler/fused/verify.py):
rows in shuffled KV slots with a gap (so a fused decode call carries a dummy row), chunked prefill with
rows sharing calls (shorter chunks right-padded), mixed adapters with slot 0 (base) among them, and one
request joining alone after the others have decoded; decode tokens are the graph's own greedy picks.
``check_runs`` then runs the reference once over every row's whole sequence (services/compiler/modeling/
layerwise.py: layer by layer, one layer's weights resident) and compares each sampled logit row; several
graphs (an artifact's two LoRA kernels) driven one after another share that one reference pass.

Tolerance: max |graph - reference| / max(1, max |reference logit|) must stay within ``scaled_tolerance``:
the dtype's base tolerance, or NOISE_MARGIN times the float32 accumulation error of this model on these
rows, whichever is larger. That error is measured, not guessed: the float model runs in float32 and float64
side by side and their relative difference grows with the model's activation scale and depth (tiny
models ~1e-6; SmolLM2-135M with a strong adapter, whose residual stream reaches 2e4, ~1e-4). A miswired
graph differs by 1e-2 and more, so the check still catches it; a model whose own float32 error would
need a tolerance above MAX_FP32_TOLERANCE fails verification instead of being waved through.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from loraflow.artifact import graph_contract as gc
from loraflow.artifact.manifest import GraphSpec
from loraflow.artifact.step_driver import Row
from loraflow.errors import InvalidArgument, LoraflowError
from services.compiler.modeling import layerwise
from services.compiler.modeling.decoder import MultiLoraDecoder
from services.compiler.modeling.layerwise import LayerHook, ReferenceRow, Variant
from services.compiler.modeling.weights import ModuleWeights, WeightSource

# Max |ORT - reference| allowed, as a fraction of max(1, max |reference logit|), before scaling by the
# model's measured float32 error. int8 is per-tensor dynamic quantisation and only approximates the model:
# SmolLM2-135M measures 0.22 (lm_head kept float), while a miswired graph measures > 1, so 0.3 still catches
# broken exports.
TOLERANCE = {"fp32": 1e-4, "fp16": 3e-2, "int8": 0.3}
# The tolerance is at least this many times the reference's own float32 error (float32 vs float64).
NOISE_MARGIN = 10.0
# fp16 rounds 2^13 times coarser than fp32: its expected error is the float32 one scaled by that.
FP16_NOISE_SCALE = 2.0 ** 13
# Where the graph rounds activations to int8 (MatMulNBits accuracy level 4) a value on a rounding boundary
# goes either way, and deep random models amplify such a flip (Mistral-7B's shape: 0.09 relative at the
# logits, exact at one node): the tolerance is at least this many times the reference's own change when
# computed in float64 with the same rounding.
ROUNDING_MARGIN = 2.0
MAX_ROUNDING_TOLERANCE = 0.5
# Beyond these a check could no longer tell a miswired graph from rounding: verification fails.
MAX_FP32_TOLERANCE = 1e-2
MAX_FP16_TOLERANCE = 0.1

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
    # The reference's own float32 error on the scenario (float32 vs float64), which the tolerance follows.
    reference_error: float = 0.0
    max_activation: float = 0.0  # largest |h| of the reference's residual stream
    rounding_error: float = 0.0  # int8-activation graphs: the reference's sensitivity to that rounding


@dataclass(frozen=True)
class ScenarioResult(VerifyReport):
    sampled_tokens: int = 0
    # With a float model in the reference only: error of the graph against it (a measurement, not a check).
    quant_relative_diff: float | None = None
    quant_token_agreement: float | None = None


@dataclass(frozen=True)
class Reference:
    """The reference side of a check, for the rows asked: every position's logits of the model the graph
    holds, its own float32 error, and (quantised graphs) the unquantised model's logits."""

    logits: list[np.ndarray]  # per row [T, V] float32
    error: float  # max over rows of |float32 - float64| / max(1, max |float64|)
    max_activation: float = 0.0
    float_logits: list[np.ndarray | None] | None = None  # measured rows only (None for the others)
    # With int8-rounded activations only: the checked reference, float32 against float64 (both rounded).
    rounding_error: float = 0.0


ReferenceFn = Callable[[Sequence[ReferenceRow]], Reference]


def error_rows(rows: Sequence[ReferenceRow]) -> tuple[int, ...]:
    """The rows the reference's own errors are measured on: for each adapter slot the rows use (the base model
    included), its shortest row. Fewer tokens than every row (the float64 variants cost twice float32's
    compute), yet every adapter's activations; the checked reference still covers every row, and a
    measurement over fewer rows can only make the tolerance tighter (it is at least the base)."""
    shortest: dict[int, int] = {}
    for j, row in enumerate(rows):
        k = shortest.get(row.lora_id)
        if k is None or len(row.tokens) < len(rows[k].tokens):
            shortest[row.lora_id] = j
    return tuple(sorted(shortest.values()))


# The float model's own variants computed in a pass of their own (``float_reference``): label -> result.
FloatPass = Callable[[Sequence[ReferenceRow]], Mapping[str, layerwise.ReferenceResult]]


def _float_variants(plain: WeightSource, sub: tuple[int, ...]) -> dict[str, Variant]:
    """The float model in float64 and float32 over the rows ``sub``: its own float32 error (and, beside a
    quantised graph's weights, the quantisation error) is measured from these two."""
    return {"fp64": Variant(plain, torch.float64, rows=sub), "fp32": Variant(plain, rows=sub)}


def float_reference(plain: WeightSource, banks: Mapping[str, np.ndarray], lora_modules: Sequence[str], *,
                    on_layer: LayerHook | None = None) -> FloatPass:
    """The float model's variants of a reference whose checked weights are another source (a quantised graph's,
    read back): float64 and float32 over ``error_rows``, in a pass of their own. It reads only ``plain`` (the
    checkpoint), so it can run before the graph is written (services/compiler/fused/reference_ahead.py);
    ``layerwise_reference(float_pass=...)`` then takes its results instead of computing them in its pass."""

    def run(rows: Sequence[ReferenceRow]) -> Mapping[str, layerwise.ReferenceResult]:
        return layerwise.reference_logits(_float_variants(plain, error_rows(rows)), rows, banks, lora_modules,
                                          on_layer=on_layer)

    return run


def layerwise_reference(source: WeightSource, banks: Mapping[str, np.ndarray], lora_modules: Sequence[str], *,
                        float_source: WeightSource | None = None, on_layer: LayerHook | None = None,
                        activation_block: int | None = None, measure_on_error_rows: bool = False,
                        float_pass: FloatPass | None = None) -> ReferenceFn:
    """The reference computed layer by layer: ``source`` (the weights the graph holds) in float32, rounding
    its MatMulNBits inputs to int8 per ``activation_block`` as accuracy level 4 does (layerwise.Variant), over
    every row; ``float_source``: the unquantised model, measured beside it. The float32 error the tolerance
    follows is that of the float model (``float_source``, else ``source``), float32 against float64, without
    rounding; with ``measure_on_error_rows`` it, the rounding sensitivity and the quantisation error are
    measured on ``error_rows`` only (else on every row). ``float_pass`` (with ``float_source`` and
    ``measure_on_error_rows``): ``float_reference`` over ``float_source``, already running or done; this pass then
    computes only the checked variants, and ``on_layer`` sees only ``source``'s weights."""
    plain = float_source or source
    if float_pass is not None and (float_source is None or not measure_on_error_rows):
        raise ValueError("float_pass measures float_source on the error rows: it needs float_source and "
                         "measure_on_error_rows")

    def run(rows: Sequence[ReferenceRow]) -> Reference:
        sub = error_rows(rows) if measure_on_error_rows else tuple(range(len(rows)))
        if float_source is not None or activation_block:
            variants = {"check": Variant(source, activation_block=activation_block)}
            if float_pass is None:
                variants.update(_float_variants(plain, sub))
        else:
            variants = {"fp64": Variant(plain, torch.float64, rows=sub), "fp32": Variant(plain)}
        if activation_block:
            variants["check64"] = Variant(source, torch.float64, activation_block=activation_block, rows=sub)
        got = layerwise.reference_logits(variants, rows, banks, lora_modules, on_layer=on_layer)
        if float_pass is not None:
            got.update(float_pass(rows))
        checked = got.get("check", got["fp32"])
        fp32 = got["fp32"].logits if "check" in got else [checked.logits[j] for j in sub]  # on the rows ``sub``
        float_logits = None
        if float_source is not None:
            float_logits = [None] * len(rows)
            for j, logits in zip(sub, got["fp32"].logits, strict=True):
                float_logits[j] = logits
        return Reference(logits=checked.logits, error=_worst(fp32, got["fp64"].logits),
                         max_activation=got["fp64"].max_activation, float_logits=float_logits,
                         rounding_error=(_worst([checked.logits[j] for j in sub], got["check64"].logits)
                                         if activation_block else 0.0))

    return run


def _worst(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    return max((_relative(x, y) for x, y in zip(a, b, strict=True)), default=0.0)


def decoder_reference(decoder: MultiLoraDecoder, banks: Mapping[str, np.ndarray], *,
                      float_decoder: MultiLoraDecoder | None = None) -> ReferenceFn:
    """A materialised decoder as the reference (tests, the traced export), computed layer by layer too."""
    return layerwise_reference(ModuleWeights(decoder), banks, decoder.lora_modules,
                               float_source=ModuleWeights(float_decoder) if float_decoder is not None else None)


def _relative(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / max(1.0, float(np.abs(ref).max()))) if ref.size else 0.0


def scaled_tolerance(base: float, reference_error: float, *, fp16: bool = False, rounding_error: float = 0.0) -> float:
    """``base``, or NOISE_MARGIN x the reference's float32 error (x 2^13 for fp16 compute), or ROUNDING_MARGIN x
    its sensitivity to int8 activation rounding, whichever is largest; VerificationFailed when that is too
    loose to tell a miswired graph from rounding."""
    scale, ceiling = (FP16_NOISE_SCALE, MAX_FP16_TOLERANCE) if fp16 else (NOISE_MARGIN, MAX_FP32_TOLERANCE)
    from_noise = scale * reference_error
    if from_noise > ceiling:
        raise VerificationFailed(
            f"the reference's own float32 error on this model is {reference_error:.3g} (relative), which would "
            f"need a tolerance of {from_noise:.3g} > {ceiling:g}: a graph this model runs on could not be verified",
            float("inf"))
    from_rounding = ROUNDING_MARGIN * rounding_error
    if from_rounding > MAX_ROUNDING_TOLERANCE:
        raise VerificationFailed(
            f"the reference moves by {rounding_error:.3g} (relative) when computed in float64 with the same int8 "
            f"activation rounding: this model is too sensitive to rounding for a level-4 graph to be verified "
            f"(compile with quant_accuracy_level=0)", float("inf"))
    return max(base, from_noise, from_rounding)


def reference_logits(decoder: MultiLoraDecoder, seq: list[int], lora_id: int,
                     banks: Mapping[str, np.ndarray]) -> np.ndarray:
    """[len(seq), V] logits of one row's whole sequence from an empty cache, with ``banks`` [L, N, ...], on a
    materialised decoder (the chunked-decoding tests compare against it)."""
    pk, pv = decoder.empty_cache(1)
    lora_a = {m: torch.from_numpy(np.asarray(banks[gc.lora_a(m)], np.float32)) for m in decoder.lora_modules}
    lora_b = {m: torch.from_numpy(np.asarray(banks[gc.lora_b(m)], np.float32)) for m in decoder.lora_modules}
    with torch.no_grad():
        logits, _, _ = decoder(torch.tensor([seq]), torch.arange(len(seq)).view(1, -1), torch.tensor([[lora_id]]),
                               torch.tensor([[0]]), pk, pv, lora_a, lora_b, all_logits=True)
    return logits[0].float().numpy()


@dataclass(frozen=True)
class ScenarioRun:
    """What one graph did in the scenario: each row's sequence and adapter, and its sampled logits."""

    label: str
    seqs: list[list[int]]
    lora_ids: list[int]
    sampled: list[list[tuple[int, np.ndarray]]]  # per row: (position, logits [V]) at every sampled token
    calls: int
    # Calls before the late joiner's: every kind of call the scenario makes (see drive_scenario), which the
    # rest repeats over other slots.
    first_part_calls: int = 0

    def rows(self) -> list[ReferenceRow]:
        return [ReferenceRow(tuple(s), lora) for s, lora in zip(self.seqs, self.lora_ids, strict=True)]


def drive_scenario(driver, *, vocab_size: int, ctx_len: int, occupied_slots: int, chunk: int, label: str,
                   decode_steps: int = 3, seed: int = 0, fed_tokens: bool = False) -> ScenarioRun:
    """Drive ``driver`` (a step driver over at least SCENARIO_SLOTS KV slots of ``ctx_len`` positions, banks
    bound) through the scenario; decode steps feed each row's own greedy token, or with ``fed_tokens`` a token
    drawn from the scenario's seed, so every call is known before any logits are (services/compiler/fused/
    ranges.py records the calls and runs them a layer range at a time). The caller closes the driver."""
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
    feed = np.random.default_rng([seed, 1])  # the fed tokens: independent of the prompts' draws

    def next_token(b: int) -> int:
        return int(feed.integers(0, vocab_size)) if fed_tokens else int(np.argmax(sampled[b][-1][1]))

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
        step = [Row(_KV_SLOTS[b], lora_ids[b], (next_token(b),), len(seqs[b])) for b in rows]
        logits = driver.decode(step)
        for j, b in enumerate(rows):
            seqs[b].append(step[j].token_ids[0])
            sampled[b].append((len(seqs[b]) - 1, logits[j].copy()))

    # The first part makes every kind of call: first chunks of rows in adjacent slots padded into one call (a
    # base row and an adapter's), a lone first chunk, continuing chunks (one of a single token), decode calls
    # over a gap (a dummy row) and with a waiting row.
    prefill_together(list(range(B - 1)))  # fused: slots 4 and 3 in one call (3 tokens padded), 1 alone
    decode([0, 1, 2])
    decode([0, 2])  # row 1 waits: a fused decode call over 1..4 carries it and slot 2 as dummy rows
    first_part = driver.calls
    prefill(B - 1)  # joins the running batch
    for _ in range(decode_steps):
        decode(list(range(B)))
    return ScenarioRun(label=label, seqs=seqs, lora_ids=lora_ids, sampled=sampled, calls=driver.calls,
                       first_part_calls=first_part)


class _NoGraph:
    """A step driver that runs nothing (zero logits): with fed tokens the scenario's calls, and so its rows, do
    not depend on what the graph computes."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.calls = vocab_size, 0

    def _logits(self, rows: int) -> np.ndarray:
        self.calls += 1
        return np.zeros((rows, self.vocab_size), np.float32)

    def prefill(self, row: Row) -> np.ndarray:
        return self._logits(1)[0]

    def prefill_rows(self, rows: Sequence[Row]) -> np.ndarray:
        return self._logits(len(rows))

    def decode(self, rows: Sequence[Row]) -> np.ndarray:
        return self._logits(len(rows))


def scenario_rows(*, vocab_size: int, ctx_len: int, occupied_slots: int, chunk: int, decode_steps: int = 3,
                  seed: int = 0) -> list[ReferenceRow]:
    """The rows ``drive_scenario`` with fed tokens (the fused artifact's recording) asks the reference for, known
    before any graph exists: a reference pass can start while the graph is still being written."""
    run = drive_scenario(_NoGraph(vocab_size), vocab_size=vocab_size, ctx_len=ctx_len, occupied_slots=occupied_slots,
                         chunk=chunk, label="rows", decode_steps=decode_steps, seed=seed, fed_tokens=True)
    return reference_rows([run])


def reference_rows(runs: Sequence[ScenarioRun]) -> list[ReferenceRow]:
    """Every distinct row of ``runs``, in first-seen order: what ``check_runs`` asks its reference for."""
    rows: dict[ReferenceRow, None] = {}
    for run in runs:
        for row in run.rows():
            rows.setdefault(row)
    return list(rows)


def check_runs(runs: Sequence[ScenarioRun], reference: ReferenceFn, *, base_tolerance: float,
               fp16: bool = False) -> list[ScenarioResult]:
    """Compare every run's sampled logits with one reference pass over all their rows (VerificationFailed on
    non-finite logits or a relative difference above the tolerance, naming the run's label)."""
    rows = {row: j for j, row in enumerate(reference_rows(runs))}
    ref = reference(list(rows))
    tolerance = scaled_tolerance(base_tolerance, ref.error, fp16=fp16, rounding_error=ref.rounding_error)
    results = []
    for run in runs:
        worst, scale, agree, total, q_worst, q_agree, q_total = 0.0, 1.0, 0, 0, 0.0, 0, 0
        for b, row in enumerate(run.rows()):
            want = ref.logits[rows[row]]
            flt = ref.float_logits[rows[row]] if ref.float_logits is not None else None
            for pos, got in run.sampled[b]:
                if not np.isfinite(got).all():
                    raise VerificationFailed(f"ONNX Runtime produced non-finite logits ({run.label}, row {b}, "
                                             f"position {pos})", float("inf"))
                got = got.astype(np.float32)
                worst = max(worst, float(np.abs(got - want[pos]).max()))
                scale = max(scale, float(np.abs(want[pos]).max()))
                agree += int(np.argmax(got) == np.argmax(want[pos]))
                total += 1
                if flt is not None:
                    q_worst = max(q_worst, _relative(got, flt[pos]))
                    q_agree += int(np.argmax(got) == np.argmax(flt[pos]))
                    q_total += 1
        measured = ref.float_logits is not None and q_total > 0
        result = ScenarioResult(
            max_abs_diff=worst, relative_diff=worst / scale, tolerance=tolerance, calls=run.calls,
            tokens_match=agree == total, reference_error=ref.error, max_activation=ref.max_activation,
            rounding_error=ref.rounding_error,
            sampled_tokens=total, quant_relative_diff=q_worst if measured else None,
            quant_token_agreement=q_agree / q_total if measured else None)
        if worst / scale > tolerance:
            raise VerificationFailed(
                f"{run.label} differs from the PyTorch reference: max abs diff {worst:.6g} (relative "
                f"{worst / scale:.3g} > tolerance {tolerance:g}; the reference's own float32 error is "
                f"{ref.error:.3g}) over {total} sampled tokens", worst)
        results.append(result)
    return results


def verify_graph(session, reference: ReferenceFn, graph: GraphSpec, banks: Mapping[str, np.ndarray], *,
                 dtype: str, occupied_slots: int, chunk: int, ctx_len: int, decode_steps: int = 3,
                 seed: int = 0) -> VerifyReport:
    """Run a traced graph's ``session`` through TracedStepDriver in the scenario above and compare it with
    ``reference`` (banks [L, N, ...] by graph input name). ``ctx_len``: positions of the driver's cache (the
    traced graph takes any past length up to it)."""
    from loraflow.artifact.traced_step_driver import TracedStepDriver

    if dtype not in TOLERANCE:
        raise InvalidArgument(f"no verification tolerance for dtype {dtype!r} (known: {sorted(TOLERANCE)})",
                              field="dtype", value=dtype)
    # The graph's own float type; the reference reads the float32 banks.
    feeds = {name: np.ascontiguousarray(bank, dtype=graph.dtype) for name, bank in banks.items()}
    driver = TracedStepDriver.from_graph(session, graph, feeds, slots=SCENARIO_SLOTS, ctx_len=ctx_len)
    try:
        run = drive_scenario(driver, vocab_size=graph.vocab_size, ctx_len=ctx_len, occupied_slots=occupied_slots,
                             chunk=chunk, label=f"exported graph ({dtype})", decode_steps=decode_steps, seed=seed)
    finally:
        driver.close()
    (result,) = check_runs([run], reference, base_tolerance=TOLERANCE[dtype], fp16=dtype == "fp16")
    return VerifyReport(max_abs_diff=result.max_abs_diff, relative_diff=result.relative_diff,
                        tolerance=result.tolerance, calls=result.calls, tokens_match=result.tokens_match,
                        reference_error=result.reference_error, max_activation=result.max_activation)
