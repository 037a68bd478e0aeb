"""Adapter records cached in the inference service and invalidated by Redis (CLIENT TRACKING, BCAST)."""

from __future__ import annotations

from contextlib import contextmanager

import redis
from prometheus_client import REGISTRY

from loraflow.jobs.registry import AdapterRecord, Registry
from services.inference.registry_cache import CachedAdapterRecords
from tests.support.polling import wait_for


def wait_until(condition) -> None:
    wait_for(condition, timeout=20.0)


@contextmanager
def tracked(redis_url: str, names: tuple[str, ...] = ("a",), **kwargs):
    """(a client, its Registry with `names` registered, CachedAdapterRecords over another client, tracking)."""
    client = redis.Redis.from_url(redis_url)
    registry = Registry(client)
    for name in names:
        registry.put_adapter(AdapterRecord(name=name, uri=f"s3://b/{name}-v1", base_model="m"))
    records = CachedAdapterRecords(Registry(redis.Redis.from_url(redis_url)), **kwargs)
    try:
        wait_until(lambda: records.tracking)
        yield client, registry, records
    finally:
        records.close()


def hgets(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_hget", {}).get("calls", 0))


def test_a_repeated_lookup_costs_no_redis_round_trip_and_a_write_is_seen(redis_url):
    with tracked(redis_url) as (client, registry, records):
        assert records.find_adapter("a").uri == "s3://b/a-v1"
        before = hgets(client)
        for _ in range(50):
            assert records.find_adapter("a").uri == "s3://b/a-v1"
        assert hgets(client) == before and records.hits >= 50

        # Re-registered by another client (the trainer): the copy is dropped, the new record served.
        registry.put_adapter(AdapterRecord(name="a", uri="s3://b/a-v2", base_model="m"))
        wait_until(lambda: records.find_adapter("a").uri == "s3://b/a-v2")
        # A lookup may see v2 before the listener reads the invalidation (it goes to Redis while one is pending on
        # the socket); the invalidation itself arrives all the same.
        wait_until(lambda: records.invalidations >= 1)
        # An unknown name is never cached: registered a moment later, it resolves at once.
        assert records.find_adapter("b") is None
        registry.put_adapter(AdapterRecord(name="b", uri="s3://b/b", base_model="m"))
        assert records.find_adapter("b").uri == "s3://b/b"
        registry.delete_adapter("a")
        wait_until(lambda: records.find_adapter("a") is None)


def test_without_its_invalidation_connection_nothing_is_served_from_the_copy(redis_url):
    with tracked(redis_url) as (client, registry, records):
        records.find_adapter("a")
        # The subscriber dies (a Redis restart, a proxy): lookups go to Redis until tracking is back.
        client.client_kill_filter(_type="pubsub")
        registry.put_adapter(AdapterRecord(name="a", uri="s3://b/a-v2", base_model="m"))
        wait_until(lambda: records.find_adapter("a").uri == "s3://b/a-v2")
        wait_until(lambda: records.tracking)  # reconnected, and the copy starts empty
        assert records.find_adapter("a").uri == "s3://b/a-v2"
        before = hgets(client)
        assert records.find_adapter("a").uri == "s3://b/a-v2" and hgets(client) == before
    assert not records.tracking


def test_the_copy_is_bounded(redis_url):
    with tracked(redis_url, tuple(f"a{i}" for i in range(6)), max_records=4) as (_, _, records):
        for i in range(6):
            records.find_adapter(f"a{i}")
        assert len(records._records) == 4 and "a0" not in records._records and "a5" in records._records


def lookups(result: str) -> float:
    return REGISTRY.get_sample_value("loraflow_inference_registry_lookups_total", {"result": result}) or 0.0


def test_lookups_are_counted_on_metrics_by_where_they_were_answered(redis_url):
    with tracked(redis_url, ("a", "b")) as (client, _, records):
        hits, reads, hget = lookups("cache_hit"), lookups("redis"), hgets(client)
        # Zipf-like: a hot name asked 8 times, a cold one twice, an unknown name twice (never cached).
        for name in ["a"] * 8 + ["b"] * 2 + ["nope"] * 2:
            records.find_adapter(name)
        # First sight of a and b, and both unknown lookups, went to Redis (one HGET each); the rest were hits.
        assert lookups("redis") - reads == 4 == hgets(client) - hget
        assert lookups("cache_hit") - hits == 8
        assert (records.hits, records.misses) == (8, 4)
