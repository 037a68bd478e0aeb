"""The host cache of evicted adapters: bounded by bytes, least recently used out first."""

from __future__ import annotations

import numpy as np
import pytest

from loraflow.errors import InvalidArgument
from services.inference.adapter_cache import CachedAdapter, HostAdapterCache


def entry(fill: float, nbytes: int = 1000) -> CachedAdapter:
    half = np.full(nbytes // 8, fill, np.float32)  # two float32 arrays of nbytes/2 each
    return CachedAdapter({"q_proj": (half, half.copy())}, rank=4)


def test_bounded_by_bytes_and_least_recently_used_goes_first():
    cache = HostAdapterCache(max_bytes=2500)
    cache.put(("art", "a", "s3://b/a"), entry(1))
    cache.put(("art", "b", "s3://b/b"), entry(2))
    assert cache.get(("art", "a", "s3://b/a")) is not None  # a is now the most recently used
    assert cache.put(("art", "c", "s3://b/c"), entry(3)) == 1  # 3000 bytes > 2500: b (least recent) goes
    assert cache.get(("art", "b", "s3://b/b")) is None
    assert cache.get(("art", "a", "s3://b/a")).tensors["q_proj"][0][0] == 1
    assert len(cache) == 2 and cache.nbytes == 2000
    # A re-registered adapter (new source) is another entry; the old copy is never served for it.
    assert cache.get(("art", "a", "s3://b/a-v2")) is None
    # Replacing a key does not double-count; an entry larger than the bound is not kept.
    cache.put(("art", "a", "s3://b/a"), entry(5))
    assert cache.nbytes == 2000 and cache.get(("art", "a", "s3://b/a")).tensors["q_proj"][0][0] == 5
    cache.put(("art", "huge", "x"), entry(9, nbytes=4000))
    assert cache.get(("art", "huge", "x")) is None and cache.nbytes == 2000
    cache.forget_artifact("art")
    assert len(cache) == 0 and cache.nbytes == 0
    off = HostAdapterCache(max_bytes=0)
    off.put(("art", "a", "x"), entry(1))
    assert off.get(("art", "a", "x")) is None


@pytest.mark.parametrize("bad", [-1, 2**41, 1.5, True, "1"])
def test_bound_outside_its_range_is_refused_naming_the_field(bad):
    with pytest.raises(InvalidArgument) as err:
        HostAdapterCache(max_bytes=bad)
    assert err.value.field == "adapter_cache_bytes"
