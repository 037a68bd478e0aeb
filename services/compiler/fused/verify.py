"""Verify a fused graph before publishing: the runtime's own step driver against the PyTorch reference.

The graph runs through ``loraflow.artifact.step_driver.FusedStepDriver`` (the code the inference service
runs) in the scenario traced graphs are verified in too (services.compiler.verify.drive_scenario): rows in
shuffled KV slots with a gap (so decode calls carry a dummy row), chunked prefill with rows in adjacent
slots sharing a call (a shorter chunk right-padded), mixed adapters with slot 0 (base) among them, and one
request joining alone after the others have decoded. Each row's logits at every sampled token are compared
with the reference run on that row's whole sequence.

A compiled artifact (``verify_fused_artifact``) is verified a layer range at a time (ranges.py): the
scenario's calls are recorded through the same step driver first (decode tokens fed from the scenario's
seed, so no call waits for logits), then every range's session runs them all and closes before the next
range's opens, so a session never holds more than a range's weights; the artifact's two graphs
(model.onnx and model.native.onnx) go range by range side by side and share one reference pass. The second
graph (which differs from the first only in its LoRA and MLP activation kernels) replays the scenario's first
part (``ScenarioRun.first_part_calls``: every kind of call, before the late joiner), checked end to end against
the reference like the first, and in every range its stream into the next range for each of those calls and its
KV cache after them must equal the first graph's (ranges.compare_replays): the late joiner and the full decode
steps, which repeat those kinds of call over other slots, each a pass over every weight, run on the first
graph only.
``verify_fused_graph`` checks one open session over a whole graph (tests, small models).

For int4/int8 the reference holds the dequantised weights read back from the artifact itself
(readback.ArtifactWeights), each checked to be the block quantisation of the checkpoint's tensor, so the
check is of the wiring and tight; the quantisation error is measured against the float checkpoint in the
same layer pass and reported (relative logit error, share of greedy tokens equal to the float model's).
"""

from __future__ import annotations

import gc as garbage
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from loraflow.artifact import graph_contract as gc
from loraflow.artifact.kv_cache import SharedKvCache
from loraflow.artifact.lora_bank import bank_module_ranks
from loraflow.artifact.manifest import GraphSpec
from loraflow.artifact.session import session_options
from loraflow.artifact.step_driver import FusedStepDriver, flat_bank
from services.compiler.fused import ranges
from services.compiler.verify import (
    SCENARIO_SLOTS,
    ReferenceFn,
    ScenarioResult,
    ScenarioRun,
    VerifyReport,
    check_runs,
    drive_scenario,
    reference_rows,
)

# Max |ORT - reference| / max(1, max |reference|) by MatMulNBits accuracy level, before scaling by the
# model's measured float32 error (services/compiler/verify.py). fp32 and MatMulNBits with float activations
# (accuracy_level 0) compute the same sums in another order; accuracy_level 4 rounds activations to int8
# per block inside the kernel, measured at up to 0.03 on SmolLM2-135M.
TOLERANCE = {0: 1e-4, 1: 1e-4, 2: 5e-3, 3: 5e-3, 4: 0.1}
QUANTIZED_SLACK = 10.0  # int4/int8 at level 0: sums of dequantised products, a little looser than fp32


@dataclass(frozen=True)
class FusedVerifyReport(VerifyReport):
    # Quantised artifacts only: error of the graph against the float model (not a check, a measurement).
    quant_relative_diff: float | None = None
    quant_token_agreement: float | None = None


def base_tolerance(accuracy_level: int | None, quantized: bool) -> float:
    level = 0 if accuracy_level is None else int(accuracy_level)
    return TOLERANCE[level] * (QUANTIZED_SLACK if quantized and level < 2 else 1.0)


def flat_bank_views(banks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """[L, N, in, R] / [L, N, R, out] banks as the fused graph's [L*N, ...] float32 inputs."""
    return {name: flat_bank(np.ascontiguousarray(bank, dtype=np.float32)) for name, bank in banks.items()}


def feed_ranks(banks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The step driver's rank arguments for graph-input-keyed banks (``lora_a.{m}`` [L, N, in, R] /
    ``lora_b.{m}``): ``lora_ranks`` int64 [N] (each slot's rank) and ``lora_module_ranks`` [N, P] (per module)."""
    prefix_a = gc.lora_a("")
    modules = [name[len(prefix_a):] for name in banks if name.startswith(prefix_a)]
    per_module = bank_module_ranks({m: banks[gc.lora_a(m)] for m in modules}, {m: banks[gc.lora_b(m)] for m in modules})
    return {"lora_ranks": per_module.max(axis=1, initial=0), "lora_module_ranks": per_module}


def _report(result: ScenarioResult) -> FusedVerifyReport:
    return FusedVerifyReport(
        max_abs_diff=result.max_abs_diff, relative_diff=result.relative_diff, tolerance=result.tolerance,
        calls=result.calls, tokens_match=result.tokens_match, reference_error=result.reference_error,
        max_activation=result.max_activation, rounding_error=result.rounding_error, quant_relative_diff=result.quant_relative_diff,
        quant_token_agreement=result.quant_token_agreement)


def drive_fused(session, graph: GraphSpec, banks: Mapping[str, np.ndarray], *, ctx_len: int, occupied_slots: int,
                chunk: int, label: str, decode_steps: int = 3, seed: int = 0) -> ScenarioRun:
    """The scenario on one fused graph's session, through the runtime's step driver."""
    cache = SharedKvCache(layers=graph.layers, slots=SCENARIO_SLOTS, kv_heads=graph.num_kv_heads, ctx_len=ctx_len,
                          head_dim=graph.head_dim)
    driver = FusedStepDriver(session, cache, flat_bank_views(banks), vocab_size=graph.vocab_size,
                             **feed_ranks(banks))
    try:
        return drive_scenario(driver, vocab_size=graph.vocab_size, ctx_len=ctx_len, occupied_slots=occupied_slots,
                              chunk=chunk, label=label, decode_steps=decode_steps, seed=seed)
    finally:
        driver.close()


def verify_fused_graph(session, reference: ReferenceFn, graph: GraphSpec, banks: Mapping[str, np.ndarray], *,
                       ctx_len: int, occupied_slots: int, chunk: int, accuracy_level: int | None = None,
                       quantized: bool = False, decode_steps: int = 3, seed: int = 0) -> FusedVerifyReport:
    """One open session against ``reference`` (the weights the graph holds; for a quantised graph with the
    float model beside them). ``ctx_len``: the graph's cache length."""
    run = drive_fused(session, graph, banks, ctx_len=ctx_len, occupied_slots=occupied_slots, chunk=chunk,
                      label="fused graph", decode_steps=decode_steps, seed=seed)
    (result,) = check_runs([run], reference, base_tolerance=base_tolerance(accuracy_level, quantized))
    return _report(result)


def record_fused(graph_inputs, graph: GraphSpec, banks: Mapping[str, np.ndarray], *, ctx_len: int,
                 occupied_slots: int, chunk: int, label: str, decode_steps: int = 3, seed: int = 0
                 ) -> tuple[ScenarioRun, list[ranges.Call]]:
    """The scenario (fed decode tokens) through FusedStepDriver over a Recorder: the run, its sampled logits
    placeholders (ranges.resolve replaces them), and the calls to replay."""
    cache = SharedKvCache(layers=graph.layers, slots=SCENARIO_SLOTS, kv_heads=graph.num_kv_heads, ctx_len=ctx_len,
                          head_dim=graph.head_dim)
    flat = flat_bank_views(banks)
    recorder = ranges.Recorder(graph_inputs, cache, frozenset([*flat, gc.LORA_RANKS]))
    driver = FusedStepDriver(recorder, cache, flat, vocab_size=graph.vocab_size, **feed_ranks(banks))
    try:
        run = drive_scenario(driver, vocab_size=graph.vocab_size, ctx_len=ctx_len, occupied_slots=occupied_slots,
                             chunk=chunk, label=label, decode_steps=decode_steps, seed=seed, fed_tokens=True)
    finally:
        driver.close()
    return run, recorder.calls


@dataclass(frozen=True)
class RangeStats:
    """How the artifact was run: its layer ranges and the sessions opened."""

    ranges: tuple[tuple[int, int], ...]
    sessions: int
    seconds: dict[str, float]  # record (the scenario's calls), replay (every range's session), reference
    # The second graph's largest difference from the first over every range's outputs and KV cache (relative).
    range_diff: float | None = None


def verify_fused_artifact(out_dir: Path, graph: GraphSpec, reference: ReferenceFn, banks: Mapping[str, np.ndarray], *,
                          ctx_len: int, occupied_slots: int, chunk: int, accuracy_level: int | None,
                          quantized: bool, range_bytes: int | None = None
                          ) -> tuple[FusedVerifyReport, FusedVerifyReport | None, RangeStats]:
    """Reports for graph.file and, when the artifact has one, graph.native_file (None otherwise: it replays the
    scenario's first part, held to graph.file range by range), and how they ran. Each graph runs a layer range
    at a time (ranges.py: at most ``range_bytes`` (default ranges.RANGE_BYTES) of weights in a session, one
    session open at a time, the two graphs range by range side by side); one reference pass checks both."""
    t0 = time.perf_counter()
    files = [f for f in (graph.file, graph.native_file) if f]
    models = {f: onnx.load(str(out_dir / f), load_external_data=False) for f in files}
    layer_ranges = ranges.layer_ranges(models[graph.file], graph.layers,
                                        ranges.RANGE_BYTES if range_bytes is None else range_bytes)
    recorded, replays, pieces = {}, {}, {}
    flat = {**flat_bank_views(banks), gc.LORA_RANKS: feed_ranks(banks)["lora_module_ranks"]}
    for f in files:
        recorded[f] = record_fused(list(models[f].graph.input), graph, banks, ctx_len=ctx_len,
                                   occupied_slots=occupied_slots, chunk=chunk, label=f"fused graph {f}")
        pieces[f] = ranges.split_ranges(models[f], graph.layers, layer_ranges)
    del models
    first_part = recorded[files[0]][0].first_part_calls
    for j, f in enumerate(files):
        calls = recorded[f][1] if j == 0 else recorded[f][1][:first_part]  # the second graph: the first part
        replays[f] = ranges.RangeReplay(calls, flat, kv_heads=graph.num_kv_heads, ctx_len=ctx_len,
                                        head_dim=graph.head_dim, slots=SCENARIO_SLOTS,
                                        keep_cache_after=first_part - 1 if j == 0 and len(files) > 1 else None)
    seconds = {"record": time.perf_counter() - t0}
    # The reference needs only the rows, known now: it runs on a thread of its own while the ranges replay
    # (ONNX Runtime's small calls leave the cores idle between parallel sections; torch fills them).
    rows = reference_rows([recorded[f][0] for f in files])
    computed: dict[str, object] = {}

    def compute() -> None:
        t0 = time.perf_counter()
        try:
            computed["reference"] = reference(rows)
        except BaseException as err:  # noqa: BLE001  (raised on the caller's thread)
            computed["error"] = err
        seconds["reference"] = time.perf_counter() - t0

    worker = threading.Thread(target=compute, name="verify-reference", daemon=True)
    worker.start()
    t0 = time.perf_counter()
    tolerance = base_tolerance(accuracy_level, quantized)
    try:
        range_diff = _replay_ranges(out_dir, graph, files, pieces, replays, prepack=quantized, tolerance=tolerance)
    finally:
        worker.join()
    seconds["replay"] = time.perf_counter() - t0
    if "error" in computed:
        raise computed["error"]
    runs = []
    for f in files:
        run = recorded[f][0]
        replayed = len(replays[f].calls)
        sampled = [[(pos, mark) for pos, mark in row if int(mark[0]) <= replayed] for row in run.sampled]
        runs.append(replace(run, sampled=ranges.resolve(sampled, replays[f].logits), calls=replayed))

    def precomputed(asked):
        if list(asked) != rows:
            raise RuntimeError("check_runs asked for other rows than were recorded")
        return computed["reference"]

    results = check_runs(runs, precomputed, base_tolerance=tolerance)
    stats = RangeStats(ranges=tuple(layer_ranges), sessions=sum(r.sessions for r in replays.values()),
                       seconds={k: round(v, 3) for k, v in seconds.items()}, range_diff=range_diff)
    return _report(results[0]), (_report(results[1]) if len(results) > 1 else None), stats


def _replay_ranges(out_dir: Path, graph: GraphSpec, files: list[str], pieces: Mapping[str, list[ranges.RangeGraph]],
                   replays: Mapping[str, ranges.RangeReplay], *, prepack: bool, tolerance: float) -> float | None:
    """Every range of every graph in order (range 0 of each graph, then range 1, ...), each session closed
    before the next opens: one range's weights resident at a time. After each range, the second graph's outputs
    and cache against the first's (ranges.compare_replays); returns the largest difference (None: one graph)."""
    import onnxruntime as ort

    from loraflow import native as native_lora

    worst = None
    for k in range(len(next(iter(pieces.values())))):
        for f in files:
            so = session_options(ort, num_threads=0)  # idle threads sleep: the reference runs beside them
            if not prepack:
                # An fp32 range session runs a few calls and closes: packing its weights up front costs more than
                # the calls gain (1B, graph9, packing on 2 threads: 4.9 s of opens + 2.8 s of calls against 4.4-5.4 s
                # of calls unpacked). MatMulNBits without its packed blocks unpacks them on every call (1B int4:
                # verification 20 -> 78 s): int4/int8 pack.
                so.add_session_config_entry("session.disable_prepacking", "1")
            if f == graph.native_file:
                native_lora.register(so)
            session = ranges.open_range(pieces[f][k], out_dir, so)
            try:
                replays[f].run(session, pieces[f][k])
            finally:
                del session  # this range's weights go before the next range's session opens
        for f in files[1:]:
            diff = ranges.compare_replays(replays[files[0]], replays[f], pieces[f][k], tolerance=tolerance,
                                          label=f"fused graph {f}")
            worst = max(worst or 0.0, diff)
    garbage.collect()
    return worst
