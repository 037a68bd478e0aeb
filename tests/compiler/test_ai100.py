"""AI 100 target: the com.qualcomm.cloud graph, the bundle and qaic-exec command, export without the SDK,
ORT-driven verification (fp32 and fp16) against the PyTorch decoder, and a broken graph that must fail."""

from __future__ import annotations

import json
import shlex

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from loraflow.artifact import graph_contract as gc
from loraflow.errors import FailedPrecondition, InvalidArgument
from services.compiler import ai100, ai100_verify, ai100_writer
from services.compiler.modeling import CheckpointWeights
from services.compiler.options import CompileOptions
from services.compiler.verify import VerificationFailed, decoder_reference
from tests.compiler.ai100_reference import Ai100Graph
from tests.compiler.helpers import decoder_with_adapters

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL = (*ATTN, "gate_proj", "up_proj", "down_proj")


def _no_sdk(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(ai100, "SDK_EXEC_DIR", tmp_path / "nowhere")
    assert not ai100.sdk_available()


def _export(model_dir, decoder, out_dir, *, slots: int, cb: bool = True, dtype: str = "fp32"):
    """The bundle graph written from the checkpoint (the decoder only says which modules are adapted)."""
    return ai100_writer.export_ai100(CheckpointWeights.open(model_dir), out_dir, lora_modules=decoder.lora_modules,
                                     num_slots=slots + 1, max_rank=8, cb=cb, dtype=dtype).graph


def _greedy_serve(session, layout, num_layers: int, vocab_size: int, banks, prompts, lora_ids, max_new
                  ) -> list[list[int]]:
    """Greedy-serve ``prompts`` on a whole-bundle session through the inference scheduler and AI 100 stepper."""
    from loraflow.artifact.ai100_stepper import Ai100Stepper
    from loraflow.artifact.scheduler import Scheduler
    from loraflow.artifact.scheduler import Sequence as Request

    stepper = Ai100Stepper(session, layout, num_layers, vocab_size)
    session.set_buffers(dict(banks))
    sched = Scheduler(full_batch_size=layout.cache_rows, prefill_seq_len=layout.prefill_seq_len,
                      ctx_len=layout.ctx_len, max_waiting=len(prompts), max_prefill_rows=layout.batch_size)
    seqs = [Request(request_id=str(i), prompt_ids=list(p), lora_id=int(lora_ids[i]), max_new_tokens=int(max_new[i]),
                    ignore_eos=True) for i, p in enumerate(prompts)]
    for s in seqs:
        sched.add(s)
    for _ in range(sum(len(p) + m for p, m in zip(prompts, max_new, strict=True)) + 1):  # at most one call a token
        step = sched.schedule()
        if step is None:
            break
        logits = stepper.execute(step)
        sched.update(step, {row.request_id: int(np.argmax(row_logits))
                            for row, row_logits in zip(step.rows, logits, strict=True) if row.samples})
    return [s.output_ids for s in seqs]


def _mixed(adapter_factory, arch):
    """Two adapters of different ranks, one on attention only, one on every linear (MLP included)."""
    return [("a", adapter_factory(arch, "a4", r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"), seed=1)),
            ("b", adapter_factory(arch, "b8", r=8, lora_alpha=16, target_modules=ALL, seed=2))]


def test_specializations_continuous_batching_and_static():
    cb = CompileOptions(target="ai100", batch_size=1, full_batch_size=4, prefill_seq_len=32, ctx_len=256).resolve()
    assert ai100.continuous_batching(cb)
    assert ai100.specializations(cb) == [{"batch_size": 1, "seq_len": 32, "ctx_len": 256, "full_batch_size": 4},
                                         {"batch_size": 4, "seq_len": 1, "ctx_len": 256, "full_batch_size": 4}]
    static = CompileOptions(target="ai100", batch_size=2, prefill_seq_len=16, ctx_len=64).resolve()
    assert not ai100.continuous_batching(static)
    assert ai100.specializations(static) == [{"batch_size": 2, "seq_len": 16, "ctx_len": 64},
                                             {"batch_size": 2, "seq_len": 1, "ctx_len": 64}]


def test_custom_io_file_format(tmp_path):
    io = ai100.custom_io(2)
    assert list(io) == ["past_key.0", "past_value.0", "past_key.1", "past_value.1", "past_key.0_RetainedState",
                        "past_value.0_RetainedState", "past_key.1_RetainedState", "past_value.1_RetainedState"]
    assert set(io.values()) == {"float16"} and set(ai100.custom_io(1, "mxint8").values()) == {"mxint8"}
    path = ai100.write_custom_io(tmp_path / "custom_io.yaml", io)
    assert path.read_text().startswith(" - IOName: past_key.0\n   Precision: float16\n\n")
    assert ai100_verify.read_custom_io(path) == io


def test_qaic_exec_command_follows_the_options():
    cmd = ai100.qaic_exec_command(qaic_exec="/opt/qti-aic/exec/qaic-exec", onnx_path="model.onnx",
                                  specializations_path="s.json", custom_io_path="io.yaml", qpc_dir="qpc",
                                  num_cores=14, mxfp6_matmul=True, mxint8=True,
                                  compiler_options=("-mos=1", "-aic-enable-depth-first"))
    assert cmd == ["/opt/qti-aic/exec/qaic-exec", "-m=model.onnx", "-aic-hw", "-aic-hw-version=2.0", "-compile-only",
                   "-retained-state", "-convert-to-fp16", "-network-specialization-config=s.json",
                   "-custom-IO-list-file=io.yaml", "-aic-num-cores=14", "-mxfp6-matmul", "-mxint8", "-mos=1",
                   "-aic-enable-depth-first", "-aic-binary-dir=qpc"]
    plain = ai100.qaic_exec_command(qaic_exec="q", onnx_path="m", specializations_path="s", custom_io_path="c",
                                    qpc_dir="q", num_cores=16, mxfp6_matmul=False)
    assert "-mxfp6-matmul" not in plain and "-mxint8" not in plain and plain[-1] == "-aic-binary-dir=q"


@pytest.mark.parametrize("bad", [("-aic-num-cores=4",), ("-aic-binary-dir=elsewhere",), ("-mos=1", "-mos=2"),
                                 ("-mdp-load-partition-config=/etc/passwd",), ("-mxint8=1",)])
def test_compiler_options_may_not_repeat_our_flags_or_name_paths(bad):
    with pytest.raises(InvalidArgument) as err:
        ai100.check_compiler_options(bad)
    assert err.value.field == "options.compiler_options"


def test_missing_sdk_fails_the_compile_stage_only(monkeypatch, tmp_path, tiny_llama):
    from services.compiler.artifact import plan_artifact

    _no_sdk(monkeypatch, tmp_path)
    with pytest.raises(FailedPrecondition, match="qaic-exec") as err:
        plan_artifact(tiny_llama, [], CompileOptions(target="ai100"))
    assert err.value.field == "options.target"
    plan = plan_artifact(tiny_llama, [], CompileOptions(target="ai100", ai100_stage="export"))
    assert plan.options.ai100_stage == "export"
    compiled_id = plan_artifact(tiny_llama, [], CompileOptions(target="ai100", ai100_stage="export",
                                                               compiler_options=("-mos=1",))).artifact_id
    assert compiled_id != plan.artifact_id  # passthrough options are part of the id
    fake = tmp_path / "empty" / "qaic-exec"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    assert ai100.find_qaic_exec() == fake


@pytest.mark.parametrize("cb", [True, False])
def test_graph_carries_the_qualcomm_ops_as_functions_that_ort_runs(tmp_path, tiny_llama, adapter_factory, cb):
    decoder, banks, _ = decoder_with_adapters(tiny_llama, _mixed(adapter_factory, "llama")[:1], ATTN, slots=2)
    graph = _export(tiny_llama, decoder, tmp_path, slots=2, cb=cb)
    model = onnx.load(str(tmp_path / graph.file))
    ops = {n.op_type for n in model.graph.node if n.domain == ai100.QAIC_DOMAIN}
    want = {"CtxScatterCB", "CtxGatherCB"} if cb else {"CtxScatter", "CtxGather"}
    assert ops == want
    assert {f.name for f in model.functions} == want and {f.domain for f in model.functions} == {ai100.QAIC_DOMAIN}
    assert all(n.domain == "" for f in model.functions for n in f.node)  # bodies are standard ONNX
    assert (gc.BATCH_INDEX in {i.name for i in model.graph.input}) == cb
    # The cache is touched only by the custom ops: no generic scatter/einsum on it in the main graph.
    assert not {"Einsum", "ScatterND", "ScatterElements", "GatherND"} & {n.op_type for n in model.graph.node}
    sess = ort.InferenceSession(str(tmp_path / graph.file), providers=["CPUExecutionProvider"])
    L, H, D, C = graph.layers, graph.num_kv_heads, graph.head_dim, 6
    rows = 3 if cb else 2
    rng = np.random.default_rng(0)
    past = {gc.past_key(i): rng.normal(0, 1, (rows, H, C, D)).astype(np.float32) for i in range(L)}
    past |= {gc.past_value(i): rng.normal(0, 1, (rows, H, C, D)).astype(np.float32) for i in range(L)}
    feeds = {gc.INPUT_IDS: np.array([[7, 9], [8, 0]]), gc.POSITION_IDS: np.array([[3, 4], [-1, -1]]),
             gc.LORA_IDS: np.array([[1], [0]]), **banks, **past}
    if cb:
        feeds[gc.BATCH_INDEX] = np.array([[2], [0]])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
    # The function bodies compute what the operators' PyTorch semantics compute.
    with torch.no_grad():
        ref = Ai100Graph(decoder, cb)(*[torch.from_numpy(np.asarray(feeds[s.name])) for s in graph.inputs])
    for spec, want_out in zip(graph.outputs, ref, strict=True):
        np.testing.assert_allclose(outs[spec.name], want_out.numpy(), atol=1e-4)
    kept = outs[gc.retained_key(0)]
    row = 2 if cb else 0
    changed = [bool((kept[row, :, j] != past[gc.past_key(0)][row, :, j]).any()) for j in range(C)]
    assert changed == [False, False, False, True, True, False]
    if cb:  # the idle row (-1 -> INT32_MAX) wrote nothing anywhere
        np.testing.assert_array_equal(np.delete(kept, row, axis=0), np.delete(past[gc.past_key(0)], row, axis=0))
    else:  # QEfficient's convention: -1 counts from the end; the padding row wrote only ctx_len - 1
        assert [bool((kept[1, :, j] != past[gc.past_key(0)][1, :, j]).any()) for j in range(C)] == [False] * 5 + [True]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"])
def test_verification_equals_the_reference_for_mixed_ranks(tmp_path, parity_model, adapter_factory, arch):
    adapters = _mixed(adapter_factory, arch)
    decoder, banks, _ = decoder_with_adapters(parity_model(arch), adapters, ALL, slots=3)
    opts = CompileOptions(target="ai100", batch_size=2, full_batch_size=3, prefill_seq_len=4, ctx_len=32,
                          max_rank=8, adapter_slots=3, ai100_stage="export").resolve()
    graph = _export(parity_model(arch), decoder, tmp_path, slots=3)
    ai100.write_bundle(tmp_path, opts, graph.layers)
    report = ai100_verify.verify_bundle(tmp_path, graph, decoder_reference(decoder, banks), banks, opts,
                                        occupied_slots=2)
    fp32, fp16 = report.runs
    assert fp32.tokens_match and fp16.tokens_match and fp32.tokens_checked >= 8
    assert fp32.relative_diff < 1e-4 and fp16.relative_diff < ai100_verify.TOLERANCE["fp16"]
    assert fp16.max_abs_diff > fp32.max_abs_diff  # the fp16 run really ran in fp16
    assert set(report.lora_ids) == {0, 1, 2} and report.requests == 4 and report.slots == 3
    print(f"{arch}: fp32 {fp32.relative_diff:.3g} fp16 {fp16.relative_diff:.3g}")


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"])
def test_the_bundle_driven_as_the_card_gives_peft_tokens(tmp_path, parity_model, adapter_factory, arch):
    """Every row of a mixed batch (base, a rank-4 attention adapter, a rank-8 adapter on every linear) served
    through the bundle's specializations on ONNX Runtime equals PEFT with that adapter alone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraflow.artifact.ai100_stepper import Ai100Layout
    from tests.compiler.helpers import random_prompts

    model_dir = parity_model(arch)
    adapters = _mixed(adapter_factory, arch)
    decoder, banks, _ = decoder_with_adapters(model_dir, adapters, ALL, slots=3)
    opts = CompileOptions(target="ai100", batch_size=1, full_batch_size=3, prefill_seq_len=4, ctx_len=32,
                          max_rank=8, adapter_slots=3, ai100_stage="export").resolve()
    graph = _export(model_dir, decoder, tmp_path, slots=3)
    ai100.write_bundle(tmp_path, opts, graph.layers)
    specs = ai100_verify.read_specializations(tmp_path / ai100.SPECIALIZATIONS_FILE)
    session = ai100_verify.OrtRetainedStateSession(onnx.load(str(tmp_path / graph.file)), specs, "float32")
    prompts = random_prompts(graph.vocab_size, [9, 5, 6], seed=len(arch))
    lora_ids, new = [1, 0, 2], 5
    tokens = _greedy_serve(session, Ai100Layout.from_options(opts.to_dict()), graph.layers, graph.vocab_size,
                           {k: np.asarray(v, np.float32) for k, v in banks.items()}, prompts, lora_ids,
                           [new] * 3)
    session.close()
    for row, slot in enumerate(lora_ids):
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = base if slot == 0 else PeftModel.from_pretrained(base, adapters[slot - 1][1])
        base.generation_config.eos_token_id = None  # random models may emit eos; compare a fixed length
        ids = torch.tensor([prompts[row]])
        with torch.no_grad():
            out = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                        do_sample=False)
        assert tokens[row] == out[0, ids.shape[1]:].tolist(), f"{arch} row {row} (slot {slot})"


def _break_scatter(path):
    """The cache update writes nothing: a graph that looks right and forgets the past."""
    model = onnx.load(str(path))
    for f in model.functions:
        if f.name.startswith("CtxScatter"):
            del f.node[:]
            f.node.append(onnx.helper.make_node("Identity", ["data"], ["out"]))
    onnx.save(model, str(path), save_as_external_data=True, location=ai100.DATA_FILE)


def test_a_broken_graph_fails_verification(tmp_path, tiny_llama, adapter_factory):
    decoder, banks, _ = decoder_with_adapters(tiny_llama, _mixed(adapter_factory, "llama"), ALL, slots=3)
    opts = CompileOptions(target="ai100", full_batch_size=2, prefill_seq_len=4, ctx_len=32, max_rank=8,
                          adapter_slots=3, ai100_stage="export").resolve()
    graph = _export(tiny_llama, decoder, tmp_path, slots=3)
    ai100.write_bundle(tmp_path, opts, graph.layers)
    _break_scatter(tmp_path / graph.file)
    with pytest.raises(VerificationFailed, match="differs|greedy tokens") as err:
        ai100_verify.verify_bundle(tmp_path, graph, decoder_reference(decoder, banks), banks, opts, occupied_slots=2,
                                   precisions=("fp32",))
    assert err.value.max_abs_diff > 1e-2


def test_export_stage_publishes_the_bundle_without_the_sdk(monkeypatch, tmp_path, tiny_llama, adapter_factory):
    from services.compiler.artifact import build_artifact

    _no_sdk(monkeypatch, tmp_path)
    out = tmp_path / "art"
    opts = CompileOptions(target="ai100", batch_size=1, full_batch_size=3, prefill_seq_len=4, ctx_len=32,
                          num_cores=8, mxfp6_matmul=True, ai100_stage="export", compiler_options=("-mos=1",))
    manifest = build_artifact(tiny_llama, _mixed(adapter_factory, "llama"), opts, out)
    files = {f.path for f in manifest.files}
    assert {"model.onnx", "specializations.json", "custom_io.yaml", ai100.COMMAND_FILE} <= files
    assert not (out / "qpc").exists() and "qpc_dir" not in manifest.extra
    cmd = manifest.extra["ai100"]["qaic_exec"]
    assert cmd[0] == str(ai100.DEFAULT_QAIC_EXEC) and "-aic-num-cores=8" in cmd and "-mxfp6-matmul" in cmd
    assert "-mos=1" in cmd and cmd[-1] == "-aic-binary-dir=qpc" and "-m=model.onnx" in cmd
    assert (out / ai100.COMMAND_FILE).read_text().strip() == shlex.join(cmd)
    assert json.loads((out / "specializations.json").read_text())["specializations"][1]["batch_size"] == "3"
    verify = manifest.extra["verify"]
    assert verify["tokens_match"] and [r["precision"] for r in verify["runs"]] == ["fp32", "fp16"]
    assert manifest.extra["ai100"]["continuous_batching"] is True
    assert manifest.specializations[0] == {"batch_size": 1, "seq_len": 4, "ctx_len": 32, "full_batch_size": 3}


def test_a_broken_export_does_not_publish(monkeypatch, tmp_path, tiny_llama, adapter_factory):
    from services.compiler.artifact import build_artifact

    _no_sdk(monkeypatch, tmp_path)
    real = ai100_writer.export_ai100

    def broken(*args, **kwargs):
        exported = real(*args, **kwargs)
        _break_scatter(args[1] / exported.graph.file)
        return exported

    monkeypatch.setattr(ai100_writer, "export_ai100", broken)
    out = tmp_path / "art"
    with pytest.raises(VerificationFailed):
        build_artifact(tiny_llama, _mixed(adapter_factory, "llama")[:1],
                       CompileOptions(target="ai100", full_batch_size=2, prefill_seq_len=4, ctx_len=32,
                                      ai100_stage="export"), out)
    assert not (out / "manifest.json").exists()


def test_compile_stage_runs_the_recorded_command(monkeypatch, tmp_path, tiny_llama, adapter_factory):
    """The SDK cannot exist here: a stand-in qaic-exec records argv and cwd and makes the binary dir."""
    from services.compiler.artifact import build_artifact

    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "qaic-exec"
    fake.write_text('#!/bin/sh\npwd > "$(dirname "$0")/cwd.txt"\nprintf "%s\\n" "$@" > "$(dirname "$0")/argv.txt"\n'
                    'for a in "$@"; do case "$a" in -aic-binary-dir=*) mkdir -p "${a#-aic-binary-dir=}";; '
                    'esac; done\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{__import__('os').environ['PATH']}")
    out = tmp_path / "art"
    opts = CompileOptions(target="ai100", batch_size=2, prefill_seq_len=4, ctx_len=32, num_cores=8)
    manifest = build_artifact(tiny_llama, _mixed(adapter_factory, "llama")[:1], opts, out)
    argv = (bindir / "argv.txt").read_text().split("\n")[:-1]
    assert [str(fake), *argv] == manifest.extra["ai100"]["qaic_exec"]
    assert (bindir / "cwd.txt").read_text().strip() == str(out)
    assert (out / "qpc").is_dir() and manifest.extra["qpc_dir"] == "qpc"
    assert manifest.extra["ai100"]["continuous_batching"] is False  # full_batch_size == batch_size
    assert manifest.specializations[1] == {"batch_size": 2, "seq_len": 1, "ctx_len": 32}
