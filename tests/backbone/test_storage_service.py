"""StorageService end to end: a real gRPC server on loopback with bearer-token auth, a real file store (and
the real S3-compatible server), the real Client. Push twice sends nothing the second time, a pull equals
what was pushed, corruption and traversal and oversize are refused naming the file, an interrupted push
restarts where it stopped, and what was pushed is accepted by the trainer and compiler validation."""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import time
from pathlib import Path

import grpc
import pytest
import redis

from loraflow import errors
from loraflow.client import Client
from loraflow.security.settings import SecuritySettings
from loraflow.server.grpc_server import GrpcServer, error_info
from loraflow.storage.model_source import InputPolicy
from loraflow.storage.storage_layout import BLOBS_PREFIX, MAX_CHUNK_BYTES, StorageLimits
from loraflow.storage.storage_service import SERVICE_NAME, add_storage_service
from loraflow.storage.store import open_store
from loraflow.storage.transfer import push as transfer_push
from loraflow.v1 import storage_pb2, storage_pb2_grpc
from tests.support.tiny_models import make_tiny_model_dir

TOKEN = "storage-test-token-0123456789"


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _same_tree(a: Path, b: Path) -> bool:
    names = _files(a)
    if names != _files(b):
        return False
    match, mismatch, errs = filecmp.cmpfiles(a, b, names, shallow=False)
    return not mismatch and not errs and len(match) == len(names)


class Served:
    def __init__(self, store, tmp_path: Path, limits: StorageLimits | None = None):
        tokens = tmp_path / "tokens"
        tokens.write_text(f"tester:{TOKEN}\n")
        os.chmod(tokens, 0o600)
        self.store = store
        self.server = GrpcServer("127.0.0.1:0", [SERVICE_NAME],
                                 security=SecuritySettings(auth_tokens_file=str(tokens)))
        add_storage_service(self.server, store, tmp_path / "cache", limits)
        self.server.start()
        self.address = self.server.address
        self.client = Client(trainer=self.address, timeout=30, token=TOKEN, progress=False)
        self.channel = grpc.insecure_channel(self.address)
        self.stub = storage_pb2_grpc.StorageServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {TOKEN}"),)

    def blobs(self) -> list[str]:
        return self.store.list(BLOBS_PREFIX)

    def upload(self, messages):
        return self.stub.Upload(iter(messages), metadata=self.metadata, timeout=30)

    def close(self) -> None:
        self.client.close()
        self.channel.close()
        self.server.stop(0).wait(5)


@pytest.fixture
def served(tmp_path):
    s = Served(open_store((tmp_path / "store").as_uri()), tmp_path)
    yield s
    s.close()


@pytest.fixture
def small(tmp_path):
    s = Served(open_store((tmp_path / "store").as_uri()), tmp_path,
               StorageLimits(max_file_bytes=4096, max_files=3, max_total_bytes=6000))
    yield s
    s.close()


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A real tiny checkpoint plus a nested file larger than one chunk."""
    model = make_tiny_model_dir(tmp_path / "tiny")
    (model / "extra").mkdir()
    (model / "extra" / "big.bin").write_bytes(os.urandom(MAX_CHUNK_BYTES * 2 + 123))
    return model


def _header(path: str, data: bytes, kind=storage_pb2.DATA_KIND_MODEL, size: int | None = None, sha: str | None = None):
    return storage_pb2.UploadRequest(header=storage_pb2.UploadHeader(
        kind=kind, path=path, size=len(data) if size is None else size,
        sha256=sha or hashlib.sha256(data).hexdigest()))


def _rpc_error(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def test_push_twice_uploads_once_and_pull_returns_the_same_bytes(served, model_dir, tmp_path):
    first = served.client.push("model", model_dir, name="tiny")
    assert first.uploaded_files == first.files == len(_files(model_dir))
    assert first.uploaded_bytes == first.total_bytes == sum((model_dir / f).stat().st_size for f in _files(model_dir))
    assert not first.already_published
    assert first.uri.startswith(served.store.uri("uploads/models/tiny/"))
    key = served.store.key_of(first.uri)
    assert served.store.dir_exists(key)  # published with the store's marker
    assert served.blobs() == []  # the staging blobs are gone once published

    second = served.client.push("model", model_dir, name="tiny")
    assert second.uri == first.uri
    assert second.uploaded_files == 0 and second.uploaded_bytes == 0 and second.already_published

    pulled = served.client.pull(first.uri, tmp_path / "pulled")
    assert pulled.files == first.files and pulled.total_bytes == first.total_bytes
    assert _same_tree(model_dir, tmp_path / "pulled")


def test_a_changed_file_publishes_a_new_directory_beside_the_old(served, model_dir):
    first = served.client.push("model", model_dir, name="tiny")
    (model_dir / "config.json").write_text(json.dumps({**json.loads((model_dir / "config.json").read_text()),
                                                       "note": "changed"}))
    second = served.client.push("model", model_dir, name="tiny")
    assert second.uri != first.uri
    # Blobs are dropped after a commit, so the new directory sends every file again; the old one stays intact.
    assert second.uploaded_files == second.files
    assert served.store.dir_exists(served.store.key_of(first.uri))
    assert json.loads(served.store.get_bytes(served.store.key_of(second.uri) + "/config.json"))["note"] == "changed"


def test_an_interrupted_push_restarts_without_resending_what_arrived(served, model_dir):
    _interrupted_push(served, model_dir)  # two files arrived before the drop
    assert served.store.list_dirs("uploads/models") == []  # nothing was published

    result = served.client.push("model", model_dir, name="tiny")
    assert result.uploaded_files == result.files - 2
    assert served.store.list_dirs("uploads/models") == [served.store.key_of(result.uri)]


def test_a_corrupted_chunk_is_data_loss_naming_the_file_and_stores_nothing(served):
    data = os.urandom(5000)
    corrupted = bytearray(data)
    corrupted[100] ^= 0xFF
    err = _rpc_error(lambda: served.upload([_header("weights/model.safetensors", data),
                                            storage_pb2.UploadRequest(chunk=bytes(corrupted))]))
    assert err.code() == grpc.StatusCode.DATA_LOSS
    assert "weights/model.safetensors" in err.details()
    assert error_info(err).metadata["path"] == "weights/model.safetensors"
    assert served.blobs() == []
    ok = served.upload([_header("weights/model.safetensors", data), storage_pb2.UploadRequest(chunk=data)])
    assert ok.sha256 == hashlib.sha256(data).hexdigest() and not ok.already_present
    assert served.blobs() == [f"{BLOBS_PREFIX}/{ok.sha256}"]


@pytest.mark.parametrize("bad", ["../escape", "/etc/passwd", "a/../../b", "a/\x00b", "a\\b", "./x", "a//b",
                                 ".manifest.json", "dir/"])
def test_paths_that_could_leave_the_directory_are_refused(served, bad):
    err = _rpc_error(lambda: served.upload([_header(bad, b"x"), storage_pb2.UploadRequest(chunk=b"x")]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(err).metadata["field"] == "header.path"
    entry = storage_pb2.FileEntry(path=bad, size=1, sha256=hashlib.sha256(b"x").hexdigest())
    err = _rpc_error(lambda: served.stub.CommitDirectory(storage_pb2.CommitDirectoryRequest(
        kind=storage_pb2.DATA_KIND_MODEL, name="m", files=[entry]), metadata=served.metadata))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(err).metadata["field"] == "files[0].path"
    assert served.store.list("") == []


def test_a_symlink_leading_out_of_the_directory_is_refused_before_anything_is_sent(served, model_dir, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the store")
    (model_dir / "leak.txt").symlink_to(secret)
    with pytest.raises(errors.InvalidArgument) as err:
        served.client.push("model", model_dir)
    assert "leak.txt" in err.value.message
    assert served.store.list("") == []


def test_sizes_counts_and_chunks_are_bounded(small):
    big = os.urandom(5000)
    err = _rpc_error(lambda: small.upload([_header("big.bin", big), storage_pb2.UploadRequest(chunk=big)]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(err).metadata["field"] == "header.size"
    data = b"y" * 100
    err = _rpc_error(lambda: small.upload([_header("liar.bin", data, size=50), storage_pb2.UploadRequest(chunk=data)]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "liar.bin" in err.details()
    err = _rpc_error(lambda: small.upload([_header("short.bin", data, size=200), storage_pb2.UploadRequest(chunk=data)]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "short.bin" in err.details()
    err = _rpc_error(lambda: small.upload([storage_pb2.UploadRequest(chunk=data)]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(err).metadata["field"] == "header"

    def entries(n: int, size: int):
        return [storage_pb2.FileEntry(path=f"f{i}", size=size, sha256="0" * 64) for i in range(n)]

    for files, field in ((entries(4, 10), "files"), (entries(2, 3500), "files")):
        err = _rpc_error(lambda files=files: small.stub.StatDirectory(storage_pb2.StatDirectoryRequest(
            kind=storage_pb2.DATA_KIND_MODEL, name="m", files=files), metadata=small.metadata))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(err).metadata["field"] == field
    assert small.blobs() == []


def test_a_chunk_over_one_mib_is_refused(served):
    data = b"z" * (MAX_CHUNK_BYTES + 1)
    err = _rpc_error(lambda: served.upload([_header("huge.bin", data), storage_pb2.UploadRequest(chunk=data)]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(err).metadata["field"] == "chunk"


def test_commit_without_the_bytes_names_the_missing_files(served):
    entry = storage_pb2.FileEntry(path="config.json", size=2, sha256=hashlib.sha256(b"{}").hexdigest())
    err = _rpc_error(lambda: served.stub.CommitDirectory(storage_pb2.CommitDirectoryRequest(
        kind=storage_pb2.DATA_KIND_MODEL, name="m", files=[entry]), metadata=served.metadata))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and error_info(err).reason == "BLOBS_MISSING"
    assert "config.json" in err.details()
    err = _rpc_error(lambda: served.stub.CommitDirectory(storage_pb2.CommitDirectoryRequest(
        kind=storage_pb2.DATA_KIND_UNSPECIFIED, name="m", files=[entry]), metadata=served.metadata))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(err).metadata["field"] == "kind"


def test_every_storage_rpc_needs_a_token(served, model_dir, tmp_path):
    for token in (None, "wrong-token-000000000000"):
        anonymous = Client(trainer=served.address, timeout=10, token=token, progress=False)
        if token is None:
            anonymous._metadata = ()  # no LORAFLOW_TOKEN / up token file can sneak in
        with pytest.raises(errors.Unauthenticated):
            anonymous.push("model", model_dir)
        anonymous.close()
    err = _rpc_error(lambda: served.stub.Upload(iter([_header("a", b"a"), storage_pb2.UploadRequest(chunk=b"a")])))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    err = _rpc_error(lambda: list(served.stub.Download(storage_pb2.DownloadRequest(uri=served.store.uri("x"), path="a"))))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert served.store.list("") == []


def test_pull_refuses_unpublished_and_foreign_directories(served, model_dir, tmp_path):
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        served.store.put_file(f"raw/{path.relative_to(model_dir).as_posix()}", path)  # no marker
    with pytest.raises(errors.FailedPrecondition) as err:
        served.client.pull(served.store.uri("raw"), tmp_path / "out")
    assert "loraflow models push" in err.value.message and err.value.field == "uri"
    with pytest.raises(errors.NotFound):
        served.client.pull(served.store.uri("nothing/here"), tmp_path / "out")
    with pytest.raises(errors.InvalidArgument) as err:
        served.client.pull((tmp_path / "elsewhere").as_uri(), tmp_path / "out")
    assert err.value.field == "uri"
    result = served.client.push("model", model_dir)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(errors.InvalidArgument) as err:
        served.client.pull(result.uri, tmp_path / "busy")
    assert err.value.field == "dest" and (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "out").exists()


def test_pushed_model_and_dataset_on_s3_are_accepted_by_trainer_and_compiler(s3_store, tmp_path, redis_url):
    from loraflow.jobs.queue import JobQueue
    from loraflow.jobs.registry import Registry
    from loraflow.v1 import trainer_pb2
    from services.compiler.inputs import CompileInputs
    from services.compiler.options import CompileOptions
    from services.trainer.server import TrainerServiceServicer

    served = Served(s3_store, tmp_path)
    try:
        model = make_tiny_model_dir(tmp_path / "model")
        data = tmp_path / "data.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"{i} ->", "completion": f" {i}"}) + "\n" for i in range(4)))
        pushed = served.client.push("model", model)
        dataset = served.client.push("dataset", data)
        assert pushed.uri.startswith("s3://loraflow-test/") and dataset.target.endswith("/data.jsonl")
        assert served.client.push("model", model).uploaded_files == 0  # the same bytes, once, on S3 too
        assert served.blobs() == []

        client = redis.Redis.from_url(redis_url)
        queue = JobQueue(client, "train")
        trainer = TrainerServiceServicer(queue, Registry(client), s3_store, inputs=InputPolicy())
        job = trainer.SubmitTrainingJob(trainer_pb2.SubmitTrainingJobRequest(
            base_model=pushed.target, dataset_uri=dataset.target, adapter_name="pushed",
            lora=trainer_pb2.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
            training=trainer_pb2.TrainingConfig(max_steps=1, batch_size=2, max_seq_len=16)), None)
        assert [j.id for j in queue.list()[0]] == [job.id]

        inputs = CompileInputs(s3_store, Registry(client), tmp_path / "ccache", policy=InputPolicy())
        options = CompileOptions.from_dict({"ctx_len": 32, "prefill_seq_len": 8, "full_batch_size": 2})
        plan = inputs.plan(pushed.target, [], options)
        assert plan.base_dir is None  # planned from the hashes S3 recorded: no weight fetched yet
        base_dir = inputs.fetch_base(pushed.target, plan.plan)
        assert all((base_dir / f).read_bytes() == (model / f).read_bytes() for f in _files(model))

        # The same checkpoint copied in file by file (no marker) is refused, naming the command to use.
        for path in sorted(p for p in model.rglob("*") if p.is_file()):
            s3_store.put_file(f"raw/{path.relative_to(model).as_posix()}", path)
        with pytest.raises(errors.FailedPrecondition) as err:
            inputs.plan(s3_store.uri("raw"), [], options)
        assert "loraflow models push" in err.value.message and err.value.field == "base_model"

        pulled = served.client.pull(pushed.uri, tmp_path / "pulled")
        assert pulled.files == pushed.files and _same_tree(model, tmp_path / "pulled")
        client.close()
    finally:
        served.close()


def test_a_pull_of_damaged_store_bytes_is_data_loss_and_leaves_no_partial_copy(served, model_dir, tmp_path):
    result = served.client.push("model", model_dir)
    key = served.store.key_of(result.uri)
    served.store.path(f"{key}/config.json").write_text('{"tampered": true}')
    with pytest.raises(errors.IntegrityError) as err:
        served.client.pull(result.uri, tmp_path / "copy")
    assert "config.json" in err.value.message
    served.store.path(f"{key}/config.json").unlink()
    with pytest.raises(errors.IntegrityError) as err:
        served.client.pull(result.uri, tmp_path / "copy")
    assert "config.json" in err.value.message and "missing" in err.value.message
    assert not (tmp_path / "copy").exists() and not list(tmp_path.glob(".tmp-pull-*"))


# ------------------------------------------------------------------------------------------------ abandoned blobs

def _interrupted_push(served, model_dir) -> None:
    """A push whose third file upload drops: two blobs stay behind, nothing is published."""
    calls = {"n": 0}

    def call(method, request):
        return served.client._call("trainer", storage_pb2_grpc.StorageServiceStub, method, request)

    def flaky_upload(messages):
        calls["n"] += 1
        if calls["n"] == 3:
            raise errors.Unavailable("connection dropped")
        return served.client._call("trainer", storage_pb2_grpc.StorageServiceStub, "Upload", messages, timeout=None)

    with pytest.raises(errors.Unavailable):
        transfer_push(call, flaky_upload, "model", model_dir, name="tiny", progress=False, retries=0)
    assert len(served.blobs()) == 2


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_blobs_of_an_abandoned_push_are_swept_after_the_ttl_and_a_later_push_still_works(
        backend, tmp_path, model_dir, request):
    from loraflow.storage.upload_sweeper import sweep_abandoned_blobs

    store = request.getfixturevalue("s3_store") if backend == "s3" else open_store((tmp_path / "store").as_uri())
    served = Served(store, tmp_path)
    try:
        _interrupted_push(served, model_dir)
        ttl = 3600.0
        assert sweep_abandoned_blobs(store, ttl) == (0, 2)  # young: a resumed push would still use them
        assert sweep_abandoned_blobs(store, ttl, now=time.time() + ttl + 60) == (2, 0)
        assert served.blobs() == []
        result = served.client.push("model", model_dir, name="tiny")
        assert result.uploaded_files == result.files  # nothing left to resume from: all sent again
        assert served.store.list_dirs("uploads/models") == [served.store.key_of(result.uri)]
        assert served.blobs() == []  # the commit consumed what it uploaded
    finally:
        served.close()


def test_a_blob_swept_between_upload_and_commit_is_sent_again_and_the_push_publishes(served, model_dir, tmp_path):
    from loraflow.storage.upload_sweeper import sweep_abandoned_blobs

    swept = []

    def call(method, request):
        if method == "CommitDirectory" and not swept:
            swept.append(sweep_abandoned_blobs(served.store, 600, now=time.time() + 3600))
        return served.client._call("trainer", storage_pb2_grpc.StorageServiceStub, method, request)

    def upload(messages):
        return served.client._call("trainer", storage_pb2_grpc.StorageServiceStub, "Upload", messages, timeout=None)

    result = transfer_push(call, upload, "model", model_dir, name="tiny", progress=False)
    assert swept and swept[0][0] == result.files  # every blob was gone when the first commit ran
    served.client.pull(result.uri, tmp_path / "copy")
    assert _same_tree(model_dir, tmp_path / "copy")


def test_the_sweeper_thread_removes_an_old_blob_and_stops(served, model_dir):
    from loraflow.storage.upload_sweeper import BlobSweeper
    from tests.support.polling import wait_for

    _interrupted_push(served, model_dir)
    old, young = (served.store.path(k) for k in served.blobs())
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    sweeper = BlobSweeper(served.store, 3600).start()
    try:
        wait_for(lambda: not old.exists(), timeout=10, what="the sweeper to remove the old blob")
        assert young.exists()
    finally:
        sweeper.stop()
    assert not sweeper._thread.is_alive()


@pytest.mark.parametrize("value", [-1, 1, 599, 31 * 86400])
def test_the_blob_ttl_is_zero_or_bounded_and_the_error_names_it(value):
    import argparse

    from loraflow.storage.storage_service import add_storage_arguments
    from loraflow.storage.upload_sweeper import check_blob_ttl

    with pytest.raises(errors.InvalidArgument) as info:
        check_blob_ttl(value)
    assert info.value.field == "upload_blob_ttl" and str(value) in info.value.message
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_storage_arguments(parser)
    with pytest.raises(argparse.ArgumentError, match="--upload-blob-ttl"):
        parser.parse_args(["--upload-blob-ttl", str(value)])
    assert parser.parse_args(["--upload-blob-ttl", "0"]).upload_blob_ttl == 0
    assert parser.parse_args([]).upload_blob_ttl == 86400
