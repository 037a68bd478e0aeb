"""loraflow.artifact.lora_bank: reading PEFT dirs, every rejection, slot layout and scaling."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from loraflow.artifact import lora_bank
from loraflow.errors import FailedPrecondition, InvalidArgument

HIDDEN, INTER, LAYERS = 64, 128, 2
MODULES = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
           "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}


def spec(**kw) -> lora_bank.BankSpec:
    base = dict(num_layers=LAYERS, max_rank=8, adapter_slots=3, modules=MODULES, architecture="llama")
    base.update(kw)
    return lora_bank.BankSpec(**base)


@pytest.fixture
def adapter_dir(adapter_factory, tmp_path):
    """A writable copy of a rank-4 q/v adapter."""
    dst = tmp_path / "ad"
    shutil.copytree(adapter_factory("llama", "qv4", r=4, lora_alpha=8, target_modules=("q_proj", "v_proj")), dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def test_reads_peft_adapter_and_builds_scaled_padded_slots(adapter_dir):
    ad = lora_bank.read_adapter("qv", adapter_dir)
    assert ad.r == 4 and ad.lora_alpha == 8 and ad.target_modules == ("q_proj", "v_proj")
    assert len(ad.digest) == 64 and ad.digest == lora_bank.adapter_digest(adapter_dir)
    s = spec()
    banks_a, banks_b = lora_bank.empty_banks(s)
    lora_bank.write_slot(banks_a, banks_b, 2, ad, s)
    raw = load_file(str(adapter_dir / "adapter_model.safetensors"))
    a = raw["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]  # [r, in]
    b = raw["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]  # [out, r]
    np.testing.assert_allclose(banks_a["q_proj"][1, 2, :, :4], a.T)
    np.testing.assert_allclose(banks_b["q_proj"][1, 2, :4, :], b.T * (8 / 4), rtol=1e-6)
    assert not banks_a["q_proj"][:, 2, :, 4:].any() and not banks_b["q_proj"][:, 2, 4:].any()  # rank padding
    assert not banks_a["q_proj"][:, [0, 1, 3]].any()  # other slots (and base slot 0) untouched
    assert not banks_a["o_proj"].any()  # untargeted module stays zero
    lora_bank.clear_slot(banks_a, banks_b, 2)
    assert not banks_b["q_proj"].any()


def test_rslora_and_patterns_set_per_module_scaling(adapter_dir):
    _edit_config(adapter_dir, use_rslora=True, alpha_pattern={"q_proj": 32}, rank_pattern={})
    ad = lora_bank.read_adapter("qv", adapter_dir)
    assert ad.scaling(0, "q_proj") == pytest.approx(32 / math.sqrt(4))
    assert ad.scaling(0, "v_proj") == pytest.approx(8 / math.sqrt(4))


@pytest.mark.parametrize("field,value", [
    ("use_dora", True), ("modules_to_save", ["lm_head"]), ("bias", "lora_only"), ("peft_type", "IA3"),
    ("fan_in_fan_out", True), ("layer_replication", [[0, 2]]), ("lora_bias", True), ("r", 0),
    ("task_type", "SEQ_CLS"), ("target_modules", ["q_proj", "embed_tokens"]),
])
def test_config_rejections_name_adapter_field_and_value(adapter_dir, field, value):
    _edit_config(adapter_dir, **{field: value})
    with pytest.raises(InvalidArgument) as err:
        lora_bank.read_adapter("math", adapter_dir)
    shown = ["embed_tokens"] if field == "target_modules" else value  # only the offending entries
    assert "'math'" in str(err.value) and field in str(err.value) and repr(shown) in str(err.value)
    assert err.value.field == field and err.value.metadata["adapter"] == "math"


@pytest.mark.parametrize("key", ["base_model.model.model.embed_tokens.lora_embedding_A",
                                 "base_model.model.lm_head.lora_A.weight"])
def test_embedding_and_lm_head_weights_are_rejected(adapter_dir, key):
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors[key] = np.zeros((4, 64), np.float32)
    save_file(tensors, str(path))
    with pytest.raises(InvalidArgument, match=r"adapter 'math': weights=.*(embed_tokens|lm_head)"):
        lora_bank.read_adapter("math", adapter_dir)


def test_missing_files_rejected(tmp_path):
    with pytest.raises(InvalidArgument, match="adapter 'x'.*not a PEFT adapter dir"):
        lora_bank.read_adapter("x", tmp_path)


def test_fit_rejections(adapter_dir):
    ad = lora_bank.read_adapter("math", adapter_dir)
    with pytest.raises(FailedPrecondition, match=r"adapter 'math': r=4 exceeds the artifact's max_rank=2") as err:
        lora_bank.check_fits(ad, spec(max_rank=2))
    assert err.value.field == "r" and err.value.value == 4
    with pytest.raises(FailedPrecondition, match=r"adapter 'math': target_modules \['v_proj'\] are not adapted"):
        lora_bank.check_fits(ad, spec(modules={"q_proj": MODULES["q_proj"]}))
    with pytest.raises(FailedPrecondition, match=r"adapter 'math': has weights for layer 1 .* 1 layers"):
        lora_bank.check_fits(ad, spec(num_layers=1))
    other = dict(MODULES, q_proj=(96, 96))
    with pytest.raises(FailedPrecondition, match=r"adapter 'math': layers.0.q_proj maps 64→64 .* 96→96") as err:
        lora_bank.check_fits(ad, spec(modules=other))
    assert err.value.field == "q_proj.shape"
    with pytest.raises(InvalidArgument, match="slot 4 is outside 1..3"):
        banks_a, banks_b = lora_bank.empty_banks(spec())
        lora_bank.write_slot(banks_a, banks_b, 4, ad, spec())



def test_write_slot_tensors_casts_zeroes_untouched_modules_and_refuses_bad_input(adapter_dir):
    """The runtimes' writer: what write_slot writes, in the banks' dtype; a module the tensors lack is zeroed."""
    s = spec()
    ad = lora_bank.read_adapter("qv", adapter_dir)
    ref_a, ref_b = lora_bank.empty_banks(s)
    lora_bank.write_slot(ref_a, ref_b, 1, ad, s)
    banks_a, banks_b = lora_bank.empty_banks(s, np.float16)
    banks_a["o_proj"][:, 1] = 1  # stale weights of a previous adapter in the slot
    banks_b["o_proj"][:, 1] = 1
    tensors = {m: t for m, t in lora_bank.slot_tensors(ad, s).items() if m in ("q_proj", "v_proj")}
    lora_bank.write_slot_tensors(banks_a, banks_b, 1, tensors)
    for m in MODULES:
        assert banks_a[m].dtype == np.float16 and banks_b[m].dtype == np.float16
        np.testing.assert_array_equal(banks_a[m], ref_a[m].astype(np.float16))
        np.testing.assert_array_equal(banks_b[m], ref_b[m].astype(np.float16))
    bad = [(0, tensors, "slot", 0), (4, tensors, "slot", 4),
           (1, {"lm_head": tensors["q_proj"]}, "tensors", ["lm_head"]),
           # A's rank columns and B's rows disagree (B is named), or A is wider than max_rank (8)
           (1, {**tensors, "v_proj": (tensors["v_proj"][0][:, :, :2], tensors["v_proj"][1])}, "tensors.v_proj",
            [LAYERS, 4, 32]),
           (1, {**tensors, "v_proj": (np.zeros((LAYERS, 64, 9)), np.zeros((LAYERS, 9, 32)))}, "tensors.v_proj",
            [LAYERS, 64, 9])]
    for slot, given, field, value in bad:
        with pytest.raises(InvalidArgument) as err:
            lora_bank.write_slot_tensors(banks_a, banks_b, slot, given)
        assert (err.value.field, err.value.value) == (field, value)
    for m in MODULES:  # every refused call left the banks as they were
        np.testing.assert_array_equal(banks_a[m], ref_a[m].astype(np.float16))

def test_slot_tensors_hold_only_the_modules_an_adapter_touches_and_a_reused_slot_loses_the_rest(adapter_dir):
    # A q/v adapter's slot tensors are q and v only (no slot of zeros per other module to allocate and write);
    # written over a slot that held an all-module adapter, every other module of that slot is zero again and the
    # neighbouring slots keep theirs.
    s = spec()
    ad = lora_bank.read_adapter("qv", adapter_dir)
    tensors = lora_bank.slot_tensors(ad, s)
    assert sorted(tensors) == ["q_proj", "v_proj"]
    ref_a, ref_b = lora_bank.empty_banks(s)
    lora_bank.write_slot(ref_a, ref_b, 1, ad, s)
    banks_a, banks_b = lora_bank.empty_banks(s)
    for m in MODULES:  # a previous adapter in slots 1 and 2
        banks_a[m][:, 1:3] = 0.5
        banks_b[m][:, 1:3] = 0.25
    lora_bank.write_slot_tensors(banks_a, banks_b, 1, tensors)
    for m in MODULES:
        np.testing.assert_array_equal(banks_a[m][:, 1], ref_a[m][:, 1])
        np.testing.assert_array_equal(banks_b[m][:, 1], ref_b[m][:, 1])
        assert (banks_a[m][:, 2] == 0.5).all() and (banks_b[m][:, 2] == 0.25).all()


def test_bf16_weights_are_read(adapter_dir):
    import torch
    from safetensors.torch import load_file as tload
    from safetensors.torch import save_file as tsave

    path = adapter_dir / "adapter_model.safetensors"
    tensors = {k: v.to(torch.bfloat16) for k, v in tload(str(path)).items()}
    tsave(tensors, str(path))
    ad = lora_bank.read_adapter("bf", adapter_dir)
    key = next(iter(tensors))
    layer = int(key.split(".layers.")[1].split(".")[0])
    module = key.split(".")[-3]
    a_or_b = 0 if ".lora_A." in key else 1
    np.testing.assert_array_equal(ad.weights[(layer, module)][a_or_b], tensors[key].float().numpy())


def test_lora_bank_does_not_import_torch():
    code = "import sys, loraflow.artifact.lora_bank, loraflow.artifact.manifest; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_write_told_what_the_slot_holds_zeroes_only_that_and_equals_a_fresh_write(adapter_dir, tmp_path):
    # held (what the previous write returned) replaces reading the slot: the wider adapter's columns past the
    # narrow one's rank and its modules the narrow one lacks are zero afterwards, as after a write into zeros.
    s = spec()
    narrow = lora_bank.slot_tensors(lora_bank.read_adapter("qv", adapter_dir), s)  # r=4, q and v
    assert all(a.shape[-1] == 4 and b.shape[1] == 4 for a, b in narrow.values())  # trimmed to the rank
    rng = np.random.default_rng(0)
    wide = {m: (rng.standard_normal((LAYERS, fin, 8)), rng.standard_normal((LAYERS, 8, fout)))
            for m, (fin, fout) in MODULES.items()}
    ref_a, ref_b = lora_bank.empty_banks(s)
    assert lora_bank.write_slot_tensors(ref_a, ref_b, 1, narrow) == {"q_proj": 4, "v_proj": 4}
    banks_a, banks_b = lora_bank.empty_banks(s)
    held = lora_bank.write_slot_tensors(banks_a, banks_b, 1, wide, held={})
    assert held == dict.fromkeys(MODULES, 8) and lora_bank.slot_rank(wide) == 8
    banks_a["q_proj"][:, 2] = 3.0  # a neighbour slot keeps its weights
    assert lora_bank.write_slot_tensors(banks_a, banks_b, 1, narrow, held=held) == {"q_proj": 4, "v_proj": 4}
    for m in MODULES:
        np.testing.assert_array_equal(banks_a[m][:, 1], ref_a[m][:, 1])
        np.testing.assert_array_equal(banks_b[m][:, 1], ref_b[m][:, 1])
    assert (banks_a["q_proj"][:, 2] == 3.0).all()
    assert lora_bank.slot_rank(narrow) == 4
    assert lora_bank.slot_rank({"q_proj": (np.zeros((LAYERS, 64, 8)), np.zeros((LAYERS, 8, 64)))}) == 0
    last_b_row = np.zeros((LAYERS, 8, 64))
    last_b_row[1, 5, 3] = 1.0  # only B's row 5 of one layer: rank 6
    assert lora_bank.slot_rank({"q_proj": (np.zeros((LAYERS, 64, 8)), last_b_row)}) == 6
    assert lora_bank.used_rank(np.zeros((LAYERS, 64, 8)), last_b_row) == 6


def test_reading_without_the_digest_reads_the_same_weights(adapter_dir):
    with_digest = lora_bank.read_adapter("qv", adapter_dir)
    without = lora_bank.read_adapter("qv", adapter_dir, digest=False)
    assert without.digest == "" and len(with_digest.digest) == 64
    assert with_digest.weights.keys() == without.weights.keys()
    for key, (a, b) in with_digest.weights.items():
        np.testing.assert_array_equal(a, without.weights[key][0])
        np.testing.assert_array_equal(b, without.weights[key][1])
