"""Hostile base models against a real TrainerService (real gRPC, real Redis): a config.json that lies about
its sizes is refused before anything is built, a model over the workers' memory budget is refused naming
the estimate and the limit, a handler whose client left stops, and other callers are not slowed."""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest

from loraflow.options.budget import ResourceBudget
from loraflow.server.grpc_server import error_info
from loraflow.v1 import jobs_pb2, trainer_pb2
from tests.trainer.conftest import TrainerStack


def _request(base_model, dataset, name="adder", **training):
    return trainer_pb2.SubmitTrainingJobRequest(
        base_model=str(base_model), dataset_uri=str(dataset), adapter_name=name,
        lora=trainer_pb2.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
        training=trainer_pb2.TrainingConfig(**{"max_steps": 2, "batch_size": 2, "max_seq_len": 32, **training}))


def _model(tmp_path, name, tiny_llama, **changes):
    """A copy of the tiny model's config.json with `changes` (no weights: nothing may read them)."""
    config = json.loads((tiny_llama / "config.json").read_text())
    config.update(changes)
    model = tmp_path / name
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    return model


def _fails(stack, request, timeout=30):
    with pytest.raises(grpc.RpcError) as err:
        stack.trainer.SubmitTrainingJob(request, timeout=timeout)
    return err.value.code(), error_info(err.value), err.value.details()


@pytest.mark.parametrize(("changes", "field", "why"), [
    ({"num_hidden_layers": 1_000_000}, "base_model.num_hidden_layers", "must be in 1..1024"),
    ({"num_hidden_layers": "2"}, "base_model.num_hidden_layers", "must be an integer (not a string)"),
    ({"max_position_embeddings": 0}, "base_model.max_position_embeddings", "must be in 1.."),
    ({"rope_scaling": {"rope_type": "linear", "factor": "fast"}}, "base_model.rope_scaling.factor", "number"),
    ({"rope_parameters": [1, 2, 3]}, "base_model.rope_parameters", "must be an object or null"),
    ({"vocab_size": 10**15}, "base_model.vocab_size", "must be in 1.."),
])
def test_a_lying_config_is_invalid_argument_before_anything_is_built(stack, tiny_llama, dataset_file, tmp_path,
                                                                        changes, field, why):
    model = _model(tmp_path, "lying", tiny_llama, **changes)
    started = time.monotonic()
    code, info, details = _fails(stack, _request(model, dataset_file))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and info.metadata["field"] == field and why in details, details
    assert time.monotonic() - started < 10  # refused from the numbers, not after building a million layers
    assert stack.queue.list()[0] == [] and stack.store.list("datasets") == []


def test_a_model_over_the_budget_is_resource_exhausted_naming_estimate_and_limit(redis_url, tmp_path, tiny_llama,
                                                                                 dataset_file, input_policy):
    stack = TrainerStack(redis_url, tmp_path, inputs=input_policy,
                         budget=ResourceBudget(256 << 20, "--memory-budget 256.0 MiB"))
    try:
        # A valid 7B-shaped config: 32 layers of 4096, fp32 weights alone ~27 GB.
        big = _model(tmp_path, "big", tiny_llama, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, head_dim=128, vocab_size=32000)
        code, info, details = _fails(stack, _request(big, dataset_file))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert info.reason == "OVER_MEMORY_BUDGET" and info.metadata["field"] == "base_model"
        assert int(info.metadata["estimate_bytes"]) > 25e9 and info.metadata["limit_bytes"] == str(256 << 20)
        assert "fp32 weights" in details and "256.0 MiB" in details and "--memory-budget" in details
        assert stack.queue.list()[0] == []
        # The budget counts the job's own settings: the tiny model at a huge batch x sequence is over it too.
        code, info, details = _fails(stack, _request(tiny_llama, dataset_file, batch_size=4096, max_seq_len=4096))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "activations" in details, details
        # ...and at sane settings it fits.
        assert stack.trainer.SubmitTrainingJob(_request(tiny_llama, dataset_file), timeout=30).id
    finally:
        stack.close()


def test_hostile_submits_do_not_slow_other_callers(stack, tiny_llama, dataset_file, tmp_path):
    job = stack.queue.submit({"n": 1})
    models = [_model(tmp_path, f"m{i}", tiny_llama, num_hidden_layers=n)
              for i, n in enumerate((1_000_000, 1024 * 1024, 999_999))]
    stop = threading.Event()
    codes: list[grpc.StatusCode] = []

    def attack() -> None:
        while not stop.is_set():
            for model in models:
                try:
                    stack.trainer.SubmitTrainingJob(_request(model, dataset_file), timeout=30)
                except grpc.RpcError as err:
                    codes.append(err.code())

    attackers = [threading.Thread(target=attack) for _ in range(3)]
    for t in attackers:
        t.start()
    try:
        worst = 0.0
        for _ in range(40):
            started = time.monotonic()
            stack.jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.id), timeout=10)
            worst = max(worst, time.monotonic() - started)
            time.sleep(0.02)
    finally:
        stop.set()
        for t in attackers:
            t.join(30)
    assert codes and set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}
    # Each hostile call is refused from config.json alone; building these models would hold the GIL minutes.
    assert worst < 5.0, worst


def test_a_handler_whose_client_left_stops_before_queueing(redis_url, tmp_path, tiny_llama, dataset_file,
                                                           input_policy):
    from services.trainer.server import ModelInspector
    from services.trainer.training import inspect_base_model

    release = threading.Event()
    entered = threading.Event()

    def slow_build(config):
        entered.set()
        release.wait(30)  # a model whose meta build takes long (within the layer bound)
        return inspect_base_model(config)

    inspector = ModelInspector(build=slow_build)
    stack = TrainerStack(redis_url, tmp_path, inputs=input_policy, inspector=inspector)
    try:
        call = stack.trainer.SubmitTrainingJob.future(_request(tiny_llama, dataset_file), timeout=60)
        assert entered.wait(30)
        call.cancel()  # the client goes away while its base model is being inspected
        with pytest.raises(grpc.FutureCancelledError):
            call.result()
        release.set()
        time.sleep(1.0)  # long enough for a handler that kept going to copy the dataset and queue the job
        assert stack.queue.list()[0] == [] and stack.store.list("datasets") == []
        # The build finished on the pool and was kept: the next submit of this config builds nothing.
        builds = inspector.builds
        assert stack.trainer.SubmitTrainingJob(_request(tiny_llama, dataset_file), timeout=30).id
        assert inspector.builds == builds
    finally:
        release.set()
        stack.close()


def test_the_worker_refuses_a_planted_job_over_its_budget_before_loading_weights(redis_url, tmp_path, tiny_llama,
                                                                                 input_policy):
    """A payload put straight into Redis names a model the API never checked: the worker estimates first."""
    from services.trainer.training import TrainingSettings

    stack = TrainerStack(redis_url, tmp_path, inputs=input_policy,
                         budget=ResourceBudget(64 << 20, "--memory-budget 64.0 MiB"))
    try:
        big = _model(tmp_path, "big", tiny_llama, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                     num_attention_heads=16, num_key_value_heads=16, head_dim=128)
        # weights the worker must never read: a file it would fail on if it tried
        (big / "model.safetensors").write_bytes(b"not weights")
        stack.store.put_bytes("datasets/planted.jsonl", b'{"prompt": "a", "completion": "b"}\n')
        lora = {"r": 4, "lora_alpha": 8.0, "target_modules": ["q_proj"], "lora_dropout": 0.0, "bias": "none",
                "use_rslora": False}
        job = stack.queue.submit({"adapter_name": "planted", "base_model": str(big), "dataset_uri": "x",
                                  "dataset_key": "datasets/planted.jsonl", "dataset_records": 1,
                                  "model_type": "llama", "lora": lora,
                                  "training": TrainingSettings(max_steps=1).to_dict()})
        stack.start_worker()
        deadline = time.monotonic() + 30
        while (got := stack.queue.get(job.id)).state not in ("FAILED", "SUCCEEDED") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert got.state == "FAILED" and "needs an estimated" in got.error and "64.0 MiB" in got.error, got.error
    finally:
        stack.close()


def test_the_dataset_is_read_and_parsed_off_the_rpc_thread_and_a_gone_client_queues_nothing(
        redis_url, tmp_path, tiny_llama, dataset_file, input_policy, monkeypatch):
    import services.trainer.server as trainer_server

    read_on: list[str] = []
    release = threading.Event()
    entered = threading.Event()
    real_read = trainer_server.read_dataset_bytes

    def slow_read(uri, store, policy=None):
        read_on.append(threading.current_thread().name)
        entered.set()
        release.wait(30)  # a large dataset on a slow store
        return real_read(uri, store, policy)

    monkeypatch.setattr(trainer_server, "read_dataset_bytes", slow_read)
    stack = TrainerStack(redis_url, tmp_path, inputs=input_policy)
    try:
        call = stack.trainer.SubmitTrainingJob.future(_request(tiny_llama, dataset_file), timeout=60)
        assert entered.wait(30)
        # Meanwhile the server answers other calls: the read holds a preparation thread, not an RPC thread.
        assert stack.trainer.ListAdapters(trainer_pb2.ListAdaptersRequest(), timeout=10) is not None
        call.cancel()
        with pytest.raises(grpc.FutureCancelledError):
            call.result()
        release.set()
        time.sleep(1.0)  # long enough for a handler that kept going to queue the job
        assert stack.queue.list()[0] == []
        assert read_on and read_on[0].startswith("prepare")
        job = stack.trainer.SubmitTrainingJob(_request(tiny_llama, dataset_file, name="second"), timeout=30)
        assert job.id and len(read_on) == 2
    finally:
        release.set()
        stack.close()
