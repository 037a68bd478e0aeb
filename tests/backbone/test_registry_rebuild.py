"""`loraflow registry rebuild`: a real training job and a real compile job publish to the store, Redis is
flushed, and the registry comes back from the store alone (file:// and s3://), idempotently."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import redis
from typer.testing import CliRunner

from loraflow.cli import app
from loraflow.jobs.queue import JobQueue, JobWorker
from loraflow.jobs.registry import Registry
from loraflow.storage.store import open_store
from loraflow.v1 import trainer_pb2


@pytest.fixture(scope="module")
def published(redis_server, tmp_path_factory, tiny_llama, input_policy):
    """(store_url, adapter record, artifact record) after one real training and one real compile job."""
    from services.compiler.inputs import CompileInputs
    from services.compiler.options import CompileOptions
    from services.compiler.worker import CompileHandler
    from services.trainer.server import TrainerServiceServicer
    from services.trainer.worker import TrainingHandler

    root = tmp_path_factory.mktemp("rebuild")
    dataset = root / "data.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": f"add 1 to {i} ->", "completion": f" {i + 1}"}) + "\n"
                               for i in range(8)))
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    store_url = (root / "store").as_uri()
    store = open_store(store_url)
    registry = Registry(client)

    train_queue = JobQueue(client, "train")
    servicer = TrainerServiceServicer(train_queue, registry, store, inputs=input_policy)
    servicer.SubmitTrainingJob(trainer_pb2.SubmitTrainingJobRequest(
        base_model=str(tiny_llama), dataset_uri=str(dataset), adapter_name="adder",
        lora=trainer_pb2.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        training=trainer_pb2.TrainingConfig(max_steps=2, batch_size=4, max_seq_len=32)), None)
    handler = TrainingHandler(store, registry, root / "cache", inputs=input_policy)
    assert JobWorker(train_queue, handler).run_once(timeout_ms=1000)
    adapter = registry.get_adapter("adder")

    compile_queue = JobQueue(client, "compile")
    options = CompileOptions.from_dict({"ctx_len": 64, "prefill_seq_len": 8, "full_batch_size": 2,
                                        "adapter_slots": 2})
    inputs = CompileInputs(store, registry, root / "ccache", policy=input_policy)
    compile_queue.submit({"base_model": str(tiny_llama), "adapters": ["adder"], "options": options.to_dict()})
    assert JobWorker(compile_queue, CompileHandler(store, registry, inputs, root / "ccache")).run_once(timeout_ms=1000)
    (artifact,), _ = registry.list_artifacts()
    client.close()
    return store_url, adapter, artifact


def _without(record, *fields: str) -> dict:
    data = asdict(record)
    for name in fields:
        data.pop(name)
    return data


def _rebuild(redis_url: str, store_url: str) -> dict:
    result = CliRunner().invoke(app, ["registry", "rebuild", "--redis-url", redis_url, "--store-url", store_url,
                                      "-o", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_rebuild_after_flushall_restores_adapters_and_artifacts(redis_url, published, tiny_llama):
    store_url, adapter, artifact = published
    client = redis.Redis.from_url(redis_url)  # the redis_url fixture flushed everything
    registry = Registry(client)
    assert registry.find_adapter("adder") is None and registry.find_artifact(artifact.artifact_id) is None

    report = _rebuild(redis_url, store_url)
    assert report["restored"] == 2
    assert {(e["kind"], e["name"], e["status"]) for e in report["entries"]} == {
        ("adapter", "adder", "restored"), ("artifact", artifact.artifact_id, "restored")}

    restored = registry.get_adapter("adder")
    # Everything the trainer registered comes back, base_model as the job named it (kept in metrics.json).
    assert _without(restored, "create_time") == _without(adapter, "create_time")
    assert restored.base_model == str(tiny_llama)
    assert abs(restored.create_time - adapter.create_time) < 60
    got = registry.get_artifact(artifact.artifact_id)
    assert _without(got, "create_time") == _without(artifact, "create_time")
    assert abs(got.create_time - artifact.create_time) < 60

    # Idempotent: a second run changes nothing and says so.
    again = _rebuild(redis_url, store_url)
    assert again["restored"] == 0
    assert {e["status"] for e in again["entries"]} == {"present"}
    assert registry.get_adapter("adder") == restored


def test_rebuild_table_output_and_unreachable_redis(redis_url, published):
    store_url, _, artifact = published
    result = CliRunner().invoke(app, ["registry", "rebuild", "--redis-url", redis_url, "--store-url", store_url])
    assert result.exit_code == 0, result.output
    assert "adder" in result.stdout and "restored" in result.stdout
    url = "redis://:topsecret@127.0.0.1:1/0"
    failed = CliRunner().invoke(app, ["registry", "rebuild", "--redis-url", url, "--store-url", store_url])
    assert failed.exit_code == 1
    assert "UNAVAILABLE" in failed.output and "topsecret" not in failed.output


def test_rebuild_skips_unreadable_directories_and_restores_the_rest(redis_url, published, tmp_path):
    store_url, adapter, artifact = published
    src = open_store(store_url)
    store = open_store((tmp_path / "store").as_uri())
    for key in src.list_dirs(""):
        if key.startswith(("adapters/", "artifacts/")):
            store.publish_dir(key, src.fetch_dir(key, tmp_path / "copy" / key))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_bytes(b"\xff\xfe not json SECRET-BYTES")
    (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    store.publish_dir("adapters/broken/train-0123456789abcdef-a1", bad)
    lying = tmp_path / "lying"
    lying.mkdir()
    (lying / "manifest.json").write_text(json.dumps({"artifact_id": "SECRET-OTHER", "base_model": {}}))
    store.publish_dir("artifacts/" + "b" * 64, lying)
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "adapter_config.json").write_text("[1, 2]")
    (tmp_path / "list" / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    store.publish_dir("adapters/listcfg/train-0123456789abcdee-a1", tmp_path / "list")

    report = _rebuild(redis_url, store.uri())
    status = {(e["kind"], e["name"]): (e["status"], e["detail"]) for e in report["entries"]}
    assert status[("adapter", "adder")][0] == "restored"
    assert status[("artifact", artifact.artifact_id)][0] == "restored"
    assert status[("adapter", "broken")] == ("skipped", "adapter_config.json is not valid JSON (JSONDecodeError)")
    assert status[("adapter", "listcfg")] == ("skipped", "adapter_config.json is not a JSON object")
    assert status[("artifact", "b" * 64)] == ("skipped", "manifest.json names another artifact id")
    assert "SECRET" not in json.dumps(report)
    registry = Registry(redis.Redis.from_url(redis_url))
    assert registry.find_adapter("broken") is None and registry.find_artifact("b" * 64) is None


def test_rebuild_from_an_s3_store(redis_url, published, s3_store, tmp_path):
    store_url, adapter, artifact = published
    src = open_store(store_url)
    s3_store.ensure_bucket()
    for key in src.list_dirs(""):
        if key.startswith(("adapters/", "artifacts/")):
            s3_store.publish_dir(key, src.fetch_dir(key, tmp_path / "copy" / key))
    report = _rebuild(redis_url, s3_store.uri())
    assert report["restored"] == 2
    registry = Registry(redis.Redis.from_url(redis_url))
    restored = registry.get_adapter("adder")
    assert restored.uri.startswith("s3://loraflow-test/") and restored.digest == adapter.digest
    assert restored.lora == adapter.lora and restored.metrics == adapter.metrics
    got = registry.get_artifact(artifact.artifact_id)
    assert got.uri.startswith("s3://") and got.adapters == artifact.adapters and got.options == artifact.options
    assert got.size_bytes == artifact.size_bytes
