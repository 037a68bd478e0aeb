"""`loraflow train/adapters` against the real trainer API and worker (tiny random Llama, real Redis)."""

from __future__ import annotations

import json
import os

from loraflow.jobs.registry import AdapterRecord


def test_adapters_list_get_delete_json(trainer_stack, cli, cli_json):
    trainer = trainer_stack.address
    assert cli_json("adapters", "list", trainer=trainer) == {"adapters": []}
    for name in ("beta", "alpha"):
        trainer_stack.registry.put_adapter(AdapterRecord(
            name=name, uri=trainer_stack.store.uri(f"adapters/{name}"), base_model="tiny", job_id=f"train-{name}",
            lora={"r": 4, "lora_alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}, metrics={"train_loss": 1.5}))
    listed = cli_json("adapters", "list", trainer=trainer)["adapters"]
    assert [a["name"] for a in listed] == ["alpha", "beta"]
    assert listed[0]["lora"]["r"] == 4 and listed[0]["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert listed[0]["metrics"] == {"train_loss": 1.5} and listed[0]["create_time"]
    code, out, _ = cli("adapters", "list", trainer=trainer)
    assert code == 0 and "alpha" in out and "q_proj,v_proj" in out
    assert cli_json("adapters", "get", "beta", trainer=trainer)["uri"] == trainer_stack.store.uri("adapters/beta")
    assert cli_json("adapters", "delete", "beta", trainer=trainer)["deleted"]["name"] == "beta"
    code, _, err = cli("adapters", "get", "beta", trainer=trainer)
    assert code == 1 and "NOT_FOUND" in err and "field: name" in err


def test_train_rejects_bad_fields_with_code_and_field(trainer_stack, cli, tiny_llama, tiny_dataset):
    trainer = trainer_stack.address
    code, out, err = cli("train", str(tiny_llama), str(tiny_dataset), "--name", "a1", "--r", "-1", "-o", "json",
                         trainer=trainer)
    assert code == 1 and out == ""
    detail = json.loads(err)["error"]
    assert detail["code"] == "INVALID_ARGUMENT" and detail["field"] == "lora.r"
    code, _, err = cli("train", str(tiny_llama), str(tiny_dataset), "--name", "a1", "--targets", "nope_proj",
                       trainer=trainer)
    assert code == 1 and "INVALID_ARGUMENT" in err and "lora.target_modules" in err
    code, _, err = cli("train", str(tiny_llama), str(tiny_dataset.with_name("missing.jsonl")), "--name", "a1",
                       trainer=trainer)
    assert code == 1 and "dataset_uri" in err
    assert trainer_stack.queue.list()[0] == []  # nothing was queued


def test_train_wait_shows_progress_and_registers_the_adapter(trainer_stack, run_worker, cli, cli_json,
                                                            tiny_llama, tiny_dataset, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    trainer_stack.start_worker(run_worker)
    trainer = trainer_stack.address
    code, out, err = cli("train", str(tiny_llama), str(tiny_dataset), "--name", "rev", "--steps", "4",
                         "--batch-size", "4", "--lr", "1e-3", "--wait", trainer=trainer)
    assert code == 0, err
    # Not a terminal: one progress line per event on stderr (a live bar on a terminal).
    assert all(f"step {i}  loss" in err for i in range(1, 5)), err
    assert "SUCCEEDED" in out and "rev" in out
    jobs = cli_json("jobs", "list", trainer=trainer)["jobs"]
    assert len(jobs) == 1 and jobs[0]["state"] == "JOB_STATE_SUCCEEDED"
    assert jobs[0]["train_result"]["adapter_name"] == "rev"
    adapter = cli_json("adapters", "get", "rev", trainer=trainer)
    # --r not given: the field stays unset (proto `optional`) and the server's default rank, 8, applies.
    assert adapter["lora"]["r"] == 8 and adapter["job_id"] == jobs[0]["id"]
    adapter_dir = adapter["uri"].removeprefix("file://")
    assert os.path.isfile(os.path.join(adapter_dir, "adapter_config.json"))
