import pytest

from loraflow.errors import InvalidArgument
from loraflow.options.config import Settings, connect_redis


def test_from_env_reads_variables_and_overrides_win(tmp_path):
    env = {"LORAFLOW_REDIS_URL": "redis://h:1/0", "LORAFLOW_STORE_URL": "s3://b/p",
           "LORAFLOW_CACHE_DIR": str(tmp_path)}
    s = Settings.from_env(env)
    assert (s.redis_url, s.store_url, s.cache_dir) == ("redis://h:1/0", "s3://b/p", str(tmp_path))
    s2 = Settings.from_env(env, store_url="file:///x", redis_url=None)
    assert s2.store_url == "file:///x" and s2.redis_url == "redis://h:1/0"


def test_defaults_are_laptop_friendly():
    s = Settings.from_env({})
    assert s.redis_url is None
    assert s.store_url.startswith("file://") and s.store_url.endswith("/.loraflow/store")
    assert s.cache_dir.endswith("/.loraflow/cache")


@pytest.mark.parametrize("kw, field", [({"redis_url": "http://x"}, "redis_url"), ({"store_url": "gs://b"}, "store_url"),
                                       ({"cache_dir": ""}, "cache_dir")])
def test_bad_settings_name_the_field(kw, field):
    with pytest.raises(InvalidArgument) as info:
        Settings(**kw)
    assert info.value.field == field


def test_connect_redis(redis_url):
    assert connect_redis(Settings(redis_url=redis_url)).ping()
    with pytest.raises(InvalidArgument):
        connect_redis(Settings())
    with pytest.raises(TypeError):
        Settings.from_env({}, nope=1)
