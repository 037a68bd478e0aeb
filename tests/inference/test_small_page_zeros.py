"""Adapter banks on small pages: a slot write commits the pages it writes, not the 2 MiB around each block."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from loraflow.artifact.small_page_zeros import small_page_zeros
from services.inference.adapter_slots import AdapterSlots

SMAPS = Path("/proc/self/smaps")
needs_smaps = pytest.mark.skipif(not SMAPS.exists(), reason="no /proc/self/smaps on this platform")


def _mapping(array: np.ndarray) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping that holds ``array``'s first byte."""
    address = array.__array_interface__["data"][0]
    fields: dict[str, str] | None = None
    for line in SMAPS.read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's first line: "start-end perms ..."
            start, end = (int(x, 16) for x in head.split("-"))
            if fields is not None:
                return fields
            if start <= address < end:
                fields = {}
        elif fields is not None:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    assert fields is not None, f"no mapping holds {address:#x}"
    return fields


def test_zeroed_writable_contiguous_and_empty_shapes_work():
    a = small_page_zeros((3, 5, 7), np.float16)
    assert a.shape == (3, 5, 7) and a.dtype == np.float16 and a.flags.c_contiguous and a.flags.writeable
    assert not a.any()
    view = a.reshape(15, 7)  # the runtime binds flat views: they alias the same memory
    view[4, 2] = 1.5
    assert a[0, 4, 2] == np.float16(1.5) and a.sum() == np.float16(1.5)
    empty = small_page_zeros((0, 4))
    assert empty.shape == (0, 4) and empty.dtype == np.float32


@needs_smaps
def test_sparse_writes_commit_only_the_small_pages_written():
    a = small_page_zeros((64 << 20) // 4, np.float32)  # 64 MiB, the size numpy would ask huge pages for
    fields = _mapping(a)
    assert "nh" in fields["VmFlags"].split()  # MADV_NOHUGEPAGE, whatever the host's THP mode
    a[:: (2 << 20) // 4] = 1.0  # one float in each 2 MiB: 32 writes
    rss_kib = int(_mapping(a)["Rss"].split()[0])
    assert rss_kib <= 32 * 4 * 2, f"{rss_kib} KiB resident for 32 one-float writes"  # 2 MiB pages: 65536 KiB


@needs_smaps
def test_adapter_slot_banks_are_on_small_pages():
    modules = {"q_proj": SimpleNamespace(in_features=64, out_features=64),
               "down_proj": SimpleNamespace(in_features=128, out_features=64)}
    manifest = SimpleNamespace(artifact_id="art", adapter_slots=300, max_rank=16,
                               graph=SimpleNamespace(layers=4, lora_modules=modules),
                               base_model=SimpleNamespace(architecture="LlamaForCausalLM"))
    slots = AdapterSlots(manifest, np.dtype(np.float32))
    for bank in list(slots.lora_a.values()) + list(slots.lora_b.values()):
        assert "nh" in _mapping(bank)["VmFlags"].split()
        assert not bank.any()
