"""loraflow/native's LoraRows kernel: one node against numpy, and a compiled artifact served through it.

Skipped where the library is not built (no C++ compiler); CI sets LORAFLOW_REQUIRE_NATIVE=1, so there a
missing library fails instead.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from loraflow import native as native_lora
from loraflow.artifact import graph_contract as gc
from loraflow.errors import FailedPrecondition
from services.inference.model_manager import open_model
from tests.inference.conftest import ADAPTERS, PROMPTS
from tests.support.native import native_session, require_native


def _one_node(bank_offset: int | None, column_offset: int, spinning: bool = False,
              ranks: bool = False, layer: tuple[int, int] | None = None,
              rank_column: int | None = None) -> ort.InferenceSession:
    """One LoraRows node; ``ranks``: with the optional sixth input ``ranks`` [N] (else five inputs, as
    graphs compiled before it have), [N, P] with ``rank_column`` (graph8); ``layer``: (layer, num_layers)
    attributes (graph6) instead of ``bank_offset`` (graphs compiled before them)."""
    names = ["y", "x", "ids", "a", "b"] + (["ranks"] if ranks else [])
    where = {"bank_offset": bank_offset} if layer is None else {"layer": layer[0], "num_layers": layer[1]}
    if rank_column is not None:
        where["rank_column"] = rank_column
    node = helper.make_node("LoraRows", names, ["out"], domain=native_lora.DOMAIN, column_offset=column_offset,
                            **where)
    inputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", "Y"]),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", "K"]),
              helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", 1]),
              helper.make_tensor_value_info("a", TensorProto.FLOAT, ["M", "K", "R"]),
              helper.make_tensor_value_info("b", TensorProto.FLOAT, ["M", "R", "O"])]
    if ranks:
        inputs.append(helper.make_tensor_value_info("ranks", TensorProto.INT64,
                                                    ["N"] if rank_column is None else ["N", "P"]))
    graph = helper.make_graph([node], "one", inputs,
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", "S", "Y"])])
    return native_session(graph, spinning)


def _reference(y, x, ids, a, b, bank_offset, column_offset):
    out = y.copy()
    width = b.shape[2]
    for row, slot in enumerate(ids[:, 0]):
        if slot:
            out[row, :, column_offset:column_offset + width] += x[row] @ a[bank_offset + slot] @ b[bank_offset + slot]
    return out


# Ranks with a compiled fast path (8, 16) and without (12); a decode step (S=1) and prefill chunks
# (S=3, not a multiple of the 4-token tile; S=32, split over threads when spinning).
@pytest.mark.parametrize("rank", [8, 12, 16])
@pytest.mark.parametrize("seq", [1, 3, 32])
@pytest.mark.parametrize("spinning", [False, True])
def test_lora_rows_adds_each_rows_delta_in_its_columns(rank, seq, spinning):
    require_native()
    rng = np.random.default_rng(rank * 100 + seq)
    B, K, width, Y, slots, layer = 5, 24, 10, 30, 4, 2
    M = 3 * slots  # three layers of banks
    y = rng.normal(size=(B, seq, Y)).astype(np.float32)
    x = rng.normal(size=(B, seq, K)).astype(np.float32)
    a = rng.normal(size=(M, K, rank)).astype(np.float32)
    b = rng.normal(size=(M, rank, width)).astype(np.float32)
    a[:, :, rank - 2:] = 0  # a lower-rank adapter padded to the bank's rank
    ids = np.array([[0], [3], [1], [3], [2]], np.int64)  # base row, a shared slot, ...
    session = _one_node(bank_offset=layer * slots, column_offset=14, spinning=spinning)
    (out,) = session.run(None, {"y": y, "x": x, "ids": ids, "a": a, "b": b})
    want = _reference(y, x, ids, a, b, layer * slots, 14)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(out[0], y[0])  # the base-model row is untouched
    np.testing.assert_array_equal(out[:, :, :14], y[:, :, :14])  # columns outside the delta too


# Slot ranks: 0 (an empty slot), 4 and 8 (compiled widths), 3 (the 4-wide loop, its 4th lane zeroed), R (all
# columns; 12 has no compiled width: the runtime loop).
@pytest.mark.parametrize("max_rank", [12, 16, 64])
@pytest.mark.parametrize("seq", [1, 5])
@pytest.mark.parametrize("spinning", [False, True])
def test_lora_rows_with_ranks_equals_without_on_padded_banks_and_ignores_columns_past_each_rank(
        max_rank, seq, spinning):
    require_native()
    rng = np.random.default_rng(max_rank + seq)
    B, K, width, Y, slots, layer = 7, 40, 12, 20, 6, 1
    M = 2 * slots
    slot_ranks = np.array([0, 4, 8, 3, max_rank, 0], np.int64)  # [N]: slot 0 (base) and slot 5 empty
    y = rng.normal(size=(B, seq, Y)).astype(np.float32)
    x = rng.normal(size=(B, seq, K)).astype(np.float32)
    a = rng.normal(size=(M, K, max_rank)).astype(np.float32)
    b = rng.normal(size=(M, max_rank, width)).astype(np.float32)
    for slot, r in enumerate(slot_ranks):  # each adapter zero-padded past its rank, in every layer
        a[slot::slots, :, r:] = 0
        b[slot::slots, r:, :] = 0
    ids = np.array([[0], [1], [2], [3], [4], [5], [2]], np.int64)  # [B, 1]
    feeds = {"y": y, "x": x, "ids": ids, "a": a, "b": b}
    offset = layer * slots
    (without,) = _one_node(offset, 6, spinning).run(None, feeds)
    with_ranks_session = _one_node(offset, 6, spinning, ranks=True)
    (with_ranks,) = with_ranks_session.run(None, {**feeds, "ranks": slot_ranks})
    np.testing.assert_allclose(without, _reference(y, x, ids, a, b, offset, 6), rtol=1e-5, atol=1e-4)
    # Padding adds exact zeros, so only rounding differs: each width is its own compiled loop (the compiler
    # contracts multiply-adds differently in each), measured up to ~4e-7 of the magnitude.
    scale = max(1.0, float(np.abs(without).max()))
    assert np.abs(with_ranks - without).max() <= 1e-6 * scale, np.abs(with_ranks - without).max(axis=(1, 2))
    np.testing.assert_array_equal(with_ranks[[0, 5]], y[[0, 5]])  # base and rank-0 rows are untouched

    # Garbage past each slot's rank: with ranks it is never read, without it is.
    garbage_a, garbage_b = a.copy(), b.copy()
    for slot, r in enumerate(slot_ranks):
        garbage_a[slot::slots, :, r:] = 1e3
        garbage_b[slot::slots, r:, :] = -1e3
    garbage = {**feeds, "a": garbage_a, "b": garbage_b}
    (ranked_garbage,) = with_ranks_session.run(None, {**garbage, "ranks": slot_ranks})
    np.testing.assert_array_equal(ranked_garbage, with_ranks)  # the same loops over the same numbers
    (unranked_garbage,) = _one_node(offset, 6, spinning).run(None, garbage)
    changed = np.abs(unranked_garbage - with_ranks).max(axis=(1, 2))  # [B]
    assert (changed[[1, 2, 3, 5, 6]] > 1.0).all(), changed  # every row of rank < R reads the garbage
    assert changed[0] == 0 and changed[4] == 0, changed  # the base row, and the full-rank slot has no padding


@pytest.mark.parametrize("seq", [1, 5])
@pytest.mark.parametrize("spinning", [False, True])
def test_lora_rows_with_module_ranks_reads_its_own_column_and_skips_modules_an_adapter_does_not_touch(
        seq, spinning):
    """graph8: lora_ranks [N, P] holds a rank per (slot, module); a node reads column rank_column. A slot whose
    rank in this node's column is 0 adds nothing even where its bank slice holds numbers (another module's
    adapter may have left them; the rank, not the bank, says what is served), and the other columns are not read."""
    require_native()
    rng = np.random.default_rng(seq + 7 * spinning)
    B, K, width, Y, slots, layer, R = 5, 24, 10, 16, 4, 1, 8
    M = 2 * slots
    y = rng.normal(size=(B, seq, Y)).astype(np.float32)
    x = rng.normal(size=(B, seq, K)).astype(np.float32)
    a = rng.normal(size=(M, K, R)).astype(np.float32)
    b = rng.normal(size=(M, R, width)).astype(np.float32)
    # [N, P=3]: this node is column 1. Slot 1 touches it at rank 4, slot 2 not at all (rank 0 here, 8 in the
    # other columns), slot 3 at the full rank 8.
    module_ranks = np.array([[0, 0, 0], [8, 4, 0], [8, 0, 8], [2, 8, 2]], np.int64)  # [N, P]
    ids = np.array([[0], [1], [2], [3], [2]], np.int64)  # [B, 1]
    feeds = {"y": y, "x": x, "ids": ids, "a": a, "b": b, "ranks": module_ranks}
    session = _one_node(None, 4, spinning, ranks=True, layer=(layer, 2), rank_column=1)
    (out,) = session.run(None, feeds)
    # The reference: each slot's banks cut to this column's rank (rank 0: the base model's zeros).
    cut_a, cut_b = a.copy(), b.copy()
    for slot, r in enumerate(module_ranks[:, 1]):
        cut_a[slot::slots, :, r:] = 0
        cut_b[slot::slots, r:, :] = 0
    np.testing.assert_allclose(out, _reference(y, x, ids, cut_a, cut_b, layer * slots, 4), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(out[[0, 2, 4]], y[[0, 2, 4]])  # base and untouched-module rows: y itself
    assert np.abs(out[1] - y[1]).max() > 0.1 and np.abs(out[3] - y[3]).max() > 0.1
    # The same numbers fed as a per-slot [N] of this column (graph5-7's input) give the same result.
    (per_slot,) = _one_node(None, 4, spinning, ranks=True, layer=(layer, 2)).run(
        None, {**feeds, "ranks": np.ascontiguousarray(module_ranks[:, 1])})
    np.testing.assert_array_equal(out, per_slot)


@pytest.mark.parametrize("rank", [4, 16, 32, 64])
@pytest.mark.parametrize("spinning", [False, True])
def test_a_rows_delta_is_the_same_bits_alone_or_sharing_its_slot_with_other_rows(rank, spinning):
    """Rows of one slot in a decode step are computed together (each row of A and B read once for up to four of
    them); each row's sums still run in one order, so its output does not depend on its neighbours."""
    require_native()
    rng = np.random.default_rng(rank)
    B, K, width, Y, slots = 7, 40, 20, 24, 3
    y = rng.normal(size=(B, 1, Y)).astype(np.float32)
    x = rng.normal(size=(B, 1, K)).astype(np.float32)
    a = rng.normal(size=(slots, K, rank)).astype(np.float32)
    b = rng.normal(size=(slots, rank, width)).astype(np.float32)
    a[0], b[0] = 0, 0
    ids = np.array([[1], [1], [2], [1], [1], [1], [1]], np.int64)  # six rows of slot 1: a group of four and two
    session = _one_node(0, 2, spinning)
    (together,) = session.run(None, {"y": y, "x": x, "ids": ids, "a": a, "b": b})
    for row in range(B):
        (alone,) = session.run(None, {"y": y[row:row + 1], "x": x[row:row + 1], "ids": ids[row:row + 1], "a": a,
                                      "b": b})
        np.testing.assert_array_equal(together[row], alone[0])
    np.testing.assert_allclose(together, _reference(y, x, ids, a, b, 0, 2), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("seq", [1, 6])
def test_chained_lora_rows_over_an_intermediate_y_equal_the_reference(seq):
    """As q|k|v packed: y = x @ W (an intermediate ONNX Runtime may hand to the node as its output buffer), then
    two LoraRows nodes adding deltas in their own columns; a base row passes through both untouched."""
    require_native()
    rng = np.random.default_rng(seq)
    B, K, Y, slots = 4, 12, 20, 3
    x = rng.normal(size=(B, seq, K)).astype(np.float32)
    w = rng.normal(size=(K, Y)).astype(np.float32)
    banks = {name: rng.normal(size=shape).astype(np.float32) for name, shape in
             (("a1", (slots, K, 4)), ("b1", (slots, 4, 8)), ("a2", (slots, K, 4)), ("b2", (slots, 4, 12)))}
    for bank in banks.values():
        bank[0] = 0  # slot 0: the base model
    ids = np.array([[1], [0], [2], [1]], np.int64)  # [B, 1]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]),
             helper.make_node("LoraRows", ["y", "x", "ids", "a1", "b1"], ["y1"], domain=native_lora.DOMAIN,
                              bank_offset=0, column_offset=0),
             helper.make_node("LoraRows", ["y1", "x", "ids", "a2", "b2"], ["out"], domain=native_lora.DOMAIN,
                              bank_offset=0, column_offset=8)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", K]),
              helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", 1])]
    inputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(bank.shape)) for name, bank in banks.items()]
    graph = helper.make_graph(nodes, "chain", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT,
                                                                                      ["B", "S", Y])],
                              initializer=[helper.make_tensor("w", TensorProto.FLOAT, [K, Y], w.ravel())])
    (out,) = native_session(graph, False).run(None, {"x": x, "ids": ids, **banks})
    y = x @ w  # [B, S, Y]
    want = _reference(_reference(y, x, ids, banks["a1"], banks["b1"], 0, 0), x, ids, banks["a2"], banks["b2"], 0, 8)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out[1], y[1], rtol=1e-6, atol=1e-6)  # the base row: x @ W only


def test_lora_rows_passes_ys_shape_on_to_the_graph_so_a_chain_keeps_its_symbolic_dimensions():
    """MatMul -> LoraRows -> LoraRows -> SwiGlu over symbolic B and S, the outputs declared without shapes:
    shape inference carries y's [B, S, Y] (named symbols, not fixed -1s) through every node. ONNX Runtime lets
    LoraRows write into y's buffer only where it knows the two shapes are equal, and every node behind an
    output of unknown shape loses its shape too."""
    require_native()
    K, Y = 12, 20
    w = np.ones((K, Y), np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]),
             helper.make_node("LoraRows", ["y", "x", "ids", "a", "b"], ["y1"], domain=native_lora.DOMAIN,
                              bank_offset=0, column_offset=0),
             helper.make_node("LoraRows", ["y1", "x", "ids", "a", "b"], ["y2"], domain=native_lora.DOMAIN,
                              bank_offset=0, column_offset=8),
             helper.make_node("SwiGlu", ["y2"], ["act"], domain=native_lora.DOMAIN)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", K]),
              helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", 1]),
              helper.make_tensor_value_info("a", TensorProto.FLOAT, ["M", K, 4]),
              helper.make_tensor_value_info("b", TensorProto.FLOAT, ["M", 4, 8])]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("y1", "act")]
    graph = helper.make_graph(nodes, "shapes", inputs, outputs,
                              initializer=[helper.make_tensor("w", TensorProto.FLOAT, [K, Y], w.ravel())])
    session = native_session(graph, False)
    assert [o.shape for o in session.get_outputs()] == [["B", "S", Y], ["B", "S", Y // 2]]


def test_lora_rows_refuses_module_ranks_without_a_column_or_with_a_column_outside_them():
    require_native()
    rng = np.random.default_rng(2)
    feeds = {"y": rng.normal(size=(2, 1, 8)).astype(np.float32), "x": rng.normal(size=(2, 1, 4)).astype(np.float32),
             "ids": np.array([[0], [1]], np.int64), "a": rng.normal(size=(2, 4, 2)).astype(np.float32),
             "b": rng.normal(size=(2, 2, 8)).astype(np.float32), "ranks": np.zeros((2, 3), np.int64)}
    with pytest.raises(Exception, match=r"lora_ranks \[2, 3\] is per module but this node's rank_column is 3"):
        _one_node(0, 0, ranks=True, rank_column=3).run(None, feeds)
    # A node without rank_column (graph5-7) fed a per-module [N, P]: refused, not read as [N].
    graph_without = helper.make_graph(
        [helper.make_node("LoraRows", ["y", "x", "ids", "a", "b", "ranks"], ["out"], domain=native_lora.DOMAIN,
                          bank_offset=0, column_offset=0)], "one",
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", "Y"]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", "K"]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", 1]),
         helper.make_tensor_value_info("a", TensorProto.FLOAT, ["M", "K", "R"]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["M", "R", "O"]),
         helper.make_tensor_value_info("ranks", TensorProto.INT64, ["N", "P"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", "S", "Y"])])
    with pytest.raises(Exception, match=r"lora_ranks \[2, 3\] is per module but this node's rank_column is not set"):
        native_session(graph_without, False).run(None, feeds)
    with pytest.raises(Exception, match=r"lora_ranks: slot 1 has rank 5, outside 0\.\.2"):
        _one_node(0, 0, ranks=True, rank_column=2).run(
            None, {**feeds, "ranks": np.array([[0, 0, 0], [0, 0, 5]], np.int64)})


@pytest.mark.parametrize("slots", [2, 5, 13])
@pytest.mark.parametrize("seq", [1, 6])
def test_lora_rows_with_layer_attributes_finds_the_layers_rows_from_the_banks_slot_count(slots, seq):
    """One node (layer 2 of 3) serves banks of any slot count N = M / 3: the same rows bank_offset = 2 * N
    reads, for every N; a slot id >= N (another layer's row) is refused."""
    require_native()
    rng = np.random.default_rng(slots * 10 + seq)
    B, K, width, Y, layers, layer = 4, 16, 6, 9, 3, 2
    session = _one_node(None, 3, ranks=True, layer=(layer, layers))
    M = layers * slots
    y = rng.normal(size=(B, seq, Y)).astype(np.float32)
    x = rng.normal(size=(B, seq, K)).astype(np.float32)
    a = rng.normal(size=(M, K, 4)).astype(np.float32)
    b = rng.normal(size=(M, 4, width)).astype(np.float32)
    ids = np.array([[0], [slots - 1], [1], [slots - 1]], np.int64)  # [B, 1]
    ranks = np.full(slots, 4, np.int64)  # [N]
    ranks[0] = 0
    feeds = {"y": y, "x": x, "ids": ids, "a": a, "b": b, "ranks": ranks}
    (out,) = session.run(None, feeds)
    want = _reference(y, x, ids, a, b, layer * slots, 3)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-4)
    (fixed,) = _one_node(layer * slots, 3, ranks=True).run(None, feeds)  # the old attribute, same rows
    np.testing.assert_array_equal(out, fixed)
    with pytest.raises(Exception, match=rf"lora_ids: row 1 has slot {slots}, outside 0\.\.{slots - 1}"):
        session.run(None, {**feeds, "ids": np.array([[0], [slots], [0], [0]], np.int64),
                           "ranks": np.zeros(slots + 1, np.int64)})


def test_lora_rows_refuses_banks_that_are_not_whole_layers():
    require_native()
    session = _one_node(None, 0, layer=(0, 3))
    rng = np.random.default_rng(3)
    feeds = {"y": rng.normal(size=(1, 1, 4)).astype(np.float32), "x": rng.normal(size=(1, 1, 4)).astype(np.float32),
             "ids": np.array([[1]], np.int64), "a": rng.normal(size=(7, 4, 2)).astype(np.float32),
             "b": rng.normal(size=(7, 2, 4)).astype(np.float32)}
    with pytest.raises(Exception, match=r"a_bank \[7, 4, 2\] is not num_layers=3 layers of equal slots"):
        session.run(None, feeds)


def test_lora_rows_refuses_ranks_that_do_not_cover_a_slot_or_exceed_the_bank():
    require_native()
    rng = np.random.default_rng(1)
    feeds = {"y": rng.normal(size=(2, 1, 8)).astype(np.float32), "x": rng.normal(size=(2, 1, 4)).astype(np.float32),
             "ids": np.array([[0], [2]], np.int64), "a": rng.normal(size=(3, 4, 2)).astype(np.float32),
             "b": rng.normal(size=(3, 2, 8)).astype(np.float32)}
    session = _one_node(bank_offset=0, column_offset=0, ranks=True)
    with pytest.raises(Exception, match=r"lora_ranks: row 1 has slot 2 but lora_ranks \[2\] covers slots 0\.\.1"):
        session.run(None, {**feeds, "ranks": np.array([0, 2], np.int64)})
    with pytest.raises(Exception, match=r"lora_ranks: slot 2 has rank 3, outside 0\.\.2"):
        session.run(None, {**feeds, "ranks": np.array([0, 2, 3], np.int64)})


def test_lora_rows_refuses_a_slot_outside_the_bank_and_columns_that_do_not_fit():
    require_native()
    rng = np.random.default_rng(0)
    y = rng.normal(size=(2, 1, 8)).astype(np.float32)
    x = rng.normal(size=(2, 1, 4)).astype(np.float32)
    a = rng.normal(size=(3, 4, 2)).astype(np.float32)
    b = rng.normal(size=(3, 2, 8)).astype(np.float32)
    session = _one_node(bank_offset=1, column_offset=0)
    with pytest.raises(Exception, match=r"lora_ids: row 1 has slot 2, bank row 3 is outside 0\.\.2"):
        session.run(None, {"y": y, "x": x, "ids": np.array([[0], [2]], np.int64), "a": a, "b": b})
    with pytest.raises(Exception, match=r"column_offset 4 \+ 8 columns do not fit y's 8"):
        _one_node(bank_offset=0, column_offset=4).run(
            None, {"y": y, "x": x, "ids": np.array([[0], [1]], np.int64), "a": a, "b": b})


def test_register_without_the_library_names_the_command(monkeypatch):
    monkeypatch.setenv(native_lora.DISABLE_ENV, "1")
    assert native_lora.library_path() is None
    with pytest.raises(FailedPrecondition) as info:
        native_lora.register(ort.SessionOptions())
    assert "make native" in str(info.value) and info.value.field == "lora_kernel"


def test_the_artifact_holds_both_graphs_verified_and_serves_peft_tokens_through_either(
        tiny_artifact, tiny_tokenizer, tiny_adapters, peft_reference, monkeypatch):
    require_native()
    from services.inference.engine import GenerationRequest
    from services.inference.sampling import SamplingParams

    artifact_dir, manifest = tiny_artifact
    graph = manifest.graph
    assert graph.native_file and (artifact_dir / graph.native_file).is_file()
    verify = json.loads((artifact_dir / "manifest.json").read_text())["extra"]["verify"]
    assert verify["native"]["tokens_match"] and verify["native"]["relative_diff"] <= verify["tolerance"]
    # graph8: a rank per slot and adapted module (bank order), P = the artifact's adapted modules.
    assert [(t.name, t.dtype, t.shape) for t in graph.native_inputs] == [
        (gc.LORA_RANKS, "int64", (gc.SLOTS_DIM, len(graph.lora_modules)))]
    modules = list(graph.lora_modules)

    def module_ranks(name: str) -> list[int]:  # what a slot holding ``name`` uses in each bank module
        _, r, _, targets, _ = ADAPTERS[name]
        return [r if m in targets else 0 for m in modules]

    rows = [(PROMPTS[0], ""), (PROMPTS[1], "alpha"), (PROMPTS[2], "beta"), (PROMPTS[3], "gamma")]
    for kernel in ("native", "onnx"):
        if kernel == "onnx":
            monkeypatch.setenv(native_lora.DISABLE_ENV, "1")
        model = open_model(artifact_dir, num_threads=1, model_id=f"tiny-{kernel}", manifest=manifest)
        try:
            assert model.runtime.lora_kernel == kernel
            # Only the native graph takes each slot's rank; model.onnx's contract is unchanged.
            assert (gc.LORA_RANKS in {i.name for i in model.runtime.session.get_inputs()}) == (kernel == "native")
            # alpha r=4, beta r=8, gamma r=2 (the 4-wide loop) in a max_rank-8 bank; slot 4 empty.
            assert model.runtime.adapters.ranks.tolist() == [0, 4, 8, 2, 0]
            # Per module: alpha only q/v, gamma only k/o/down; the other modules cost their rows nothing.
            assert model.runtime.adapters.module_ranks.tolist() == [
                [0] * len(modules), module_ranks("alpha"), module_ranks("beta"), module_ranks("gamma"),
                [0] * len(modules)]
            if kernel == "native":  # a hot-added adapter's ranks (6, q/up/down) serve at once through the bound input
                slot = model.runtime.load_adapter("hot", tiny_adapters["hot"])
                assert model.runtime.adapters.ranks[slot] == 6
                assert model.runtime.adapters.module_ranks[slot].tolist() == module_ranks("hot")
                rows_now = rows + [(PROMPTS[0], "hot")]
            else:
                rows_now = rows
            ids_now = [tiny_tokenizer.encode(p) for p, _ in rows_now]
            handles = [model.engine.submit(GenerationRequest(tuple(i), adapter, SamplingParams(max_new_tokens=10)))
                       for i, (_, adapter) in zip(ids_now, rows_now, strict=True)]
            for prompt_ids, (_, adapter), handle in zip(ids_now, rows_now, handles, strict=True):
                assert list(handle.result().token_ids) == peft_reference.generate(prompt_ids, adapter, 10), \
                    (kernel, adapter)
        finally:
            model.close()


def test_the_step_driver_refuses_a_graph_with_lora_ranks_without_the_ranks(tiny_artifact):
    require_native()
    from loraflow.artifact.kv_cache import SharedKvCache
    from loraflow.artifact.session import session_options
    from loraflow.artifact.step_driver import FusedStepDriver
    from loraflow.errors import InvalidArgument

    artifact_dir, manifest = tiny_artifact
    graph = manifest.graph
    so = session_options(ort, num_threads=1)
    native_lora.register(so)
    session = ort.InferenceSession(str(artifact_dir / graph.native_file), so, providers=["CPUExecutionProvider"])
    cache = SharedKvCache(layers=graph.layers, slots=2, kv_heads=graph.num_kv_heads, ctx_len=16,
                          head_dim=graph.head_dim)
    with pytest.raises(InvalidArgument) as info:
        FusedStepDriver(session, cache, {}, vocab_size=graph.vocab_size)
    assert info.value.field == gc.LORA_RANKS
    P = len(graph.lora_modules)
    with pytest.raises(InvalidArgument, match=rf"lora_ranks must be a contiguous int64 array of shape \['N', {P}\]"):
        FusedStepDriver(session, cache, {}, vocab_size=graph.vocab_size, lora_module_ranks=np.zeros((5, P), np.int32))
    with pytest.raises(InvalidArgument, match=rf"shape \['N', {P}\], got int64 \[5, {P + 1}\]"):
        FusedStepDriver(session, cache, {}, vocab_size=graph.vocab_size,
                        lora_module_ranks=np.zeros((5, P + 1), np.int64))
    with pytest.raises(InvalidArgument, match=r"bank_module_ranks"):  # a graph8 graph fed graph7's [N] only
        FusedStepDriver(session, cache, {}, vocab_size=graph.vocab_size, lora_ranks=np.zeros(5, np.int64))
