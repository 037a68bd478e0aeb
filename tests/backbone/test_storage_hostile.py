"""Hostile pushes against a real StorageService (real gRPC on loopback, two token callers, a real file store):
over-long path segments and unprintable names are INVALID_ARGUMENT at upload and at commit, nobody can
publish or remove another caller's pending upload by knowing its sha256, a 10,000-file commit over many
folders publishes (files are counted, not folders) and no error names the server's scratch paths."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import grpc
import pytest

from loraflow.security.settings import SecuritySettings
from loraflow.server.grpc_server import GrpcServer, error_info
from loraflow.storage.storage_layout import BLOBS_PREFIX, CLAIMS_PREFIX
from loraflow.storage.storage_service import SERVICE_NAME, add_storage_service
from loraflow.storage.store import open_store
from loraflow.v1 import storage_pb2, storage_pb2_grpc

TOKENS = {"alice": "alice-token-0123456789abcdef", "mallory": "mallory-token-0123456789abcd"}
MODEL = storage_pb2.DATA_KIND_MODEL


class Caller:
    def __init__(self, stub, token: str):
        self.stub = stub
        self.metadata = (("authorization", f"Bearer {token}"),)

    def upload(self, path: str, data: bytes):
        header = storage_pb2.UploadHeader(kind=MODEL, path=path, size=len(data), sha256=sha(data))
        return self.stub.Upload(iter([storage_pb2.UploadRequest(header=header),
                                      storage_pb2.UploadRequest(chunk=data)]), metadata=self.metadata, timeout=30)

    def commit(self, name: str, files: list[tuple[str, int, str]], timeout: float = 120):
        return self.stub.CommitDirectory(storage_pb2.CommitDirectoryRequest(
            kind=MODEL, name=name, files=[storage_pb2.FileEntry(path=p, size=n, sha256=h) for p, n, h in files]),
            metadata=self.metadata, timeout=timeout)

    def stat(self, name: str, files: list[tuple[str, int, str]]):
        return self.stub.StatDirectory(storage_pb2.StatDirectoryRequest(
            kind=MODEL, name=name, files=[storage_pb2.FileEntry(path=p, size=n, sha256=h) for p, n, h in files]),
            metadata=self.metadata, timeout=30)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def service(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("".join(f"{name}:{token}\n" for name, token in TOKENS.items()))
    os.chmod(tokens, 0o600)
    store = open_store((tmp_path / "store").as_uri())
    scratch = tmp_path / "scratch-dir-of-the-server"
    server = GrpcServer("127.0.0.1:0", [SERVICE_NAME], security=SecuritySettings(auth_tokens_file=str(tokens)))
    add_storage_service(server, store, scratch)
    server.start()
    channel = grpc.insecure_channel(server.address)
    stub = storage_pb2_grpc.StorageServiceStub(channel)

    class S:
        pass

    s = S()
    s.store, s.scratch = store, scratch
    s.alice, s.mallory = Caller(stub, TOKENS["alice"]), Caller(stub, TOKENS["mallory"])
    yield s
    channel.close()
    server.stop(0).wait(5)


def fails(call):
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), error_info(err.value), err.value.details()


LONG_ASCII = "a" * 256
LONG_UTF8 = "é" * 128  # 128 characters, 256 bytes


@pytest.mark.parametrize(("path", "why"), [
    (LONG_ASCII, "segment of 256 bytes"),
    (f"dir/{LONG_UTF8}.bin", "segment of 260 bytes"),
    (f"{LONG_ASCII}/file", "segment of 256 bytes"),
    ("x" * 600 + "/" + "y" * 600, "at most 1024 bytes"),
    ("weights\x7f.bin", "U+007F"),
    ("weights\x85.bin", "U+0085"),
    ("a\u2028b.json", "U+2028"),
    ("a\u2029b.json", "U+2029"),
    ("evil\u202etxt.exe", "U+202E"),
    ("zero\u200bwidth", "U+200B"),
    ("tab\there", "U+0009"),
])
def test_bad_names_are_refused_at_upload_and_at_commit_naming_the_field(service, path, why):
    code, info, details = fails(lambda: service.alice.upload(path, b"x"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and info.metadata["field"] == "header.path", details
    assert why in details
    code, info, details = fails(lambda: service.alice.commit("m", [("ok.json", 1, sha(b"x")), (path, 1, sha(b"x"))]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and info.metadata["field"] == "files[1].path", details
    assert service.store.list("") == []
    # the longest legal names still work end to end
    longest = "d" * 255 + "/" + "é" * 127 + "e"
    assert service.alice.upload(longest, b"fits").size == 4
    assert service.alice.commit("m", [(longest, 4, sha(b"fits"))]).file_count == 1


def test_nobody_publishes_or_removes_another_callers_pending_upload(service):
    secret = os.urandom(4096)
    h = sha(secret)
    assert not service.alice.upload("weights.bin", secret).already_present
    # Knowing the sha256 (and even the size) of alice's pending bytes gives mallory nothing:
    for size in (1, len(secret)):
        code, info, details = fails(lambda size=size: service.mallory.commit("stolen", [("weights.bin", size, h)]))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and info.reason == "BLOBS_MISSING", details
    assert list(service.mallory.stat("stolen", [("weights.bin", len(secret), h)]).missing_sha256) == [h]
    assert service.store.list(BLOBS_PREFIX) == [f"{BLOBS_PREFIX}/{h}"]
    assert service.store.list_dirs("uploads/models") == []
    # Alice's own commit with a wrong size is her mistake: named, and her blob stays.
    code, info, details = fails(lambda: service.alice.commit("mine", [("weights.bin", 99, h)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and info.metadata["field"] == "files[0].size", details
    assert "4096" in details and service.store.list(BLOBS_PREFIX) == [f"{BLOBS_PREFIX}/{h}"]
    # Mallory holding the same bytes uploads them herself (already present, now claimed by both) and
    # publishes; that commit leaves the blob to alice's still-open push.
    assert service.mallory.upload("weights.bin", secret).already_present
    assert service.mallory.commit("hers", [("weights.bin", len(secret), h)]).file_count == 1
    assert service.store.list(BLOBS_PREFIX) == [f"{BLOBS_PREFIX}/{h}"]
    assert service.alice.commit("mine", [("weights.bin", len(secret), h)]).file_count == 1
    # The last claim gone, the blob goes.
    assert service.store.list(BLOBS_PREFIX) == [] and service.store.list(CLAIMS_PREFIX) == []


def test_ten_thousand_files_in_many_folders_publish_and_errors_never_name_server_paths(service):
    data = b"0123456789"
    service.alice.upload("probe.txt", data)  # one blob serves every file with these bytes
    files = [(f"shard-{i // 100:03d}/part-{i % 100:02d}.txt", len(data), sha(data)) for i in range(10_000)]
    reply = service.alice.commit("many", files)
    assert reply.file_count == 10_000 and not reply.already_published
    service.alice.upload("probe.txt", data)
    code, info, details = fails(lambda: service.alice.commit("too-many", files + [("last.txt", len(data), sha(data))]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and info.metadata["field"] == "files", details
    assert "10000" in details
    for text in (details, str(dict(info.metadata))):
        assert str(service.scratch) not in text and "uploads/.commit" not in text


def test_hostile_uploads_do_not_slow_another_caller(service):
    stop = threading.Event()
    codes: list[grpc.StatusCode] = []

    def attack() -> None:
        while not stop.is_set():
            for path in ("a" * 300, "x\u2028y", "a\x7fb"):
                try:
                    service.mallory.upload(path, os.urandom(64))
                except grpc.RpcError as err:
                    codes.append(err.code())

    attackers = [threading.Thread(target=attack) for _ in range(4)]
    for t in attackers:
        t.start()
    try:
        worst = 0.0
        for i in range(30):
            started = time.monotonic()
            data = f"file {i}".encode()
            service.alice.upload(f"f{i}.txt", data)
            service.alice.stat("ok", [(f"f{i}.txt", len(data), sha(data))])
            worst = max(worst, time.monotonic() - started)
    finally:
        stop.set()
        for t in attackers:
            t.join(30)
    assert codes and set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}
    assert worst < 5.0, worst


def test_the_sweeper_removes_stale_claims_and_their_folders(service):
    from loraflow.storage.upload_sweeper import sweep_abandoned_blobs

    data = os.urandom(100)
    service.alice.upload("a.bin", data)
    claims_root = service.store.path(CLAIMS_PREFIX)
    assert sweep_abandoned_blobs(service.store, 3600) == (0, 1) and len(service.store.list(CLAIMS_PREFIX)) == 1
    future = time.time() + 2 * 86400
    assert sweep_abandoned_blobs(service.store, 3600, now=future) == (1, 0)
    assert service.store.list(CLAIMS_PREFIX) == [] and list(claims_root.iterdir()) == []  # no empty folders left
    code, info, _ = fails(lambda: service.alice.commit("late", [("a.bin", 100, sha(data))]))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and info.reason == "BLOBS_MISSING"
    service.alice.upload("a.bin", data)  # a claim folder taken away by a sweep is made again
    assert service.alice.commit("late", [("a.bin", 100, sha(data))]).file_count == 1
