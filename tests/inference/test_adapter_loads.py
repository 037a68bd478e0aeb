"""A first-use load's bank contents: exact after a store load, rank-trimmed in the host cache, bit for bit after
eviction and reload, nothing written from a corrupted store object."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import save_file

from loraflow.errors import IntegrityError
from loraflow.storage.store import FileStore
from services.inference.adapter_cache import HostAdapterCache
from services.inference.adapter_slots import AdapterSlots
from services.inference.on_demand_adapters import AdapterOrigin, OnDemandAdapters

LAYERS, MAX_RANK = 3, 16
SHAPES = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32),
          "gate_proj": (32, 48), "up_proj": (32, 48), "down_proj": (48, 32)}
BLOCK = {m: "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn" for m in SHAPES}


def write_adapter(out: Path, rank: int, targets, seed: int, rank_pattern: dict | None = None,
                  skip: frozenset = frozenset()) -> dict:
    """A PEFT adapter dir (fp16, alpha 2r) without the (layer, module) weights in ``skip``; returns the reference
    slot: module -> (A^T [L, in, R], B^T*s [L, R, out])."""
    rng = np.random.default_rng(seed)
    tensors, ref = {}, {}
    for module in targets:
        fin, fout = SHAPES[module]
        a_ref = np.zeros((LAYERS, fin, MAX_RANK), np.float32)
        b_ref = np.zeros((LAYERS, MAX_RANK, fout), np.float32)
        for layer in range(LAYERS):
            if (layer, module) in skip:
                continue
            r = (rank_pattern or {}).get(f"layers.{layer}.{BLOCK[module]}.{module}", rank)
            a = rng.standard_normal((r, fin)).astype(np.float16)
            b = rng.standard_normal((fout, r)).astype(np.float16)
            key = f"base_model.model.model.layers.{layer}.{BLOCK[module]}.{module}"
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
            a_ref[layer, :, :r] = a.astype(np.float32).T
            b_ref[layer, :r, :] = b.astype(np.float32).T * np.float32(2 * rank / r)
        ref[module] = (a_ref, b_ref)
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
        "target_modules": list(targets), "rank_pattern": rank_pattern or {}}))
    return ref


class _Runtime:
    def __init__(self, slots: AdapterSlots):
        self.adapters = slots

    def acquire_adapter(self, name: str) -> int:
        return self.adapters.acquire(name)


@pytest.fixture
def loader(tmp_path):
    """(adapters, store, publish(name, rank, targets, seed, rank_pattern) -> reference slot), one slot."""
    modules = {m: SimpleNamespace(in_features=i, out_features=o) for m, (i, o) in SHAPES.items()}
    manifest = SimpleNamespace(artifact_id="art", adapter_slots=1, max_rank=MAX_RANK,
                               graph=SimpleNamespace(layers=LAYERS, lora_modules=modules),
                               base_model=SimpleNamespace(architecture="LlamaForCausalLM"))
    slots = AdapterSlots(manifest, np.dtype(np.float32))
    store = FileStore(tmp_path / "store")

    def resolve(name: str) -> AdapterOrigin:
        key = f"adapters/{name}"
        return AdapterOrigin(store.uri(key), lambda: store.fetch_dir(key, tmp_path / "local" / name), "store")

    adapters = OnDemandAdapters(_Runtime(slots), model_id="m", artifact_id="art", resolve=resolve,
                                cache=HostAdapterCache(1 << 30))

    def publish(name: str, rank: int, targets, seed: int, rank_pattern: dict | None = None,
                skip: frozenset = frozenset()) -> dict:
        ref = write_adapter(tmp_path / "src" / name, rank, targets, seed, rank_pattern, skip)
        store.publish_dir(f"adapters/{name}", tmp_path / "src" / name, progress=False)
        return ref

    return adapters, store, publish


def slot_state(slots: AdapterSlots, slot: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {m: (slots.lora_a[m][:, slot].copy(), slots.lora_b[m][:, slot].copy()) for m in slots.lora_a}


def assert_slot_is(slots: AdapterSlots, slot: int, ref: dict) -> None:
    for m in slots.lora_a:
        a_ref, b_ref = ref.get(m, (0, 0))
        np.testing.assert_array_equal(slots.lora_a[m][:, slot], np.broadcast_to(a_ref, slots.lora_a[m][:, slot].shape))
        np.testing.assert_array_equal(slots.lora_b[m][:, slot], np.broadcast_to(b_ref, slots.lora_b[m][:, slot].shape))
    assert not any(slots.lora_a[m][:, 0].any() or slots.lora_b[m][:, 0].any() for m in slots.lora_a)  # base slot


def load(adapters: OnDemandAdapters, name: str) -> int:
    slot = adapters.acquire_adapter(name)
    adapters.slots.release(slot)
    return slot


def test_a_store_load_writes_exactly_the_scaled_transposed_weights(loader):
    # Written over an all-linear rank-16 adapter: q_proj's layer 0 at rank 2 by rank_pattern (scaling alpha/2)
    # and down_proj without layer 1 leave nothing of the previous adapter past their own columns.
    adapters, _, publish = loader
    first = publish("first", 16, tuple(SHAPES), seed=5)
    ref = publish("a", 8, ("q_proj", "v_proj", "down_proj"), seed=1,
                  rank_pattern={"layers.0.self_attn.q_proj": 2}, skip=frozenset({(1, "down_proj")}))
    slot = load(adapters, "first")
    assert_slot_is(adapters.slots, slot, first)
    assert load(adapters, "a") == slot
    assert_slot_is(adapters.slots, slot, ref)
    assert adapters.slots.ranks[slot] == 8
    assert load(adapters, "first") == slot  # from the host cache
    assert_slot_is(adapters.slots, slot, first)
    assert load(adapters, "a") == slot
    assert_slot_is(adapters.slots, slot, ref)


def test_an_evicted_adapter_is_cached_rank_trimmed_and_comes_back_bit_for_bit(loader):
    adapters, _, publish = loader
    wide = publish("wide", 16, tuple(SHAPES), seed=2)
    narrow = publish("narrow", 4, ("q_proj", "v_proj"), seed=3)
    slot = load(adapters, "wide")
    before = slot_state(adapters.slots, slot)
    assert load(adapters, "narrow") == slot  # one slot: "wide" leaves it for the host cache
    cached = adapters.cache.get(("art", "wide", adapters._resolve("wide").source))
    assert cached.rank == 16 and sorted(cached.tensors) == sorted(SHAPES)
    for m, (a, b) in cached.tensors.items():  # the columns it used, nothing more
        assert a.shape == (LAYERS, SHAPES[m][0], 16) and b.shape == (LAYERS, 16, SHAPES[m][1])
    assert_slot_is(adapters.slots, slot, narrow)  # every column and module of "wide" is zero again
    assert adapters.slots.ranks[slot] == 4
    assert load(adapters, "wide") == slot  # from the host cache, "narrow" going to it
    for m, (a, b) in slot_state(adapters.slots, slot).items():
        assert a.tobytes() == before[m][0].tobytes() and b.tobytes() == before[m][1].tobytes()
    assert adapters.slots.ranks[slot] == 16
    small = adapters.cache.get(("art", "narrow", adapters._resolve("narrow").source)).tensors
    assert sorted(small) == ["q_proj", "v_proj"] and all(a.shape[-1] == 4 for a, _ in small.values())
    assert load(adapters, "narrow") == slot
    assert_slot_is(adapters.slots, slot, narrow)
    assert load(adapters, "wide") == slot
    assert_slot_is(adapters.slots, slot, wide)


def test_a_corrupted_store_object_is_refused_and_leaves_the_slot_free(loader, tmp_path):
    adapters, store, publish = loader
    publish("bad", 4, ("q_proj",), seed=4)
    weights = store.path("adapters/bad/adapter_model.safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of the last weight
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="adapter_model.safetensors"):
        adapters.acquire_adapter("bad")
    assert adapters.slots.slots[1] is None and adapters.slots.ranks[1] == 0
    assert not any(b.any() for b in (*adapters.slots.lora_a.values(), *adapters.slots.lora_b.values()))
    assert len(adapters.cache) == 0
