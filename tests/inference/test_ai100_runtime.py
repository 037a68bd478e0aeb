"""Serving an ai100 artifact through the Cloud AI 100 runtime path (QaicSession over qaicrt), end to end.

qaicrt cannot exist here: tests/support/qaicrt_standin.py has its interface and executes the QPC's
bundle (the same model.onnx, fp16 as -convert-to-fp16 makes it) on ONNX Runtime with retained state.
Everything above it — QaicSession's set/skip buffers, the stepper's specializations, the engine,
adapter slots and hot-add — is the code that would run on the card.
"""

from __future__ import annotations

import pytest

from loraflow.errors import FailedPrecondition
from services.inference.engine import GenerationRequest
from services.inference.model_manager import open_model
from services.inference.runtime import check_device
from services.inference.sampling import SamplingParams
from tests.inference.conftest import COMPILED, PROMPTS
from tests.support import qaicrt_standin


@pytest.fixture(scope="module")
def ai100_artifact(tiny_llama, tiny_adapters, tmp_path_factory):
    """The onnxruntime tiny artifact's options on target ai100, through a stand-in qaic-exec that writes a QPC."""
    import os

    from services.compiler.artifact import build_artifact
    from services.compiler.options import CompileOptions

    bindir = tmp_path_factory.mktemp("sdk")
    fake = bindir / "qaic-exec"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do case "$a" in -aic-binary-dir=*) d="${a#-aic-binary-dir=}"; '
                    'mkdir -p "$d"; echo stand-in > "$d/programqpc.bin";; esac; done\n')
    fake.chmod(0o755)
    old = os.environ["PATH"]
    os.environ["PATH"] = f"{bindir}:{old}"
    try:
        out = tmp_path_factory.mktemp("ai100-artifact")
        options = CompileOptions(target="ai100", batch_size=2, full_batch_size=4, prefill_seq_len=8, ctx_len=64,
                                 max_rank=8, adapter_slots=4)
        manifest = build_artifact(tiny_llama, [(n, tiny_adapters[n]) for n in COMPILED], options, out)
    finally:
        os.environ["PATH"] = old
    return out, manifest


def _generate(model, rows, n):
    handles = [model.engine.submit(GenerationRequest(tuple(ids), adapter, SamplingParams(max_new_tokens=n,
                                                                                          ignore_eos=True)))
               for ids, adapter in rows]
    return [list(h.result().token_ids) for h in handles]


def test_ai100_device_needs_the_runtime(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "qaicrt", None)  # import fails as on a host without the SDK
    monkeypatch.setattr("services.inference.qaic_sdk.SDK_PYTHON_DIRS", ())
    with pytest.raises(FailedPrecondition, match="qaicrt") as err:
        check_device("ai100")
    assert err.value.field == "device"


def test_serving_through_qaicrt_equals_the_onnxruntime_artifact(monkeypatch, ai100_artifact, tiny_artifact,
                                                                tiny_tokenizer, tiny_adapters):
    rt = qaicrt_standin.install(monkeypatch)
    assert check_device("ai100") == "ai100"
    ort_dir, ort_manifest = tiny_artifact
    ai_dir, ai_manifest = ai100_artifact
    rows = [(tiny_tokenizer.encode(p), a) for p, a in zip(PROMPTS * 2, ["", "alpha", "beta", "gamma", "beta", "",
                                                                         "gamma", "alpha"], strict=True)]
    reference = open_model(ort_dir, manifest=ort_manifest, num_threads=1, model_id="ort")
    card = open_model(ai_dir, device="ai100", manifest=ai_manifest, model_id="card")
    try:
        assert type(card.runtime).__name__ == "Ai100Runtime" and card.device == "ai100"
        program = rt.Program.activated[-1]
        assert program.qpc.path == ai_dir / "qpc"
        # 8 requests on 4 KV slots: slots are reused; the base model and all three adapters are in use.
        want = _generate(reference, rows, 10)
        got = _generate(card, rows, 10)
        assert got == want
        assert len({tuple(t) for t in want[:4]}) == 4  # the adapters change the tokens
        # The KV cache stayed on the "card": past_* inputs and *_RetainedState outputs were skipped.
        session = card.runtime.session
        for name in ("past_key.0", "past_value.1_RetainedState"):
            assert session.qbuffers[session.binding_index[name]].size == 0
        # Hot-add writes the adapter into the banks (QPC inputs) and serves at once.
        slot = card.runtime.load_adapter("hot", tiny_adapters["hot"])
        reference.runtime.load_adapter("hot", tiny_adapters["hot"])
        assert slot == 4
        hot = [(tiny_tokenizer.encode(PROMPTS[0]), "hot"), (tiny_tokenizer.encode(PROMPTS[1]), "alpha")]
        assert _generate(card, hot, 8) == _generate(reference, hot, 8)
    finally:
        card.close()
        reference.close()
    assert not rt.Program.activated


def test_an_export_only_artifact_has_no_qpc_to_serve(monkeypatch, ai100_artifact, tmp_path):
    import shutil

    from loraflow.artifact.manifest import Manifest

    qaicrt_standin.install(monkeypatch)
    src, manifest = ai100_artifact
    dst = tmp_path / "exported"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("qpc"))
    data = manifest.to_dict()
    data["extra"] = {k: v for k, v in data["extra"].items() if k != "qpc_dir"}
    with pytest.raises(FailedPrecondition, match="no QPC"):
        open_model(dst, device="ai100", manifest=Manifest.from_dict(data))
