"""The local artifact cache: warm reuse, sha256 checks, one refetch of a corrupt copy, clear failure."""

from __future__ import annotations

import pytest

from loraflow.errors import IntegrityError
from loraflow.storage.store import open_store
from services.inference.artifact_cache import ArtifactCache


def test_fetch_reuse_refetch_and_fail(tiny_artifact, tmp_path):
    artifact_dir, manifest = tiny_artifact
    store = open_store((tmp_path / "store").as_uri())
    uri = store.publish_dir(f"artifacts/{manifest.artifact_id}", artifact_dir)
    cache = ArtifactCache(tmp_path / "cache", store)

    path, got = cache.fetch(manifest.artifact_id, uri)
    assert got.artifact_id == manifest.artifact_id and cache.fetches == 1
    assert cache.fetch(manifest.artifact_id, uri)[0] == path and cache.fetches == 1  # warm: no download

    # A file corrupted in the cache is detected by its sha256 and fetched again.
    victim = path / manifest.graph.file
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    cache.fetch(manifest.artifact_id, uri)
    assert cache.fetches == 2 and victim.read_bytes() != bytes(data)

    # Corrupt at the source too: the refetch cannot help, the load fails naming the file.
    stored = store.path(f"artifacts/{manifest.artifact_id}/{manifest.graph.file}")
    stored.write_bytes(bytes(data))
    victim.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as err:
        cache.fetch(manifest.artifact_id, uri)
    assert manifest.graph.file in str(err.value)
    assert not path.exists()


def test_a_record_pointing_outside_the_stores_artifacts_is_refused_and_nothing_is_read(tiny_artifact, tmp_path):
    import shutil

    from loraflow.errors import FailedPrecondition

    artifact_dir, manifest = tiny_artifact
    store = open_store((tmp_path / "store").as_uri())
    store.publish_dir(f"artifacts/{manifest.artifact_id}", artifact_dir)
    elsewhere = open_store((tmp_path / "elsewhere").as_uri())
    planted = elsewhere.publish_dir(f"artifacts/{manifest.artifact_id}", artifact_dir)  # a complete, valid copy
    shutil.copytree(artifact_dir, tmp_path / "loose")
    cache = ArtifactCache(tmp_path / "cache", store)
    own = store.uri(f"artifacts/{manifest.artifact_id}")
    for uri in (planted, str(tmp_path / "loose"), (tmp_path / "loose").as_uri(), own + "/../../elsewhere",
                store.uri("artifacts/other-id"), "s3://someone-elses-bucket/artifacts/" + manifest.artifact_id):
        with pytest.raises(FailedPrecondition) as err:
            cache.fetch(manifest.artifact_id, uri)
        assert err.value.metadata["field"] == "artifact_id", uri
    assert cache.fetches == 0 and not cache.path(manifest.artifact_id).exists()
    assert cache.fetch(manifest.artifact_id, own)[1].artifact_id == manifest.artifact_id
