"""Fixtures every suite shares: a real redis-server, tiny random checkpoints."""

from __future__ import annotations

import pytest
import redis

from loraflow.jobs.embedded_redis import EmbeddedRedis
from tests.support.tiny_models import make_tiny_model_dir


@pytest.fixture(scope="session")
def redis_server():
    server = EmbeddedRedis()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    """URL of the session's real redis-server, emptied before each test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def allowed_root(tmp_path_factory) -> str:
    """The one directory tests let services read local paths under (as `--allow-local-paths` does):
    the session's temporary directory, where tiny models, adapters and datasets live."""
    return str(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def input_policy(allowed_root):
    """The InputPolicy in-process servicers and handlers get in tests: local paths under allowed_root only."""
    from loraflow.security.local_paths import LocalPathPolicy
    from loraflow.storage.model_source import InputPolicy

    return InputPolicy(LocalPathPolicy((allowed_root,)))


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """tiny_model_factory(arch="llama", seed=0) -> Path of a saved random checkpoint (cached)."""
    cache: dict[tuple[str, int], object] = {}

    def make(arch: str = "llama", seed: int = 0):
        key = (arch, seed)
        if key not in cache:
            cache[key] = make_tiny_model_dir(tmp_path_factory.mktemp(f"tiny-{arch}-{seed}"), arch, seed=seed)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory):
    return tiny_model_factory("llama")
