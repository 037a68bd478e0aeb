"""A fused graph verified a layer range at a time (services/compiler/fused/ranges.py): the ranges together
compute what the whole graph computes, every node lies in a range, a wiring bug inside one range (or across
two) still fails verification, in either graph (the second replays the scenario's first part and is held to the
first range by range), and an fp32 compile's verification holds a range's weights, not the model's."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from loraflow import native as native_lora
from loraflow.artifact import graph_contract as gc
from loraflow.artifact.kv_cache import SharedKvCache
from loraflow.artifact.step_driver import FusedStepDriver
from loraflow.errors import InvalidArgument
from services.compiler.fused import ranges
from services.compiler.fused.builder import FusedGraphOptions
from services.compiler.fused.export import export_fused
from services.compiler.fused.verify import (
    feed_ranks,
    flat_bank_views,
    record_fused,
    verify_fused_artifact,
)
from services.compiler.modeling import CheckpointWeights
from services.compiler.modeling.weights import hf_tensor_shapes
from services.compiler.verify import (
    SCENARIO_SLOTS,
    VerificationFailed,
    drive_scenario,
    layerwise_reference,
    reference_rows,
    scenario_rows,
)
from tests.compiler.helpers import decoder_with_adapters
from tests.support.native import require_native
from tests.support.tiny_models import write_random_checkpoint

CTX = 48
MODULES = ("q_proj", "v_proj", "o_proj", "down_proj")


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    """A 4-layer Llama exported (both LoRA kernels where the native one is built), its banks and checkpoint."""
    tmp = tmp_path_factory.mktemp("ranges")
    model = write_random_checkpoint(tmp / "m", "llama", num_hidden_layers=4, seed=5)
    from tests.compiler.conftest import save_peft_adapter

    adapters = [("a", save_peft_adapter(model, tmp / "a", r=4, lora_alpha=8, target_modules=MODULES, seed=1)),
                ("b", save_peft_adapter(model, tmp / "b", r=8, lora_alpha=16, target_modules=MODULES, seed=2))]
    decoder, banks, _ = decoder_with_adapters(model, adapters, MODULES, slots=3)
    opts = FusedGraphOptions(dtype="fp32", ctx_len=CTX, num_slots=4, max_rank=8, lora_modules=tuple(decoder.lora_modules))
    art = tmp / "art"
    exported = export_fused(CheckpointWeights.open(model), art, opts)
    return model, art, exported.graph, banks, tuple(decoder.lora_modules)


def _whole_graph_run(art, graph, file, banks, native):
    so = ort.SessionOptions()
    if native:
        native_lora.register(so)
    session = ort.InferenceSession(str(art / file), so, providers=["CPUExecutionProvider"])
    cache = SharedKvCache(layers=graph.layers, slots=SCENARIO_SLOTS, kv_heads=graph.num_kv_heads, ctx_len=CTX,
                          head_dim=graph.head_dim)
    driver = FusedStepDriver(session, cache, flat_bank_views(banks), vocab_size=graph.vocab_size,
                             **feed_ranks(banks))
    return drive_scenario(driver, vocab_size=graph.vocab_size, ctx_len=CTX, occupied_slots=2, chunk=4,
                          label="whole", fed_tokens=True)


@pytest.mark.parametrize("native", [False, True])
def test_the_ranges_together_compute_the_whole_graph(four_layers, native):
    """One layer per range: the replayed logits equal one session over the whole file, call for call."""
    model, art, graph, banks, _ = four_layers
    if native:
        require_native()
        if not graph.native_file:
            pytest.skip("the native LoRA kernel is not built here")
    file = graph.native_file if native else graph.file
    proto = onnx.load(str(art / file), load_external_data=False)
    layer_ranges = ranges.layer_ranges(proto, graph.layers, max_bytes=1)
    assert layer_ranges == [(0, 1), (1, 2), (2, 3), (3, 4)]
    pieces = ranges.split_ranges(proto, graph.layers, layer_ranges)
    assert set().union(*(p.nodes for p in pieces)) >= {n.name for n in proto.graph.node
                                                     if n.name in ranges._live(proto.graph)}
    assert all(p.stream_in for p in pieces[1:]) and not pieces[-1].stream_out
    assert all(p.stream_out == q.stream_in for p, q in zip(pieces, pieces[1:], strict=False))  # range to range
    # Each range's file holds only its own layers' weights.
    for p in pieces:
        layers = {int(re.match(r"layers\.(\d+)", t.name).group(1)) for t in p.model.graph.initializer
                  if t.name.startswith("layers.")}
        assert layers <= set(range(*p.layers)), (p.name, layers)
    run, calls = record_fused(list(proto.graph.input), graph, banks, ctx_len=CTX, occupied_slots=2, chunk=4,
                              label="ranges")
    replay = ranges.RangeReplay(calls, {**flat_bank_views(banks), gc.LORA_RANKS: feed_ranks(banks)["lora_module_ranks"]},
                                kv_heads=graph.num_kv_heads, ctx_len=CTX, head_dim=graph.head_dim, slots=SCENARIO_SLOTS)
    for piece in pieces:
        so = ort.SessionOptions()
        if native:
            native_lora.register(so)
        replay.run(ranges.open_range(piece, art, so), piece)
    assert replay.sessions == 4 and len(replay.logits) == len(calls) == run.calls
    whole = _whole_graph_run(art, graph, file, banks, native)
    assert whole.seqs == run.seqs  # the fed tokens: the same calls
    got = ranges.resolve(run.sampled, replay.logits)
    assert sum(len(r) for r in got) == sum(len(r) for r in whole.sampled) > 8
    for mine, theirs in zip(got, whole.sampled, strict=True):
        for (pos, a), (pos2, b) in zip(mine, theirs, strict=True):
            assert pos == pos2
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_the_rows_and_the_first_part_are_known_before_any_graph(four_layers):
    """scenario_rows (the reference started beside the export) are the rows the recording asks for; the first
    part of the scenario (all the second graph replays) makes every kind of call the whole scenario makes."""
    _, art, graph, banks, _ = four_layers
    proto = onnx.load(str(art / graph.file), load_external_data=False)
    run, calls = record_fused(list(proto.graph.input), graph, banks, ctx_len=CTX, occupied_slots=2, chunk=4,
                              label="rows")
    assert scenario_rows(vocab_size=graph.vocab_size, ctx_len=CTX, occupied_slots=2, chunk=4) == reference_rows([run])
    assert scenario_rows(vocab_size=graph.vocab_size, ctx_len=CTX, occupied_slots=2, chunk=3) != reference_rows([run])

    def kind(call):
        rows, tokens = call.inputs[gc.INPUT_IDS].shape  # [B, S]
        return tokens > 1, rows > 1

    first = run.first_part_calls
    assert 0 < first < len(calls) == run.calls
    assert {kind(c) for c in calls[:first]} == {kind(c) for c in calls} == {(True, True), (True, False),
                                                                            (False, True), (False, False)}
    assert any(c.rows > 1 and c.inputs[gc.INPUT_IDS].shape[1] == 1 for c in calls[:first])  # decode with dummies


def _miswired(art, graph, change, files=None) -> None:
    """Rewrite the artifact's graph files (default: both) in place with ``change(proto)`` applied."""
    for file in files or (graph.file, graph.native_file):
        if file:
            proto = onnx.load(str(art / file), load_external_data=False)
            change(proto)
            onnx.save(proto, str(art / file))


def _verify(art, graph, model, banks, modules, range_bytes):
    reference = layerwise_reference(CheckpointWeights.open(model), banks, modules)
    return verify_fused_artifact(art, graph, reference, banks, ctx_len=CTX, occupied_slots=2, chunk=4,
                                 accuracy_level=None, quantized=False, range_bytes=range_bytes)


def _bank_offset_of_layer_0(proto) -> None:
    """Layer 2 gathers its rows' adapters at layer 0's offset in the banks: the offset is i*N with N from the
    banks' shape, so the layer index i = 2 is made 0 (the standard-operator graph's initializer, the native
    graph's LoraRows ``layer`` attribute)."""
    changed = 0
    for t in proto.graph.initializer:
        if t.name == "layers.2.layer_index":
            t.CopyFrom(onnx.numpy_helper.from_array(np.array([0], np.int64), t.name))
            changed += 1
    for node in proto.graph.node:
        if node.op_type == "LoraRows" and node.name.startswith("layers.2/"):
            for attr in node.attribute:
                if attr.name == "layer":
                    attr.i = 0
                    changed += 1
    assert changed, "layer 2 has no bank index to miswire: the change below would alter nothing"


def _o_proj_of_layer_3(proto) -> None:
    """Layer 1's o_proj multiplies by layer 3's weight (a wiring bug across two ranges)."""
    for node in proto.graph.node:
        if node.name == "layers.1/attn/o":
            node.input[1] = "layers.3/attn/o.weight"


@pytest.mark.parametrize("change", [_bank_offset_of_layer_0, _o_proj_of_layer_3])
def test_a_wiring_bug_in_one_range_is_caught(tmp_path, four_layers, change):
    import shutil

    model, art0, graph, banks, modules = four_layers
    art = tmp_path / "art"
    shutil.copytree(art0, art)
    ok, ok_native, stats = _verify(art, graph, model, banks, modules, range_bytes=1)
    assert len(stats.ranges) == 4 and stats.sessions == 4 * (2 if graph.native_file else 1)
    assert ok.relative_diff <= ok.tolerance and ok.tokens_match
    if ok_native is not None:
        assert 0 < ok_native.calls < ok.calls and ok_native.tokens_match and stats.range_diff <= ok.tolerance
    _miswired(art, graph, change)
    with pytest.raises(VerificationFailed, match="differs from the PyTorch reference"):
        _verify(art, graph, model, banks, modules, range_bytes=1)


@pytest.mark.parametrize("change", [_bank_offset_of_layer_0, _o_proj_of_layer_3])
def test_a_wiring_bug_in_the_second_graph_alone_is_caught(tmp_path, four_layers, change):
    """The second graph replays fewer calls: the same bugs in it alone still fail (against the first graph in
    the range where the bug is, before its end-to-end check)."""
    import shutil

    require_native()
    model, art0, graph, banks, modules = four_layers
    if not graph.native_file:
        pytest.skip("the native LoRA kernel is not built here")
    art = tmp_path / "art"
    shutil.copytree(art0, art)
    _miswired(art, graph, change, files=[graph.native_file])
    with pytest.raises(VerificationFailed, match=r"model\.native\.onnx differs from the other graph in layers "):
        _verify(art, graph, model, banks, modules, range_bytes=1)


def _replayed(stream, logits, cache, calls):
    replay = ranges.RangeReplay(calls, {}, kv_heads=1, ctx_len=4, head_dim=2, slots=2,
                                keep_cache_after=len(calls) - 1 if len(calls) > 1 else None)
    replay.stream, replay.logits, replay.cache = stream, logits, cache
    return replay


def test_the_second_graphs_cut_and_cache_are_held_to_the_first():
    """compare_replays: equal streams and caches pass (returning the difference); a stream tensor, a logit or a
    cache entry off by more than the tolerance fails, naming what; a second graph that replayed other calls than
    a prefix of the first's is refused."""
    rng = np.random.default_rng(0)
    calls = [ranges.Call(inputs={gc.INPUT_IDS: np.array([[c]])}, slots=(0, 1), rows=1) for c in range(3)]
    piece = ranges.RangeGraph(layers=(0, 1), model=onnx.ModelProto(), stream_in=(), stream_out=("h/mine",),
                              nodes=frozenset())
    last = ranges.RangeGraph(layers=(1, 2), model=onnx.ModelProto(), stream_in=("h",), stream_out=(), nodes=frozenset())
    stream = [{"h": rng.normal(size=(1, 1, 4)).astype(np.float32)} for _ in calls]
    logits = [rng.normal(size=(1, 1, 8)).astype(np.float32) for _ in calls]
    cache = (rng.normal(size=(1, 2, 1, 4, 2)).astype(np.float32), rng.normal(size=(1, 2, 1, 4, 2)).astype(np.float32))

    def second(stream_=None, logits_=None, cache_=None):
        return _replayed([{"h/mine": s["h"]} for s in stream[:2]] if stream_ is None else stream_,
                         logits[:2] if logits_ is None else logits_, cache if cache_ is None else cache_, calls[:2])

    first = _replayed(stream, logits, cache, calls)
    first.keep_cache_after = 1
    assert ranges.compare_replays(first, second(), piece, tolerance=1e-4, label="g2") == 0.0
    assert ranges.compare_replays(first, second(), last, tolerance=1e-4, label="g2") == 0.0
    off = [{"h/mine": s["h"].copy()} for s in stream[:2]]
    off[1]["h/mine"][0, 0, 2] += 0.01
    with pytest.raises(VerificationFailed, match="g2 differs from the other graph in layers 0..0: h/mine of call 2"):
        ranges.compare_replays(first, second(stream_=off), piece, tolerance=1e-4, label="g2")
    bad_logits = [x.copy() for x in logits[:2]]
    bad_logits[0][0, 0, 5] = np.nan
    with pytest.raises(VerificationFailed, match="the logits of call 1"):
        ranges.compare_replays(first, second(logits_=bad_logits), last, tolerance=1e-4, label="g2")
    bad_v = cache[1].copy()
    bad_v[0, 1, 0, 3, 1] += 0.01
    with pytest.raises(VerificationFailed, match=r"the KV cache \(v\) after call 2"):
        ranges.compare_replays(first, second(cache_=(cache[0], bad_v)), piece, tolerance=1e-4, label="g2")
    first.keep_cache_after = 2  # its cache is not the state after the second graph's last call
    with pytest.raises(InvalidArgument, match="did not replay a prefix"):
        ranges.compare_replays(first, second(), piece, tolerance=1e-4, label="g2")


def test_bad_ranges_and_unsplittable_graphs_are_refused(four_layers):
    _, art, graph, _, _ = four_layers
    proto = onnx.load(str(art / graph.file), load_external_data=False)
    for bad in ([(0, 2), (3, 4)], [(0, 2)], [(1, 4)], [(0, 2), (2, 2), (2, 4)]):
        with pytest.raises(InvalidArgument, match="do not cover"):
            ranges.split_ranges(proto, graph.layers, bad)
    # A prologue node that reads a later layer's output cannot be placed in an earlier range.
    node = next(n for n in proto.graph.node if n.name == "lora_ids/flat")
    node.input[0] = "layers.2/attn/o/out0"
    with pytest.raises(InvalidArgument, match="another range"):
        ranges.split_ranges(proto, graph.layers, [(0, 2), (2, 4)])


# --- memory ----------------------------------------------------------------------------------------------
_VERIFY_PEAK = """
import json, sys
from pathlib import Path
import onnxruntime, torch
from services.compiler.artifact import build_artifact
from services.compiler.fused import ranges
from services.compiler.options import CompileOptions

def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

ranges.RANGE_BYTES = int(sys.argv[3])
Path("/proc/self/clear_refs").write_text("5")  # the peak RSS restarts from the current one (Linux >= 4.0)
before = status("VmRSS")
manifest = build_artifact(Path(sys.argv[1]), [], CompileOptions(dtype="fp32", ctx_len=64, prefill_seq_len=8,
                                                                target_modules=("q_proj", "v_proj")), Path(sys.argv[2]))
print(json.dumps({"before_kib": before, "peak_kib": status("VmHWM"), "verify": manifest.extra["verify"]}))
"""


def _fp32_compile(model, out) -> dict:
    done = subprocess.run([sys.executable, "-c", _VERIFY_PEAK, str(model), str(out), str(32 << 20)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_fp32_verification_holds_a_layer_range_not_the_model(tmp_path):
    """The same layers, 2 and 20 of them, compiled to fp32 and verified in ranges of at most 32 MiB of weights:
    the deeper model's compile peaks hardly higher, though its 18 extra layers are 211 MiB of float32 weights.
    One session over the whole graph (as verification opened before) holds the kernels' pre-packed copy of
    every weight, the extra layers' whole size and more; half of it still catches that."""
    shape = dict(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=2, std=0.02)
    grew, fp32, verify = {}, {}, {}
    for layers in (2, 20):
        model = write_random_checkpoint(tmp_path / f"m{layers}", "llama", num_hidden_layers=layers, **shape)
        fp32[layers] = 4 * sum(int(np.prod(s)) for _, s in hf_tensor_shapes(CheckpointWeights.open(model).cfg))
        got = _fp32_compile(model, tmp_path / f"out{layers}")
        grew[layers], verify[layers] = (got["peak_kib"] - got["before_kib"]) * 1024, got["verify"]
    assert len(verify[20]["layer_ranges"]) >= 5 and verify[20]["sessions"] >= 10
    assert all(v["relative_diff"] <= v["tolerance"] for v in verify.values())
    extra = fp32[20] - fp32[2]
    assert extra > 200 << 20
    assert grew[20] - grew[2] < extra / 2, (f"20 layers grew the peak RSS by {grew[20] / 2**20:.0f} MiB, 2 layers by "
                                            f"{grew[2] / 2**20:.0f} MiB; the extra layers are {extra / 2**20:.0f} MiB")


def test_layer_ranges_hold_at_most_their_budget_and_the_last_counts_the_head(four_layers):
    _, art, graph, _, _ = four_layers
    proto = onnx.load(str(art / graph.file), load_external_data=False)
    sizes = {t.name: ranges._initializer_bytes(t) for t in proto.graph.initializer}
    per_layer = [sum(size for name, size in sizes.items() if name.startswith((f"layers.{i}.", f"layers.{i}/")))
                 for i in range(graph.layers)]
    head = sum(sizes.values()) - sum(per_layer)
    assert head > per_layer[0] > 0  # the tiny model's embedding (and untied head) outweigh a layer
    assert ranges.layer_ranges(proto, graph.layers, max_bytes=10 * sum(sizes.values())) == [(0, 4)]
    two = ranges.layer_ranges(proto, graph.layers, max_bytes=head + 2 * per_layer[0])
    assert two == [(0, 2), (2, 4)]  # the head's bytes and two layers fill the last range
    assert ranges.layer_ranges(proto, graph.layers, max_bytes=head) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(InvalidArgument, match="range_bytes"):
        ranges.layer_ranges(proto, graph.layers, max_bytes=0)
