"""AI 100 target: specializations, custom IO, qaic-exec command, SDK detection, retained-state graph."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from loraflow import graph_contract as gc
from loraflow.errors import FailedPrecondition
from services.compiler import ai100
from services.compiler.export import BankShape
from services.compiler.options import CompileOptions
from services.compiler.verify import VerificationFailed, verify_ai100_graph
from tests.compiler.helpers import decoder_with_adapters


def test_specializations_are_the_continuous_batching_pair(tmp_path):
    opts = CompileOptions(target="ai100", batch_size=1, full_batch_size=4, prefill_seq_len=32, ctx_len=256).resolve()
    specs = ai100.specializations(opts)
    assert specs == [{"batch_size": 1, "seq_len": 32, "ctx_len": 256, "full_batch_size": 4},
                     {"batch_size": 4, "seq_len": 1, "ctx_len": 256, "full_batch_size": 4}]
    path = ai100.write_specializations(tmp_path / "specializations.json", specs)
    assert json.loads(path.read_text()) == {"specializations": [
        {"batch_size": "1", "seq_len": "32", "ctx_len": "256", "full_batch_size": "4"},
        {"batch_size": "4", "seq_len": "1", "ctx_len": "256", "full_batch_size": "4"}]}


def test_custom_io_lists_kv_in_and_retained_out_as_fp16(tmp_path):
    io = ai100.custom_io(2)
    assert io == {"past_key.0": "float16", "past_value.0": "float16", "past_key.1": "float16",
                  "past_value.1": "float16", "past_key.0_RetainedState": "float16",
                  "past_value.0_RetainedState": "float16", "past_key.1_RetainedState": "float16",
                  "past_value.1_RetainedState": "float16"}
    text = ai100.write_custom_io(tmp_path / "custom_io.yaml", io).read_text()
    assert text.startswith(" - IOName: past_key.0\n   Precision: float16\n\n")
    assert text.count("IOName") == 8


def test_qaic_exec_command_assembly(tmp_path):
    cmd = ai100.qaic_exec_command(qaic_exec="/opt/qti-aic/exec/qaic-exec", onnx_path=tmp_path / "model.onnx",
                                  specializations_path=tmp_path / "s.json", custom_io_path=tmp_path / "io.yaml",
                                  qpc_dir=tmp_path / "qpc", num_cores=14, mxfp6_matmul=True)
    assert cmd[0] == "/opt/qti-aic/exec/qaic-exec"
    for flag in ("-aic-hw", "-retained-state", "-convert-to-fp16", "-mxfp6-matmul", "-aic-num-cores=14",
                 f"-m={tmp_path / 'model.onnx'}", f"-network-specialization-config={tmp_path / 's.json'}",
                 f"-custom-IO-list-file={tmp_path / 'io.yaml'}", f"-aic-binary-dir={tmp_path / 'qpc'}"):
        assert flag in cmd
    plain = ai100.qaic_exec_command(qaic_exec="q", onnx_path=tmp_path / "m", specializations_path=tmp_path / "s",
                                    custom_io_path=tmp_path / "c", qpc_dir=tmp_path / "q", num_cores=16,
                                    mxfp6_matmul=False)
    assert "-mxfp6-matmul" not in plain


def test_sdk_detection_and_missing_sdk_is_failed_precondition(monkeypatch, tmp_path, tiny_llama):
    from services.compiler.artifact import plan_artifact

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(ai100, "SDK_EXEC_DIR", tmp_path / "nowhere")
    assert not ai100.sdk_available()
    with pytest.raises(FailedPrecondition, match="qaic-exec") as err:
        plan_artifact(tiny_llama, [], CompileOptions(target="ai100"))
    assert err.value.field == "options.target"
    fake = tmp_path / "qaic-exec"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    assert ai100.sdk_available() and ai100.find_qaic_exec() == fake


def test_retained_state_graph_matches_the_reference_decoder(tmp_path, tiny_llama, tiny_model_factory,
                                                              adapter_factory):
    adapters = [("a", adapter_factory("llama", "attn4", r=4, lora_alpha=8,
                                      target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), seed=1))]
    decoder, banks, _ = decoder_with_adapters(tiny_llama, adapters, ("q_proj", "k_proj", "v_proj", "o_proj"),
                                              slots=2)
    graph = ai100.export_ai100(decoder, tmp_path, banks=BankShape(2, 8), ctx_len=16)
    assert [o.name for o in graph.outputs][1:3] == [gc.retained_key(0), gc.retained_value(0)]
    sess = ort.InferenceSession(str(tmp_path / graph.file), providers=["CPUExecutionProvider"])
    report = verify_ai100_graph(sess, decoder, graph, banks, occupied_slots=1, prefill_len=5, decode_steps=2)
    assert report.calls == 3 and report.max_abs_diff < 1e-4
    # The same check fails, with the measured difference, against a decoder with other weights.
    other, _, _ = decoder_with_adapters(tiny_model_factory("llama", seed=1), adapters,
                                        ("q_proj", "k_proj", "v_proj", "o_proj"), slots=2)
    with pytest.raises(VerificationFailed, match="max abs diff") as err:
        verify_ai100_graph(sess, other, graph, banks, occupied_slots=1, prefill_len=5)
    assert err.value.max_abs_diff > 1e-3
    # A decode step writes only its row's slot at its position; an unused slot stays zero.
    L, H, D = graph.layers, graph.num_kv_heads, graph.head_dim
    feeds = {gc.INPUT_IDS: np.array([[7], [8]]), gc.POSITION_IDS: np.array([[3], [-1]]),
             gc.LORA_IDS: np.array([[1], [0]]), gc.BATCH_INDEX: np.array([[2], [0]]), **banks}
    for i in range(L):
        feeds[gc.past_key(i)] = np.zeros((3, H, 6, D), np.float32)
        feeds[gc.past_value(i)] = np.zeros((3, H, 6, D), np.float32)
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
    retained = outs[gc.retained_key(0)]
    assert retained[2, :, 3].any() and not np.delete(retained[2], 3, axis=1).any()
    assert not retained[0].any() and not retained[1].any()  # padding row (-1) wrote nothing


def test_build_artifact_for_ai100_runs_qaic_exec_with_the_written_files(monkeypatch, tmp_path, tiny_llama,
                                                                        adapter_factory):
    """The SDK cannot exist here, so a stand-in qaic-exec records its argv and makes the binary dir;
    everything before it (export, ORT verification of the retained-state graph) is real."""
    from services.compiler.artifact import build_artifact

    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "qaic-exec"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$(dirname "$0")/argv.txt"\n'
                    'for a in "$@"; do case "$a" in -aic-binary-dir=*) mkdir -p "${a#-aic-binary-dir=}";; '
                    'esac; done\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{__import__('os').environ['PATH']}")
    adapters = [("a", adapter_factory("llama", "attn4", r=4, lora_alpha=8,
                                      target_modules=("q_proj", "k_proj", "v_proj", "o_proj"), seed=1))]
    out = tmp_path / "art"
    opts = CompileOptions(target="ai100", full_batch_size=4, prefill_seq_len=8, ctx_len=64, num_cores=8,
                          mxfp6_matmul=True)
    manifest = build_artifact(tiny_llama, adapters, opts, out)
    argv = (bindir / "argv.txt").read_text().split("\n")
    assert f"-m={out / 'model.onnx'}" in argv and "-aic-num-cores=8" in argv and "-mxfp6-matmul" in argv
    assert f"-network-specialization-config={out / 'specializations.json'}" in argv
    assert manifest.graph.target == "ai100" and manifest.extra["verify"]["max_abs_diff"] < 1e-4
    assert manifest.specializations[1] == {"batch_size": 4, "seq_len": 1, "ctx_len": 64, "full_batch_size": 4}
    assert {"specializations.json", "custom_io.yaml", "model.onnx"} <= {f.path for f in manifest.files}
    assert (out / "qpc").is_dir() and manifest.extra["qpc_dir"] == "qpc"
