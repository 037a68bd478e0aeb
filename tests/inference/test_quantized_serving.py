"""An int4 artifact served by the engine: every row of a mixed batch (continuous batching, chunked prefill,
a request joining later) gives the greedy tokens of the PyTorch decoder holding the same quantised weights.

The reference is built outside the code under test: the decoder is loaded again, the adapters written into
its banks from the artifact's own adapter directories, and its linears replaced by the dequantised blocks of
the same quantiser (deterministic), at accuracy level 0 (float activations, so exact up to summation order).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loraflow.artifact import lora_bank
from services.inference.engine import GenerationRequest
from services.inference.model_manager import open_model
from services.inference.sampling import SamplingParams
from tests.inference.conftest import COMPILED, PROMPTS

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def int4_artifact(tiny_llama, tiny_adapters, tmp_path_factory):
    from services.compiler.artifact import build_artifact
    from services.compiler.options import CompileOptions

    out = tmp_path_factory.mktemp("artifact-int4")
    options = CompileOptions(batch_size=2, full_batch_size=3, prefill_seq_len=4, ctx_len=64, max_rank=8,
                             adapter_slots=3, dtype="int4", quant_block_size=16, quant_accuracy_level=0)
    manifest = build_artifact(tiny_llama, [(n, tiny_adapters[n]) for n in COMPILED], options, out)
    return out, manifest


def _reference(tiny_llama, artifact_dir, manifest):
    """The decoder holding exactly the weights the int4 artifact multiplies by, read back from its files."""
    from services.compiler.fused.builder import FusedGraphOptions
    from services.compiler.fused.export import export_fused
    from services.compiler.fused.readback import ArtifactWeights
    from services.compiler.modeling import CheckpointWeights, load_decoder

    opts = manifest.options
    lora_modules = tuple(manifest.graph.lora_modules)
    checkpoint = CheckpointWeights.open(tiny_llama)
    # Where each tensor lives in the graph: the builder's map for these options (rebuilt beside the artifact).
    written = export_fused(checkpoint, artifact_dir.parent / "written-map", FusedGraphOptions(
        dtype="int4", ctx_len=int(opts["ctx_len"]), num_slots=manifest.adapter_slots + 1,
        max_rank=manifest.max_rank, lora_modules=lora_modules, quant_block_size=int(opts["quant_block_size"]),
        quant_accuracy_level=0), native=False).written
    decoder = load_decoder(tiny_llama, lora_modules,
                           weights=ArtifactWeights(checkpoint.cfg, artifact_dir / manifest.graph.file, written))
    spec = lora_bank.BankSpec.from_manifest(manifest)
    banks_a, banks_b = lora_bank.empty_banks(spec)
    for entry in manifest.adapters:
        lora_bank.write_slot(banks_a, banks_b, entry.slot, lora_bank.read_adapter(entry.name, artifact_dir / entry.path),
                             spec)
    decoder.set_banks(banks_a, banks_b)
    return decoder


def _greedy(decoder, prompt: list[int], lora_id: int, n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        pk, pv = decoder.empty_cache(1)
        with torch.no_grad():
            logits, _, _ = decoder(torch.tensor([seq]), torch.arange(len(seq)).view(1, -1), torch.tensor([[lora_id]]),
                                   torch.tensor([[0]]), pk, pv)
        seq.append(int(np.argmax(logits[0, 0].numpy())))
    return seq[len(prompt):]


def test_int4_engine_rows_equal_the_dequantized_decoder(int4_artifact, tiny_llama, tiny_tokenizer):
    artifact_dir, manifest = int4_artifact
    assert manifest.graph.kv_layout == "shared-buffer" and manifest.options["dtype"] == "int4"
    reference = _reference(tiny_llama, artifact_dir, manifest)
    slot_of = {a.name: a.slot for a in manifest.adapters}
    rows = [(PROMPTS[0], ""), (PROMPTS[1], "alpha"), (PROMPTS[2], "beta"), (PROMPTS[3], "gamma")]
    loaded = open_model(artifact_dir, num_threads=1, model_id="tiny-int4", manifest=manifest)
    try:
        params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
        ids = [tiny_tokenizer.encode(p) for p, _ in rows]
        # Four requests on three KV slots: the last one waits for a slot and joins a running batch.
        handles = [loaded.engine.submit(GenerationRequest(tuple(i), a, params)) for i, (_, a) in zip(ids, rows,
                                                                                                   strict=True)]
        results = [h.result() for h in handles]
    finally:
        loaded.close()
    for prompt_ids, (_, adapter), result in zip(ids, rows, results, strict=True):
        want = _greedy(reference, prompt_ids, slot_of.get(adapter, 0), NEW_TOKENS)
        assert list(result.token_ids) == want, adapter
