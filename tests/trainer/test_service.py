"""The trainer over real gRPC, real Redis and a real file store, with an in-process worker thread."""

from __future__ import annotations

import json
import time

import grpc
import pytest

from loraflow.server.grpc_server import error_info
from loraflow.v1 import jobs_pb2, trainer_pb2
from tests.support.polling import wait_for
from tests.trainer.conftest import memorisable_lines

TERMINAL = {jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED}


def _request(base_model, dataset, name="adder", request_id="", **training):
    cfg = {"max_steps": 8, "batch_size": 4, "learning_rate": 5e-3, "max_seq_len": 32, "eval_fraction": 0.25,
           "checkpoint_every_steps": 4, **training}
    return trainer_pb2.SubmitTrainingJobRequest(
        base_model=str(base_model), dataset_uri=str(dataset), adapter_name=name, request_id=request_id,
        lora=trainer_pb2.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        training=trainer_pb2.TrainingConfig(**cfg), labels={"team": "tests"})


def _watch(stack, job_id, timeout=60):
    return list(stack.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id), timeout=timeout))


def _wait_state(stack, job_id, states, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = stack.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job_id))
        if job.state in states:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {states}; last {job}")


def test_job_lifecycle_events_metrics_and_adapter_registry(stack, tiny_llama, dataset_file):
    stack.start_worker(report_every_steps=2)
    job = stack.trainer.SubmitTrainingJob(_request(tiny_llama, dataset_file, request_id="req-1"))
    assert job.state in (jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_RUNNING) and job.kind == jobs_pb2.JOB_KIND_TRAIN
    assert job.labels["team"] == "tests"
    # Idempotent: the same request_id returns the original job, even after it started.
    assert stack.trainer.SubmitTrainingJob(_request(tiny_llama, dataset_file, request_id="req-1")).id == job.id

    events = _watch(stack, job.id)
    assert events[-1].state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    steps = [e for e in events if "loss" in e.metrics]
    assert [int(e.metrics["step"]) for e in steps] == [1, 2, 4, 6, 8]
    for e in steps:
        assert {"step", "loss", "learning_rate", "tokens_per_second"} <= set(e.metrics)
        assert e.metrics["tokens_per_second"] > 0 and "eta" in e.message
    evals = [e.metrics["eval_loss"] for e in events if "eval_loss" in e.metrics]
    assert len(evals) == 2  # at the checkpoint (step 4) and at the end
    assert any(e.message == "checkpoint at step 4" for e in events)
    assert all(0 <= e.progress <= 1 for e in events)

    done = stack.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.id))
    assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED and done.progress == 1
    result = done.train_result
    assert result.adapter_name == "adder" and result.metrics["steps"] == 8
    assert result.metrics["eval_loss"] < result.metrics["initial_eval_loss"]
    assert result.adapter_uri.startswith(stack.store.uri("adapters/adder/"))
    key = result.adapter_uri[len(stack.store.uri("")):].strip("/")
    assert stack.store.dir_exists(key)
    files = set(stack.store.read_manifest(key)["files"])
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.json", "loss_curve.png"} <= files
    assert result.loss_curve_uri == stack.store.uri(f"{key}/loss_curve.png")
    # Cleaned up once the result is published (just after SUCCEEDED, which the watch above may beat).
    wait_for(lambda: not stack.store.list_dirs(f"checkpoints/{job.id}"), timeout=30, what="checkpoint cleanup")

    adapter = stack.trainer.GetAdapter(trainer_pb2.GetAdapterRequest(name="adder"))
    assert adapter.uri == result.adapter_uri and adapter.job_id == job.id and adapter.base_model == str(tiny_llama)
    assert adapter.lora.r == 4 and list(adapter.lora.target_modules) == ["q_proj", "v_proj"]
    assert adapter.lora.lora_alpha == 8  # 0 = 2 * r
    assert len(adapter.digest) == 64 and adapter.metrics["steps"] == 8 and adapter.create_time.seconds > 0
    listed = stack.trainer.ListAdapters(trainer_pb2.ListAdaptersRequest())
    assert [a.name for a in listed.adapters] == ["adder"] and listed.next_page_token == ""

    # The name is taken now.
    with pytest.raises(grpc.RpcError) as e:
        stack.trainer.SubmitTrainingJob(_request(tiny_llama, dataset_file, request_id="req-2"))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS and "adder" in e.value.details()

    deleted = stack.trainer.DeleteAdapter(trainer_pb2.DeleteAdapterRequest(name="adder"))
    assert deleted.adapter.name == "adder"
    assert not stack.store.dir_exists(key)
    for call in (stack.trainer.GetAdapter, stack.trainer.DeleteAdapter):
        req = (trainer_pb2.GetAdapterRequest if call == stack.trainer.GetAdapter
               else trainer_pb2.DeleteAdapterRequest)(name="adder")
        with pytest.raises(grpc.RpcError) as e:
            call(req)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_queued_job_holds_its_adapter_name(stack, tiny_llama, dataset_file):
    first = stack.trainer.SubmitTrainingJob(_request(tiny_llama, dataset_file, name="held"))
    with pytest.raises(grpc.RpcError) as e:
        stack.trainer.SubmitTrainingJob(_request(tiny_llama, dataset_file, name="held"))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS and first.id in e.value.details()
    stack.jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id=first.id))
    second = stack.trainer.SubmitTrainingJob(_request(tiny_llama, dataset_file, name="held"))
    assert second.id != first.id  # a cancelled job gives the name back


def test_dataset_is_copied_into_the_store_at_submit(stack, tiny_llama, dataset_file):
    job = stack.trainer.SubmitTrainingJob(_request(tiny_llama, dataset_file))
    dataset_file.unlink()  # the worker must not need the client's file
    payload = stack.queue.get(job.id).payload
    assert stack.store.get_bytes(payload["dataset_key"]).decode().splitlines() == memorisable_lines()
    stack.start_worker()
    assert _watch(stack, job.id)[-1].state == jobs_pb2.JOB_STATE_SUCCEEDED


def test_cancel_during_training_publishes_nothing(stack, tiny_llama, dataset_file):
    worker, thread = stack.start_worker()
    job = stack.trainer.SubmitTrainingJob(_request(tiny_llama, dataset_file, name="never", max_steps=5000,
                                                   checkpoint_every_steps=5000))
    for event in stack.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id), timeout=60):
        if event.metrics.get("step", 0) >= 3:
            break
    cancelled = stack.jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.id))
    assert cancelled.state == jobs_pb2.JOB_STATE_CANCELLED
    deadline = time.monotonic() + 20
    while worker.jobs_done < 1 and time.monotonic() < deadline:  # the worker noticed and let go
        time.sleep(0.05)
    assert worker.jobs_done == 1
    final = stack.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.id))
    assert final.state == jobs_pb2.JOB_STATE_CANCELLED and not final.HasField("train_result")
    steps = [e.metrics["step"] for e in _watch(stack, job.id) if "loss" in e.metrics]
    assert max(steps) < 5000
    assert stack.registry.find_adapter("never") is None
    assert stack.store.list("adapters/never") == []
    with pytest.raises(grpc.RpcError) as e:
        stack.jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.id))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_worker_stop_checkpoints_releases_and_next_worker_resumes(stack, tiny_llama, dataset_file, monkeypatch):
    from services.trainer.training import LoraTrainer

    # Training holds at step 3 until the stop arrives: on a loaded host the 60 steps could otherwise all run
    # between the watcher seeing step 3 and the worker's stop (the job then succeeds, nothing to hand over).
    should_stop = LoraTrainer._should_stop

    def held_at_step_3(self) -> bool:
        if self.step >= 3:  # the job's next step then sees the worker stopping (its callback sets self.stop)
            stack.workers[0][0].stop_event.wait(timeout=60)
        return should_stop(self)

    monkeypatch.setattr(LoraTrainer, "_should_stop", held_at_step_3)
    worker, thread = stack.start_worker()
    job = stack.trainer.SubmitTrainingJob(_request(tiny_llama, dataset_file, name="handover", max_steps=60,
                                                   checkpoint_every_steps=1000))
    for event in stack.jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.id), timeout=60):
        if event.metrics.get("step", 0) >= 3:
            break
    stack.stop_worker(worker, thread)  # what SIGTERM does in __main__
    released = stack.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.id))
    assert released.state == jobs_pb2.JOB_STATE_QUEUED and "re-queued" in released.message
    (ckpt,) = stack.store.list_dirs(f"checkpoints/{job.id}")
    saved_step = int(ckpt.rsplit("step-", 1)[1])
    assert 3 <= saved_step < 60

    monkeypatch.setattr(LoraTrainer, "_should_stop", should_stop)  # the next worker trains to the end
    stack.start_worker()
    events = _watch(stack, job.id)
    assert events[-1].state == jobs_pb2.JOB_STATE_SUCCEEDED
    resumed = [e for e in events if "resumed_from_step" in e.metrics]
    assert [int(e.metrics["resumed_from_step"]) for e in resumed] == [saved_step]
    after = [int(e.metrics["step"]) for e in events[events.index(resumed[0]):] if "loss" in e.metrics]
    assert after[0] == saved_step + 1 and after[-1] == 60
    result = stack.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.id)).train_result
    assert result.metrics["resumed_from_step"] == saved_step and result.metrics["steps"] == 60


def _bad_jsonl(tmp_path, text, name="bad.jsonl"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda r, p: setattr(r, "adapter_name", ""), "adapter_name"),
    (lambda r, p: setattr(r, "adapter_name", "../etc"), "adapter_name"),
    (lambda r, p: setattr(r, "adapter_name", "x" * 65), "adapter_name"),
    (lambda r, p: setattr(r, "base_model", ""), "base_model"),
    (lambda r, p: setattr(r, "base_model", "/" + "a" * 5000), "base_model"),
    (lambda r, p: setattr(r, "base_model", str(p / "missing-model")), "base_model"),
    (lambda r, p: setattr(r, "base_model", "http://example.com/model"), "base_model"),
    (lambda r, p: setattr(r, "dataset_uri", ""), "dataset_uri"),
    (lambda r, p: setattr(r, "dataset_uri", str(p / "missing.jsonl")), "dataset_uri"),
    (lambda r, p: setattr(r, "dataset_uri", str(_bad_jsonl(p, ""))), "dataset_uri"),
    (lambda r, p: setattr(r, "dataset_uri", str(_bad_jsonl(p, '{"text": "a"}\n{"text": 1}\n'))),
     "dataset line 2: text"),
    (lambda r, p: setattr(r, "dataset_uri", str(_bad_jsonl(p, '{"text": "a"}\n{oops\n'))), "dataset line 2: json"),
    (lambda r, p: setattr(r, "dataset_uri", str(_bad_jsonl(p, '{"prompt": "a"}\n'))), "dataset line 1: keys"),
    (lambda r, p: r.lora.target_modules.append("qkv_proj"), "lora.target_modules[2]"),
    (lambda r, p: r.lora.target_modules.append("lm_head"), "lora.target_modules[2]"),
    (lambda r, p: r.lora.target_modules.append("embed_tokens"), "lora.target_modules[2]"),
    (lambda r, p: setattr(r.lora, "r", -1), "lora.r"),
    (lambda r, p: setattr(r.lora, "r", 0), "lora.r"),
    (lambda r, p: setattr(r.lora, "r", 100000), "lora.r"),
    (lambda r, p: setattr(r.lora, "lora_alpha", -2.0), "lora.lora_alpha"),
    (lambda r, p: setattr(r.lora, "lora_dropout", 1.0), "lora.lora_dropout"),
    (lambda r, p: setattr(r.lora, "bias", "most"), "lora.bias"),
    (lambda r, p: setattr(r.training, "batch_size", -4), "training.batch_size"),
    (lambda r, p: setattr(r.training, "eval_fraction", 0.9), "training.eval_fraction"),
    (lambda r, p: setattr(r.training, "device", "tpu"), "training.device"),
    (lambda r, p: setattr(r.training, "lr_scheduler", "exp"), "training.lr_scheduler"),
    (lambda r, p: setattr(r.training, "learning_rate", float("nan")), "training.learning_rate"),
    (lambda r, p: setattr(r, "request_id", "r" * 500), "request_id"),
    (lambda r, p: setattr(r, "request_id", "r" * 1_000_000), "request_id"),
    (lambda r, p: setattr(r, "request_id", "id with spaces\n"), "request_id"),
    (lambda r, p: r.labels.update({"bad key!": "v"}), "labels"),
])
def test_submit_rejects_every_bad_field(stack, tiny_llama, dataset_file, tmp_path, mutate, field):
    request = _request(tiny_llama, dataset_file)
    mutate(request, tmp_path)
    with pytest.raises(grpc.RpcError) as e:
        stack.trainer.SubmitTrainingJob(request, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    info = error_info(e.value)
    assert info is not None and info.metadata["field"] == field, (info, e.value.details())
    assert stack.queue.list()[0] == []  # nothing was queued


def test_submit_rejects_a_non_causal_lm_checkpoint(stack, dataset_file, tmp_path):
    for i, (config, why) in enumerate((({"model_type": "vit"}, "not a supported causal LM"), ("[1, 2]", "not a JSON object"),
                        ({"hidden_size": 8}, "model_type None"),
                        ("{nope", "not valid JSON"))):
        model = tmp_path / f"model-{i}"
        model.mkdir()
        (model / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        with pytest.raises(grpc.RpcError) as e:
            stack.trainer.SubmitTrainingJob(_request(model, dataset_file))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in e.value.details()
        assert error_info(e.value).metadata["field"] == "base_model"


def test_submit_refuses_a_model_family_no_compile_target_supports(redis_url, tmp_path, input_policy, dataset_file):
    """GPT-2 is a causal LM transformers trains, but the compiler has no family module for it: the submit
    fails naming base_model, the family and the supported list, before the model is built or data read."""
    from loraflow.artifact.model_families import SUPPORTED_MODEL_FAMILIES
    from services.trainer.server import ModelInspector
    from tests.trainer.conftest import TrainerStack

    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2,
                                                   "vocab_size": 100, "n_positions": 64}))
    inspector = ModelInspector()
    stack = TrainerStack(redis_url, tmp_path / "stack", inputs=input_policy, inspector=inspector)
    try:
        with pytest.raises(grpc.RpcError) as e:
            stack.trainer.SubmitTrainingJob(_request(model, dataset_file), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        details = e.value.details()
        assert "'gpt2'" in details and str(list(SUPPORTED_MODEL_FAMILIES)) in details, details
        info = error_info(e.value)
        assert info.metadata["field"] == "base_model" and info.metadata["value"] == str(model)
        assert inspector.builds == 0  # refused before the meta-device build
        assert stack.queue.list()[0] == []
    finally:
        stack.close()


@pytest.mark.parametrize(("method", "request_", "code", "field"), [
    ("GetAdapter", trainer_pb2.GetAdapterRequest(name=""), grpc.StatusCode.INVALID_ARGUMENT, "name"),
    ("GetAdapter", trainer_pb2.GetAdapterRequest(name="a/b"), grpc.StatusCode.INVALID_ARGUMENT, "name"),
    ("GetAdapter", trainer_pb2.GetAdapterRequest(name="n" * 1000), grpc.StatusCode.INVALID_ARGUMENT, "name"),
    ("GetAdapter", trainer_pb2.GetAdapterRequest(name="unknown"), grpc.StatusCode.NOT_FOUND, "name"),
    ("DeleteAdapter", trainer_pb2.DeleteAdapterRequest(name=""), grpc.StatusCode.INVALID_ARGUMENT, "name"),
    ("DeleteAdapter", trainer_pb2.DeleteAdapterRequest(name="unknown"), grpc.StatusCode.NOT_FOUND, "name"),
    ("ListAdapters", trainer_pb2.ListAdaptersRequest(page_size=-1), grpc.StatusCode.INVALID_ARGUMENT, "page_size"),
    ("ListAdapters", trainer_pb2.ListAdaptersRequest(page_size=5000), grpc.StatusCode.INVALID_ARGUMENT,
     "page_size"),
    ("ListAdapters", trainer_pb2.ListAdaptersRequest(page_token="garbage!"), grpc.StatusCode.INVALID_ARGUMENT,
     "page_token"),
    ("ListAdapters", trainer_pb2.ListAdaptersRequest(page_token="x" * 10000), grpc.StatusCode.INVALID_ARGUMENT,
     "page_token"),
])
def test_registry_rpcs_return_canonical_statuses(stack, method, request_, code, field):
    with pytest.raises(grpc.RpcError) as e:
        getattr(stack.trainer, method)(request_)
    assert e.value.code() == code, e.value.details()
    assert error_info(e.value).metadata["field"] == field


def test_list_adapters_pages(stack):
    from loraflow.jobs.registry import AdapterRecord

    for i in range(5):
        stack.registry.put_adapter(AdapterRecord(name=f"a{i}", uri=f"file:///x/a{i}", base_model="m",
                                                 lora={"r": 2}, create_time=1000.0 + i))
    names, token = [], ""
    while True:
        page = stack.trainer.ListAdapters(trainer_pb2.ListAdaptersRequest(page_size=2, page_token=token))
        names += [a.name for a in page.adapters]
        token = page.next_page_token
        if not token:
            break
    assert sorted(names) == [f"a{i}" for i in range(5)] and len(names) == 5
