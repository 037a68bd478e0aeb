"""The client sends absolute paths: services run in another working directory."""

from __future__ import annotations

from loraflow.client import absolute_local_path
from loraflow.storage.model_source import is_location


def test_relative_paths_that_exist_become_absolute(tmp_path, monkeypatch):
    (tmp_path / "data.jsonl").write_text("{}\n")
    (tmp_path / "base").mkdir()
    monkeypatch.chdir(tmp_path)
    assert absolute_local_path("data.jsonl") == str(tmp_path / "data.jsonl")
    assert absolute_local_path("./base") == str(tmp_path / "base")


def test_uris_and_missing_paths_are_sent_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for value in ("s3://bucket/models/base", "file:///srv/base", "missing/dir", ""):
        assert absolute_local_path(value) == value


def test_registered_names_are_not_paths():
    assert not is_location("badge") and not is_location("vex-v1.2")
    for value in ("./badge", "adapters/badge", "~/badge", "s3://b/badge"):
        assert is_location(value), value
