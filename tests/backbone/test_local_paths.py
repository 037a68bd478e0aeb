"""The confinement rules themselves: allowed roots, bounded reads of regular files, trees without escaping
links, store keys that cannot leave the store. The same rules through the real servicers are tested in
tests/trainer/test_confined_inputs.py and tests/compiler/test_confined_inputs.py."""

from __future__ import annotations

import os
import threading

import pytest

from loraflow.errors import InvalidArgument, PermissionDenied
from loraflow.security.local_paths import LocalPathPolicy
from loraflow.security.safe_files import check_tree, read_regular_file
from loraflow.storage.model_source import InputPolicy
from loraflow.storage.store import FileStore, S3Store

MARKER = "SECRET-MARKER-7f3a91"


@pytest.fixture
def layout(tmp_path):
    """allowed/ (the root), outside/secret.txt (holding MARKER), and links from inside to outside."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_text(MARKER + "\n")
    (allowed / "ok.jsonl").write_text('{"text": "hi"}\n')
    (allowed / "escape").symlink_to(outside / "secret.txt")
    (allowed / "escape_dir").symlink_to(outside)
    return allowed, outside


def test_paths_under_a_root_are_accepted_resolved(layout):
    allowed, _ = layout
    policy = LocalPathPolicy((str(allowed),))
    assert policy.check(str(allowed / "ok.jsonl"), field="dataset_uri") == allowed / "ok.jsonl"
    assert policy.check(str(allowed / "sub" / ".." / "ok.jsonl"), field="dataset_uri") == allowed / "ok.jsonl"


@pytest.mark.parametrize("rel", ["../outside/secret.txt", "escape", "escape_dir/secret.txt", "../outside/missing"])
def test_dotdot_and_symlinks_cannot_leave_a_root(layout, rel):
    allowed, _ = layout
    given = f"{allowed}/{rel}"
    with pytest.raises(PermissionDenied) as e:
        LocalPathPolicy((str(allowed),)).check(given, field="dataset_uri")
    assert e.value.field == "dataset_uri" and e.value.metadata["value"] == given
    assert given in e.value.message and MARKER not in e.value.message


def test_missing_and_forbidden_paths_get_the_same_message(layout):
    allowed, outside = layout
    policy = LocalPathPolicy((str(allowed),))
    messages = []
    for path in (outside / "secret.txt", outside / "no-such-file"):
        with pytest.raises(PermissionDenied) as e:
            policy.check(str(path), field="base_model")
        messages.append(e.value.message.replace(str(path), "<path>"))
    assert messages[0] == messages[1]


def test_no_roots_refuses_everything_and_names_the_flag(layout):
    allowed, _ = layout
    with pytest.raises(PermissionDenied) as e:
        LocalPathPolicy().check(str(allowed / "ok.jsonl"), field="dataset_uri")
    assert "--allow-local-paths" in e.value.message and "LORAFLOW_ALLOW_LOCAL_PATHS" in e.value.message


@pytest.mark.parametrize("path", ["/proc/self/environ", "/proc/self/mem", "/sys/kernel/notes", "/dev/zero",
                                  "/dev/../proc/self/environ"])
def test_kernel_and_device_trees_are_refused_even_under_root_slash(path):
    with pytest.raises(PermissionDenied, match="never read"):
        LocalPathPolicy(("/",)).check(path, field="dataset_uri")


def test_roots_must_be_absolute():
    with pytest.raises(InvalidArgument) as e:
        LocalPathPolicy(("relative/dir",))
    assert e.value.field == "allow_local_paths"


def test_the_store_directory_is_always_readable_but_nothing_beside_it(tmp_path):
    store = FileStore(tmp_path / "store")
    (tmp_path / "store" / "datasets").mkdir(parents=True)
    policy = InputPolicy()
    inside = store.root / "datasets" / "d.jsonl"
    assert policy.check(inside.as_uri(), store, field="dataset_uri").path == inside
    with pytest.raises(PermissionDenied):
        policy.check(str(tmp_path / "store-sibling" / "d.jsonl"), store, field="dataset_uri")
    with pytest.raises(PermissionDenied):
        policy.check(f"{store.root}/../elsewhere", store, field="dataset_uri")


def test_s3_inputs_only_from_the_store_bucket_or_the_allow_list(tmp_path):
    s3_store = S3Store("own-bucket", "prefix", client=object())
    policy = InputPolicy(s3_buckets=("shared-models",))
    assert policy.check("s3://own-bucket/prefix/adapters/a", s3_store, field="adapters[0]").bucket == "own-bucket"
    assert policy.check("s3://shared-models/m", s3_store, field="base_model").bucket == "shared-models"
    for uri in ("s3://someone-elses/secrets", "s3://own-bucket-evil/x"):
        with pytest.raises(PermissionDenied) as e:
            policy.check(uri, s3_store, field="base_model")
        assert e.value.field == "base_model" and "--allow-s3-buckets" in e.value.message
    with pytest.raises(PermissionDenied):  # a file store has no bucket of its own
        InputPolicy().check("s3://any/x", FileStore(tmp_path / "s"), field="base_model")


def test_reads_are_bounded_and_regular_files_only(tmp_path):
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as f:
        f.truncate(1025)
    with pytest.raises(InvalidArgument, match="1024-byte limit"):
        read_regular_file(big, field="dataset_uri", limit=1024)
    assert read_regular_file(tmp_path / "big.jsonl", field="dataset_uri", limit=2048) == b"\0" * 1025
    with pytest.raises(InvalidArgument, match="does not exist"):
        read_regular_file(tmp_path / "missing", field="dataset_uri", limit=10)
    with pytest.raises(InvalidArgument, match="directory"):
        read_regular_file(tmp_path, field="dataset_uri", limit=10)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    result: list[BaseException] = []
    t = threading.Thread(target=lambda: result.append(
        pytest.raises(InvalidArgument, read_regular_file, fifo, field="dataset_uri", limit=10).value))
    t.start()
    t.join(10)
    assert not t.is_alive(), "opening a FIFO blocked"
    assert "FIFO" in result[0].message


def test_device_files_are_refused(tmp_path):
    with pytest.raises(InvalidArgument, match="device, process or kernel file"):
        read_regular_file("/dev/zero", field="dataset_uri", limit=10)
    (tmp_path / "zero").symlink_to("/dev/zero")  # a link into /dev is refused by where it resolves
    with pytest.raises(InvalidArgument, match="device, process or kernel file"):
        read_regular_file(tmp_path / "zero", field="dataset_uri", limit=10)


def test_trees_follow_inner_file_links_and_refuse_escapes(tmp_path, layout):
    _, outside = layout
    model = tmp_path / "model"
    (model / "blobs").mkdir(parents=True)
    (model / "blobs" / "abc").write_text("{}")
    (model / "config.json").symlink_to(model / "blobs" / "abc")  # inside: followed
    assert check_tree(model, field="base_model") == ["blobs/abc", "config.json"]

    (model / "chat_template.jinja").symlink_to(outside / "secret.txt")
    with pytest.raises(InvalidArgument) as e:
        check_tree(model, field="base_model")
    assert "chat_template.jinja" in e.value.message and MARKER not in e.value.message
    (model / "chat_template.jinja").unlink()

    (model / "sub").symlink_to(outside)
    with pytest.raises(InvalidArgument, match="symlink to a directory"):
        check_tree(model, field="base_model")
    (model / "sub").unlink()

    os.mkfifo(model / "tokenizer.json")
    with pytest.raises(InvalidArgument, match="FIFO"):
        check_tree(model, field="base_model")


def test_store_keys_never_resolve_outside_the_store(tmp_path):
    store = FileStore(tmp_path / "store")
    (store.root / "adapters" / "a").mkdir(parents=True)
    assert store.key_of((store.root / "adapters" / "a").as_uri()) == "adapters/a"
    assert store.key_of(str(store.root / "adapters" / "a")) == "adapters/a"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep")
    (store.root / "adapters" / "planted").symlink_to(victim)
    for uri in (str(victim), victim.as_uri(), f"{store.root}/../victim", str(store.root / "adapters" / "planted"),
                str(store.root), "s3://bucket/adapters/a"):
        assert store.key_of(uri) is None, uri
    with pytest.raises(InvalidArgument, match="outside the store"):
        store.delete("adapters/planted/keep.txt")
    assert (victim / "keep.txt").read_text() == "keep"
    s3 = S3Store("b", "p", client=object())
    assert s3.key_of("s3://b/p/adapters/x") == "adapters/x"
    assert s3.key_of("s3://b/other/adapters/x") is None and s3.key_of("s3://c/p/x") is None


def test_publishing_refuses_a_link_out_of_the_directory(tmp_path, layout):
    _, outside = layout
    store = FileStore(tmp_path / "store")
    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    (src / "README.md").symlink_to(outside / "secret.txt")
    with pytest.raises(InvalidArgument) as e:
        store.publish_dir("adapters/x", src)
    assert "README.md" in e.value.message
    assert not store.dir_exists("adapters/x")
