"""Hostile inputs through the real CompilerService (real gRPC, real Redis, a file store): model and adapter
directories may not link to files outside themselves, paths outside the allowed roots are denied, and a
registry record planted in Redis cannot make the compiler read a host directory."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import grpc
import pytest
import redis

from loraflow.jobs.queue import JobQueue
from loraflow.jobs.registry import AdapterRecord, Registry
from loraflow.server.grpc_server import GrpcServer, error_info
from loraflow.storage.store import open_store
from loraflow.v1 import compiler_pb2, compiler_pb2_grpc
from services.compiler.backends.shared import copy_tokenizer
from services.compiler.inputs import CompileInputs
from services.compiler.server import SERVICE_NAME, CompilerServiceServicer

MARKER = "SECRET-MARKER-5eed1e55"


@pytest.fixture
def compiler(redis_url, tmp_path, input_policy):
    client = redis.Redis.from_url(redis_url)
    store = open_store((tmp_path / "store").as_uri())
    registry = Registry(client)
    server = GrpcServer("127.0.0.1:0", [SERVICE_NAME])
    server.add(compiler_pb2_grpc.add_CompilerServiceServicer_to_server,
               CompilerServiceServicer(JobQueue(client, "compile"), registry, store,
                                       CompileInputs(store, registry, tmp_path / "cache", policy=input_policy)))
    port = server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield compiler_pb2_grpc.CompilerServiceStub(channel), registry
    channel.close()
    server.stop(0).wait(5)
    client.close()


@pytest.fixture
def secret():
    outside = Path(tempfile.mkdtemp(prefix="loraflow-outside-", dir="/var/tmp"))
    (outside / "secret").write_text(f"{{{{ '{MARKER}' }}}}\n")
    yield outside / "secret"
    shutil.rmtree(outside)


def _submit(stub, base, adapters):
    with pytest.raises(grpc.RpcError) as e:
        stub.SubmitCompileJob(compiler_pb2.SubmitCompileJobRequest(base_model=str(base), adapters=[str(a) for a in
                                                                                                     adapters]))
    info = error_info(e.value)
    sent = "\n".join([e.value.details() or "", *(info.metadata.values() if info else ())] +
                     [v.decode("latin-1") if isinstance(v, bytes) else v for _, v in e.value.trailing_metadata()])
    return e.value.code(), (info.metadata.get("field") if info else None), sent


def test_a_model_with_a_chat_template_linked_outside_is_refused(compiler, tiny_llama, adapter_factory, tmp_path,
                                                                 secret):
    stub, _ = compiler
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    (model / "chat_template.jinja").symlink_to(secret)
    code, field, sent = _submit(stub, model, [adapter_factory("llama", "alpha", r=4)])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and field == "base_model", sent
    assert "chat_template.jinja" in sent and MARKER not in sent


def test_an_adapter_with_a_file_linked_outside_is_refused(compiler, tiny_llama, adapter_factory, tmp_path, secret):
    stub, _ = compiler
    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_factory("llama", "alpha", r=4), adapter)
    (adapter / "README.md").unlink(missing_ok=True)
    (adapter / "README.md").symlink_to(secret)
    code, field, sent = _submit(stub, tiny_llama, [adapter])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and field == "adapters[0]", sent
    assert "README.md" in sent and MARKER not in sent


def test_paths_outside_the_roots_and_planted_records_are_denied(compiler, tiny_llama, adapter_factory, secret):
    stub, registry = compiler
    outside_dir = secret.parent
    code, field, sent = _submit(stub, outside_dir, [])
    assert code == grpc.StatusCode.PERMISSION_DENIED and field == "base_model" and MARKER not in sent
    code, field, _ = _submit(stub, tiny_llama, [outside_dir])
    assert code == grpc.StatusCode.PERMISSION_DENIED and field == "adapters[0]"
    code, field, _ = _submit(stub, tiny_llama, ["s3://someone-elses-bucket/adapters/x"])
    assert code == grpc.StatusCode.PERMISSION_DENIED and field == "adapters[0]"
    # Anyone who can write Redis could plant a record pointing at a host directory.
    registry.put_adapter(AdapterRecord(name="planted", uri=str(outside_dir), base_model=str(tiny_llama)))
    code, field, sent = _submit(stub, tiny_llama, ["planted"])
    assert code == grpc.StatusCode.PERMISSION_DENIED and field == "adapters[0]" and MARKER not in sent


def test_artifact_building_copies_no_link_from_outside(tiny_llama, tmp_path, secret):
    """Defence in depth: even handed a checked directory, the copy into the artifact re-checks each file."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    (model / "chat_template.jinja").symlink_to(secret)
    from loraflow.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="chat_template.jinja"):
        copy_tokenizer(model, tmp_path / "out")
    assert not (tmp_path / "out" / "chat_template.jinja").exists()
