"""Resident adapter slots chosen at load, not at compile time (issue 22): a fused artifact compiled with 3
slots serves 12 adapters resident at once in one mixed batch, every row equal to PEFT, through either graph
(LoraRows with ``layer``/``num_layers``, and the standard operators that compute i*N from the banks' shape);
an artifact whose graph still fixes the slots (LoraRows ``bank_offset``, static bank dims) keeps them; and
``resident_slots`` sizes ``auto`` from the budget."""

from __future__ import annotations

import dataclasses
import json
import shutil

import onnx
import pytest
from onnx import helper

from loraflow import native as native_lora
from loraflow.artifact import graph_contract as gc
from loraflow.artifact.manifest import Manifest, TensorSpec
from loraflow.errors import InvalidArgument
from loraflow.options.budget import serving_estimate
from services.inference.adapter_slots import (
    AUTO_SLOTS_SHARE,
    MAX_AUTO_SLOTS,
    resident_slots,
    slot_bytes,
    slots_chosen_at_runtime,
)
from services.inference.engine import GenerationRequest
from services.inference.model_manager import open_model
from services.inference.on_demand_adapters import AdapterOrigin
from services.inference.sampling import SamplingParams
from tests.inference.conftest import ADAPTERS, COMPILED, PROMPTS, _make_adapter
from tests.support.native import require_native
from tests.support.peft_reference import PeftReference

COMPILED_SLOTS = 3
SERVED_SLOTS = 12
NEW_TOKENS = 8
# Nine adapters beyond the three compiled in: (seed, r, alpha, targets, rslora), ranks 1..8 over every module.
EXTRA = {f"extra{i}": (100 + i, 1 + i % 8, 2 + 2 * i,
                       [("q_proj", "v_proj"), ("k_proj", "o_proj", "down_proj"), ("gate_proj", "up_proj"),
                        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")][i % 4],
                       i % 3 == 0)
         for i in range(SERVED_SLOTS - len(COMPILED))}


@pytest.fixture(scope="module")
def many_adapters(tiny_llama, tiny_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("many_adapters")
    extra = {name: _make_adapter(tiny_llama, root / name, seed, r, alpha, list(targets), rslora)
             for name, (seed, r, alpha, targets, rslora) in EXTRA.items()}
    return {**{n: tiny_adapters[n] for n in COMPILED}, **extra}


@pytest.fixture(scope="module")
def three_slot_artifact(tiny_llama, tiny_adapters, tmp_path_factory):
    """(artifact_dir, manifest): alpha, beta, gamma compiled into 3 slots; 13 KV slots (12 adapters + base)."""
    from services.compiler.artifact import build_artifact
    from services.compiler.options import CompileOptions

    out = tmp_path_factory.mktemp("three_slots")
    options = CompileOptions(batch_size=1, full_batch_size=SERVED_SLOTS + 1, prefill_seq_len=8, ctx_len=48,
                             max_rank=8, adapter_slots=COMPILED_SLOTS)
    manifest = build_artifact(tiny_llama, [(n, tiny_adapters[n]) for n in COMPILED], options, out)
    return out, manifest


@pytest.fixture(scope="module")
def many_reference(tiny_llama, many_adapters) -> PeftReference:
    return PeftReference(tiny_llama, many_adapters)


def _serve_mixed_batch(model, tokenizer, adapters, reference):
    """Every adapter (and the base) in one batch: each row's greedy tokens against PEFT's; returns the
    lora_ids of the widest step."""
    steps = []
    execute = model.runtime.execute

    def recording(step):
        steps.append(step)
        return execute(step)

    model.runtime.execute = recording
    rows = [("", PROMPTS[0])] + [(name, PROMPTS[i % len(PROMPTS)]) for i, name in enumerate(adapters)]
    ids = [tokenizer.encode(prompt) for _, prompt in rows]
    handles = [model.engine.submit(GenerationRequest(tuple(i), name, SamplingParams(max_new_tokens=NEW_TOKENS)))
               for i, (name, _) in zip(ids, rows, strict=True)]
    for prompt_ids, (name, _), handle in zip(ids, rows, handles, strict=True):
        assert list(handle.result().token_ids) == reference.generate(prompt_ids, name, NEW_TOKENS), name
    widest = max(steps, key=lambda s: len({r.lora_id for r in s.rows}))
    return [r.lora_id for r in widest.rows]


@pytest.mark.parametrize("kernel", ["native", "onnx"])
def test_a_three_slot_artifact_serves_twelve_adapters_resident_at_once_equal_to_peft(
        kernel, three_slot_artifact, many_adapters, many_reference, tiny_tokenizer, monkeypatch):
    if kernel == "native":
        require_native()
    else:
        monkeypatch.setenv(native_lora.DISABLE_ENV, "1")
    artifact_dir, manifest = three_slot_artifact
    assert manifest.adapter_slots == COMPILED_SLOTS and slots_chosen_at_runtime(manifest)
    banks = [t for t in manifest.graph.inputs if t.name.startswith("lora_a.")]
    assert banks and all(t.shape[0] == gc.BANK_ROWS_DIM for t in banks)

    def resolve(name):
        return AdapterOrigin(str(many_adapters[name]), lambda: many_adapters[name], "path")

    model = open_model(artifact_dir, num_threads=1, model_id=f"many-{kernel}", manifest=manifest,
                       resolve_adapter=resolve, adapter_slots=SERVED_SLOTS)
    try:
        runtime = model.runtime
        assert runtime.lora_kernel == kernel and runtime.adapter_slots == SERVED_SLOTS
        assert runtime.lora_a["q_proj"].shape[1] == SERVED_SLOTS + 1  # [L, N, in, R]
        # Loaded on first use, before the batch (so its rows arrive together): no eviction among twelve.
        for name in many_adapters:
            assert model.adapters.acquire_adapter(name) >= 1
        assert runtime.free_adapter_slots() == 0
        for lora_id in list(runtime.adapter_names().values()):
            runtime.release_adapter(lora_id)
        lora_ids = _serve_mixed_batch(model, tiny_tokenizer, list(many_adapters), many_reference)
        # One call held the base row and all twelve adapters, each in its own slot.
        assert sorted(lora_ids) == list(range(SERVED_SLOTS + 1))
        assert sorted(runtime.adapter_names()) == sorted(many_adapters)
        assert runtime.free_adapter_slots() == 0
    finally:
        model.close()


def _fix_slots_as_before_graph6(artifact_dir, manifest, out_dir):
    """A copy of the artifact as compiler 0.4 wrote it: LoraRows with bank_offset = layer * N, static bank
    dims (manifest and graph), lora_ranks [N] (a rank per slot); only the native graph is kept (the standard one
    is not rewritten)."""
    shutil.copytree(artifact_dir, out_dir)
    n = manifest.adapter_slots + 1
    layers = manifest.graph.layers
    model = onnx.load(str(out_dir / manifest.graph.native_file), load_external_data=False)
    rewritten = 0
    for node in model.graph.node:
        if node.op_type == "LoraRows":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            del node.attribute[:]
            node.attribute.extend([helper.make_attribute("bank_offset", attrs["layer"] * n),
                                   helper.make_attribute("column_offset", attrs["column_offset"])])
            rewritten += 1
    assert rewritten
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name.startswith(("lora_a.", "lora_b.")):
            dims[0].ClearField("dim_param")
            dims[0].dim_value = layers * n
        elif value.name == gc.LORA_RANKS:  # [N] as before graph8 (a rank per slot, no rank_column)
            dims[0].ClearField("dim_param")
            dims[0].dim_value = n
            del dims[1:]
    onnx.save(model, str(out_dir / manifest.graph.native_file))

    def static(t: TensorSpec) -> TensorSpec:
        if t.name.startswith(("lora_a.", "lora_b.")):
            return dataclasses.replace(t, shape=(layers * n, *t.shape[1:]))
        return dataclasses.replace(t, shape=(n,)) if t.name == gc.LORA_RANKS else t

    raw = json.loads((out_dir / "manifest.json").read_text())
    old = Manifest.from_dict(raw)
    graph = dataclasses.replace(old.graph, inputs=tuple(static(t) for t in old.graph.inputs),
                                native_inputs=tuple(static(t) for t in old.graph.native_inputs))
    raw["graph"] = graph.to_dict()
    (out_dir / "manifest.json").write_text(json.dumps(raw))
    return Manifest.from_dict(raw)


def test_an_artifact_with_fixed_slots_keeps_them_and_still_serves_peft_tokens(
        three_slot_artifact, many_adapters, many_reference, tiny_tokenizer, tmp_path):
    require_native()
    artifact_dir, manifest = three_slot_artifact
    old_manifest = _fix_slots_as_before_graph6(artifact_dir, manifest, tmp_path / "old")
    assert not slots_chosen_at_runtime(old_manifest)
    assert resident_slots(old_manifest, SERVED_SLOTS, free_bytes=1 << 40) == COMPILED_SLOTS
    assert resident_slots(old_manifest, "auto", free_bytes=1 << 40) == COMPILED_SLOTS
    model = open_model(tmp_path / "old", num_threads=1, model_id="fixed", manifest=old_manifest,
                       adapter_slots=SERVED_SLOTS)  # asked for more: the graph cannot, so it keeps 3
    try:
        assert model.runtime.lora_kernel == "native" and model.runtime.adapter_slots == COMPILED_SLOTS
        graph = onnx.load(str(tmp_path / "old" / old_manifest.graph.native_file), load_external_data=False)
        assert {a.name for n in graph.graph.node if n.op_type == "LoraRows" for a in n.attribute} == {
            "bank_offset", "column_offset"}
        lora_ids = _serve_mixed_batch(model, tiny_tokenizer, list(COMPILED), many_reference)
        assert sorted(lora_ids) == [0, 1, 2, 3]
    finally:
        model.close()


def test_auto_sizes_the_slots_from_the_budget_left_after_weights_and_kv_cache(three_slot_artifact):
    _, manifest = three_slot_artifact
    fixed = serving_estimate(manifest, adapter_slots=0).total
    per_slot = slot_bytes(manifest)
    assert per_slot > 0 and serving_estimate(manifest, adapter_slots=5).total == fixed + 5 * per_slot
    free = fixed + int(40 * per_slot / AUTO_SLOTS_SHARE) + per_slot // 2  # room for 40 slots in the share
    assert resident_slots(manifest, "auto", free_bytes=free) == 40
    assert resident_slots(manifest, "auto", free_bytes=free + int(per_slot / AUTO_SLOTS_SHARE)) == 41
    assert resident_slots(manifest, "auto", free_bytes=1 << 50) == MAX_AUTO_SLOTS  # bounded
    assert resident_slots(manifest, "auto", free_bytes=fixed) == COMPILED_SLOTS  # never fewer than compiled
    assert resident_slots(manifest, "auto", free_bytes=0) == COMPILED_SLOTS
    assert resident_slots(manifest, None, free_bytes=1 << 50) == COMPILED_SLOTS  # unset: the compiled count
    assert resident_slots(manifest, "auto", free_bytes=1 << 50, device="cuda") == COMPILED_SLOTS
    assert resident_slots(manifest, 7, free_bytes=0) == 7  # explicit: the budget check is the loader's
    for bad in (COMPILED_SLOTS - 1, 0, 5000, True):
        with pytest.raises(InvalidArgument) as info:
            resident_slots(manifest, bad, free_bytes=1 << 40)
        assert info.value.field == "adapter_slots"


def test_the_setting_takes_auto_or_a_bounded_count():
    from loraflow.options.settings import ADAPTER_SLOTS

    assert ADAPTER_SLOTS.from_env({}) == "auto"
    assert ADAPTER_SLOTS.from_env({ADAPTER_SLOTS.env: "AUTO"}) == "auto"
    assert ADAPTER_SLOTS.from_env({ADAPTER_SLOTS.env: "32"}) == 32
    for bad in ("0", "4097", "many"):
        with pytest.raises(InvalidArgument) as info:
            ADAPTER_SLOTS.from_env({ADAPTER_SLOTS.env: bad})
        assert info.value.field == ADAPTER_SLOTS.env


def test_hot_adds_fill_the_runtime_slots_and_the_thirteenth_evicts(three_slot_artifact, many_adapters, tiny_adapters):
    require_native()
    artifact_dir, manifest = three_slot_artifact
    model = open_model(artifact_dir, num_threads=1, model_id="evict", manifest=manifest, adapter_slots=SERVED_SLOTS)
    try:
        runtime = model.runtime
        for name, path in many_adapters.items():
            if name not in COMPILED:
                runtime.load_adapter(name, path)
        assert runtime.free_adapter_slots() == 0 and len(runtime.adapter_names()) == SERVED_SLOTS
        slot = runtime.load_adapter("hot", tiny_adapters["hot"])  # the least recently used idle one goes
        assert 1 <= slot <= SERVED_SLOTS and "hot" in runtime.adapter_names()
        assert runtime.adapters.ranks[slot] == ADAPTERS["hot"][1]
    finally:
        model.close()
