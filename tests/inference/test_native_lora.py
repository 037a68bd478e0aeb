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
from loraflow.errors import FailedPrecondition
from services.inference.model_manager import open_model
from tests.inference.conftest import PROMPTS
from tests.support.native import require_native


def _one_node(bank_offset: int, column_offset: int, spinning: bool = False) -> ort.InferenceSession:
    node = helper.make_node("LoraRows", ["y", "x", "ids", "a", "b"], ["out"], domain=native_lora.DOMAIN,
                            bank_offset=bank_offset, column_offset=column_offset)
    graph = helper.make_graph([node], "one", [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", "Y"]),
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", "K"]),
        helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", 1]),
        helper.make_tensor_value_info("a", TensorProto.FLOAT, ["M", "K", "R"]),
        helper.make_tensor_value_info("b", TensorProto.FLOAT, ["M", "R", "O"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", "S", "Y"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(native_lora.DOMAIN, native_lora.OPSET)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    native_lora.register(so)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


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
        tiny_artifact, tiny_tokenizer, peft_reference, monkeypatch):
    require_native()
    from services.inference.engine import GenerationRequest
    from services.inference.sampling import SamplingParams

    artifact_dir, manifest = tiny_artifact
    graph = manifest.graph
    assert graph.native_file and (artifact_dir / graph.native_file).is_file()
    verify = json.loads((artifact_dir / "manifest.json").read_text())["extra"]["verify"]
    assert verify["native"]["tokens_match"] and verify["native"]["relative_diff"] <= verify["tolerance"]
    rows = [(PROMPTS[0], ""), (PROMPTS[1], "alpha"), (PROMPTS[2], "beta"), (PROMPTS[3], "gamma")]
    ids = [tiny_tokenizer.encode(p) for p, _ in rows]
    for kernel in ("native", "onnx"):
        if kernel == "onnx":
            monkeypatch.setenv(native_lora.DISABLE_ENV, "1")
        model = open_model(artifact_dir, num_threads=1, model_id=f"tiny-{kernel}", manifest=manifest)
        try:
            assert model.runtime.lora_kernel == kernel
            handles = [model.engine.submit(GenerationRequest(tuple(i), adapter, SamplingParams(max_new_tokens=10)))
                       for i, (_, adapter) in zip(ids, rows, strict=True)]
            for prompt_ids, (_, adapter), handle in zip(ids, rows, handles, strict=True):
                assert list(handle.result().token_ids) == peft_reference.generate(prompt_ids, adapter, 10), \
                    (kernel, adapter)
        finally:
            model.close()
