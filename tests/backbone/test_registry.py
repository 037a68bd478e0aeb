import pytest
import redis

from loraflow.errors import InvalidArgument, NotFound
from loraflow.jobs.registry import AdapterRecord, ArtifactAdapterRecord, ArtifactRecord, Registry


@pytest.fixture
def reg(redis_url):
    return Registry(redis.Redis.from_url(redis_url))


def test_adapters_put_get_list_delete(reg):
    for i in range(5):
        reg.put_adapter(AdapterRecord(name=f"a{i}", uri=f"file:///s/a{i}", base_model="tiny",
                                      lora={"r": 4, "target_modules": ["q_proj"]}, metrics={"loss": 1.0 / (i + 1)},
                                      create_time=1000.0 + i))
    got = reg.get_adapter("a2")
    assert got.lora == {"r": 4, "target_modules": ["q_proj"]} and got.metrics == {"loss": 1.0 / 3}
    names, token = [], ""
    while True:
        page, token = reg.list_adapters(page_size=2, page_token=token)
        names += [a.name for a in page]
        if not token:
            break
    assert names == ["a4", "a3", "a2", "a1", "a0"]
    assert reg.delete_adapter("a2").name == "a2"
    with pytest.raises(NotFound) as info:
        reg.get_adapter("a2")
    assert info.value.field == "name"
    with pytest.raises(NotFound):
        reg.delete_adapter("a2")
    assert [a.name for a in reg.list_adapters(page_size=10)[0]] == ["a4", "a3", "a1", "a0"]


def test_writes_join_a_transaction(reg):
    pipe = reg.redis.pipeline()
    pipe.multi()
    reg.put_adapter(AdapterRecord(name="tx", uri="file:///tx", base_model="b"), pipe=pipe)
    assert reg.find_adapter("tx") is None  # nothing lands before EXEC
    pipe.execute()
    assert reg.get_adapter("tx").uri == "file:///tx"


def test_artifacts_round_trip(reg):
    rec = ArtifactRecord(artifact_id="sha256-" + "ab" * 32, uri="file:///art", base_model="tiny",
                         adapters=[{"slot": 1, "name": "a", "digest": "d", "r": 8}], options={"ctx_len": 64},
                         size_bytes=123, architecture="llama")
    reg.put_artifact(rec)
    got = reg.get_artifact(rec.artifact_id)
    assert got == rec and got.adapters == (ArtifactAdapterRecord(1, "a", "d", 8),)
    assert [a.artifact_id for a in reg.list_artifacts()[0]] == [rec.artifact_id]
    reg.delete_artifact(rec.artifact_id)
    assert reg.find_artifact(rec.artifact_id) is None


def test_validation(reg):
    with pytest.raises(InvalidArgument):
        AdapterRecord(name="../x", uri="u", base_model="b")
    with pytest.raises(InvalidArgument):
        reg.get_adapter("")
    with pytest.raises(InvalidArgument) as info:
        reg.list_adapters(page_size=0)
    assert info.value.field == "page_size"
    with pytest.raises(InvalidArgument) as info:
        reg.list_artifacts(page_token="%%%")
    assert info.value.field == "page_token"
