import json
import os
from pathlib import Path

import pytest

from loraflow.errors import IntegrityError, InvalidArgument, NotFound
from loraflow.storage.store import MANIFEST_NAME, FileStore, S3Store, open_store, resolve


def _make_dir(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "adapter_config.json").write_text('{"r": 4}')
    (root / "sub" / "weights.bin").write_bytes(os.urandom(300_000))
    (root / "empty.txt").write_bytes(b"")
    return root


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME}


@pytest.fixture
def file_store(tmp_path):
    return open_store((tmp_path / "store").as_uri())


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return open_store((tmp_path / "store").as_uri())
    return request.getfixturevalue("s3_store")


def test_round_trip_dir_and_bytes(store, tmp_path):
    src = _make_dir(tmp_path / "src")
    uri = store.publish_dir("adapters/a1", src)
    assert uri == store.uri("adapters/a1")
    assert store.exists("adapters/a1") and store.dir_exists("adapters/a1")
    assert store.list_dirs("adapters") == ["adapters/a1"]
    manifest = store.read_manifest("adapters/a1")
    assert set(manifest["files"]) == {"adapter_config.json", "sub/weights.bin", "empty.txt"}
    out = store.fetch_dir("adapters/a1", tmp_path / "out")
    assert _tree(out) == _tree(src)

    store.put_bytes("blobs/x.json", b'{"a": 1}')
    assert store.get_bytes("blobs/x.json") == b'{"a": 1}'
    assert store.exists("blobs/x.json")
    assert "blobs/x.json" in store.list("blobs")
    assert store.list("blob") == []  # a path prefix, not a string prefix

    # Republishing replaces the directory; stale files go away.
    (src / "empty.txt").unlink()
    (src / "adapter_config.json").write_text('{"r": 8}')
    store.publish_dir("adapters/a1", src)
    out2 = store.fetch_dir("adapters/a1", tmp_path / "out2")
    assert _tree(out2) == _tree(src)
    assert "adapters/a1/empty.txt" not in store.list("adapters/a1")

    assert store.delete("adapters/a1") >= 3
    assert not store.exists("adapters/a1")
    assert store.list("adapters/a1") == []
    with pytest.raises(NotFound):
        store.get_bytes("adapters/a1/adapter_config.json")
    with pytest.raises(NotFound):
        store.fetch_dir("adapters/a1", tmp_path / "out3")


def test_dir_without_manifest_is_invisible(store, tmp_path):
    store.put_bytes("adapters/half/adapter_model.safetensors", b"partial upload")
    assert not store.exists("adapters/half")
    assert store.list_dirs("adapters") == []
    with pytest.raises(NotFound):
        store.fetch_dir("adapters/half", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corruption_is_detected_on_fetch(store, tmp_path):
    src = _make_dir(tmp_path / "src")
    store.publish_dir("artifacts/z", src)
    # Same size, different bytes: only the checksum can tell.
    data = bytearray(store.get_bytes("artifacts/z/sub/weights.bin"))
    data[1000] ^= 0xFF
    store.put_bytes("artifacts/z/sub/weights.bin", bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        store.fetch_dir("artifacts/z", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # A missing blob is corruption too.
    store.publish_dir("artifacts/y", src)
    store.delete("artifacts/y/adapter_config.json")
    with pytest.raises(IntegrityError, match="missing"):
        store.fetch_dir("artifacts/y", tmp_path / "out")


def test_fetch_skips_when_cache_matches_and_replaces_when_not(file_store, tmp_path):
    src = _make_dir(tmp_path / "src")
    file_store.publish_dir("a", src)
    out = file_store.fetch_dir("a", tmp_path / "cache" / "a")
    marker = out / "sub" / "weights.bin"
    mtime = marker.stat().st_mtime_ns
    file_store.fetch_dir("a", out)
    assert marker.stat().st_mtime_ns == mtime
    (src / "adapter_config.json").write_text("changed")
    file_store.publish_dir("a", src)
    file_store.fetch_dir("a", out)
    assert (out / "adapter_config.json").read_text() == "changed"


def test_file_store_publish_leaves_no_staging(file_store, tmp_path):
    src = _make_dir(tmp_path / "src")
    file_store.publish_dir("a/b", src)
    names = [p.name for p in (file_store.root / "a").iterdir()]
    assert names == ["b"]
    assert json.loads((file_store.root / "a" / "b" / MANIFEST_NAME).read_text())["version"] == 1


@pytest.mark.parametrize("key", ["", "/abs", "../x", "a/../../x", "a//b", "./a", "a/./b", "a\\b", "a\x00b",
                                 ".tmp-x", "k" * 2000])
def test_keys_cannot_escape(file_store, key):
    with pytest.raises(InvalidArgument) as info:
        file_store.put_bytes(key, b"x")
    assert info.value.metadata["field"] == "key"
    assert not any(file_store.root.parent.glob("x"))


def test_resolve_uris(tmp_path, monkeypatch):
    default = FileStore(tmp_path / "store")
    store, key = resolve((tmp_path / "store" / "datasets" / "d.jsonl").as_uri(), default)
    assert store is default and key == "datasets/d.jsonl"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "my data.jsonl").write_text("{}")
    store, key = resolve(str(tmp_path / "elsewhere" / "my data.jsonl"), default)
    assert store.get_bytes(key) == b"{}"
    monkeypatch.chdir(tmp_path)
    store, key = resolve("elsewhere/my data.jsonl", default)
    assert store.get_bytes(key) == b"{}"
    store, key = resolve("s3://bucket-a/p/q/r", None)
    assert isinstance(store, S3Store) and (store.bucket, key) == ("bucket-a", "p/q/r")
    for bad in ["", "http://x/y", "s3://", "s3://bucket", "s3://b/../x", "ftp://h/f"]:
        with pytest.raises(InvalidArgument) as info:
            resolve(bad, default, field="dataset_uri")
        assert info.value.metadata["field"] == "dataset_uri"


def test_resolve_reuses_default_s3_store(s3_store):
    store, key = resolve(s3_store.uri("adapters/x"), s3_store)
    assert store is s3_store and key == "adapters/x"


def test_open_store_rejects_bad_urls():
    for bad in ["", "gs://b/p", "file://host/dir"]:
        with pytest.raises(InvalidArgument):
            open_store(bad)


def test_progress_bar_when_asked(file_store, tmp_path, capsys):
    src = _make_dir(tmp_path / "src")
    file_store.publish_dir("p", src, progress=True)
    file_store.fetch_dir("p", tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    assert "publish p" in err and "fetch p" in err
    assert _tree(tmp_path / "out") == _tree(src)
