"""A store directory uploaded without the publish marker (plain boto3 / `aws s3 cp`) is refused when the
job is submitted — FAILED_PRECONDITION naming the URI and how to publish — instead of being queued and
failing in the worker. Real S3-compatible server (SeaweedFS), real Redis."""

from __future__ import annotations

import json

import pytest
import redis

from loraflow.errors import FailedPrecondition, NotFound
from loraflow.jobs.queue import JobQueue
from loraflow.jobs.registry import Registry
from loraflow.storage.model_source import InputPolicy
from loraflow.v1 import trainer_pb2
from tests.support.tiny_models import make_tiny_model_dir


@pytest.fixture
def s3_model(s3_store, tmp_path):
    """(store, raw_uri, published_uri, dataset_uri): one tiny checkpoint uploaded file by file (no marker)
    and the same checkpoint published whole."""
    model = make_tiny_model_dir(tmp_path / "model")
    for path in sorted(p for p in model.rglob("*") if p.is_file()):
        s3_store.put_file(f"models/raw/{path.relative_to(model).as_posix()}", path)  # what boto3 would do
    s3_store.publish_dir("models/published", model)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} ->", "completion": f" {i}"}) + "\n" for i in range(4)))
    dataset_uri = s3_store.put_file("datasets/data.jsonl", data)
    return s3_store, s3_store.uri("models/raw"), s3_store.uri("models/published"), dataset_uri


def _submit(servicer, base_model: str, dataset_uri: str):
    return servicer.SubmitTrainingJob(trainer_pb2.SubmitTrainingJobRequest(
        base_model=base_model, dataset_uri=dataset_uri, adapter_name="raw-check",
        lora=trainer_pb2.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
        training=trainer_pb2.TrainingConfig(max_steps=1, batch_size=2, max_seq_len=16)), None)


def test_trainer_refuses_an_unpublished_base_model_at_submit(s3_model, redis_url):
    from services.trainer.server import TrainerServiceServicer

    store, raw_uri, published_uri, dataset_uri = s3_model
    client = redis.Redis.from_url(redis_url)
    queue = JobQueue(client, "train")
    servicer = TrainerServiceServicer(queue, Registry(client), store, inputs=InputPolicy())
    with pytest.raises(FailedPrecondition) as err:
        _submit(servicer, raw_uri, dataset_uri)
    assert err.value.field == "base_model" and err.value.value == raw_uri
    assert ".manifest.json" in err.value.message and "publish_dir" in err.value.message
    assert queue.list()[0] == []  # nothing was queued
    with pytest.raises(NotFound) as missing:
        _submit(servicer, store.uri("models/nothing-here"), dataset_uri)
    assert missing.value.field == "base_model"
    job = _submit(servicer, published_uri, dataset_uri)  # the same bytes, published whole: accepted
    assert [j.id for j in queue.list()[0]] == [job.id]
    client.close()


def test_compiler_refuses_an_unpublished_base_model_or_adapter_at_plan(s3_model, redis_url, tmp_path):
    from services.compiler.inputs import CompileInputs
    from services.compiler.options import CompileOptions

    store, raw_uri, published_uri, _ = s3_model
    client = redis.Redis.from_url(redis_url)
    inputs = CompileInputs(store, Registry(client), tmp_path / "ccache", policy=InputPolicy())
    options = CompileOptions.from_dict({"ctx_len": 32, "prefill_seq_len": 8, "full_batch_size": 2})
    with pytest.raises(FailedPrecondition) as err:
        inputs.plan(raw_uri, [], options)
    assert err.value.field == "base_model" and "publish_dir" in err.value.message
    with pytest.raises(FailedPrecondition) as adapter_err:
        inputs.plan(published_uri, [raw_uri], options)  # any raw directory named as an adapter, too
    assert adapter_err.value.field == "adapters[0]"
    resolved = inputs.plan(published_uri, [], options)
    assert resolved.base_dir is None and inputs.fetch_base(published_uri, resolved.plan).is_dir()
    client.close()
