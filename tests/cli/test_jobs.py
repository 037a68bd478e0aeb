"""Client and `loraflow jobs ...` against the real JobService on loopback, over real Redis queues and a real
JobWorker."""

from __future__ import annotations

import json
import threading

import pytest

from loraflow import errors
from loraflow.client import JobFailed
from loraflow.v1 import jobs_pb2


def _submit(server, n: int) -> list[str]:
    return [server.queue.submit({"i": i}, labels={"n": str(i)}).id for i in range(n)]


def test_jobs_list_json_newest_first_with_stable_keys(train_jobs_server, cli_json):
    ids = _submit(train_jobs_server, 3)
    data = cli_json("jobs", "list", trainer=train_jobs_server.address)
    assert [j["id"] for j in data["jobs"]] == ids[::-1]
    job = data["jobs"][0]
    for key in ("id", "kind", "state", "create_time", "progress", "attempt", "message", "error", "labels",
                "request_id"):
        assert key in job, key
    assert job["kind"] == "JOB_KIND_TRAIN" and job["state"] == "JOB_STATE_QUEUED"
    assert job["labels"] == {"n": "2"}
    assert isinstance(job["attempt"], int)


def test_jobs_list_filters_and_limits(train_jobs_server, cli, cli_json):
    ids = _submit(train_jobs_server, 3)
    train_jobs_server.queue.cancel(ids[1])
    cancelled = cli_json("jobs", "list", "--state", "cancelled", trainer=train_jobs_server.address)
    assert [j["id"] for j in cancelled["jobs"]] == [ids[1]]
    limited = cli_json("jobs", "list", "--limit", "2", trainer=train_jobs_server.address)
    assert len(limited["jobs"]) == 2
    code, out, _ = cli("jobs", "list", trainer=train_jobs_server.address)
    assert code == 0
    assert all(i[:12] in out for i in ids)  # the table shows each id (rich may fold long cells)
    code, _, err = cli("jobs", "list", "--state", "sleeping", trainer=train_jobs_server.address)
    assert code == 1 and "INVALID_ARGUMENT" in err and "state" in err


def test_jobs_get_and_cancel(train_jobs_server, cli, cli_json):
    (job_id,) = _submit(train_jobs_server, 1)
    assert cli_json("jobs", "get", job_id, trainer=train_jobs_server.address)["state"] == "JOB_STATE_QUEUED"
    cancelled = cli_json("jobs", "cancel", job_id, trainer=train_jobs_server.address)
    assert cancelled["id"] == job_id and cancelled["state"] == "JOB_STATE_CANCELLED"
    assert cancelled["end_time"]
    assert train_jobs_server.queue.get(job_id).state == "CANCELLED"
    # A second cancel is refused: FAILED_PRECONDITION with the field, non-zero exit.
    code, out, err = cli("jobs", "cancel", job_id, trainer=train_jobs_server.address)
    assert code == 1 and out == ""
    assert "FAILED_PRECONDITION" in err and "field: job_id" in err and job_id in err


def test_errors_exit_nonzero_with_code_and_field(train_jobs_server, cli):
    code, _, err = cli("jobs", "get", "train-0000000000000000", trainer=train_jobs_server.address)
    assert code == 1 and "NOT_FOUND" in err and "field: job_id" in err
    code, out, err = cli("jobs", "get", "bad/../id", "-o", "json", trainer=train_jobs_server.address)
    assert code == 1 and out == ""
    detail = json.loads(err)["error"]
    assert detail["code"] == "INVALID_ARGUMENT" and detail["field"] == "job_id" and detail["value"] == "bad/../id"


def test_client_raises_loraflow_errors_from_status_details(train_jobs_server, client_for):
    client = client_for(trainer=train_jobs_server.address)
    with pytest.raises(errors.NotFound) as info:
        client.get_job("train-ffffffffffffffff")
    exc = info.value
    assert exc.code == "NOT_FOUND"
    assert exc.field == "job_id" and exc.value == "train-ffffffffffffffff"
    assert exc.reason and exc.service == "trainer" and exc.address == train_jobs_server.address
    with pytest.raises(errors.InvalidArgument):
        client.list_jobs(kind="bake")


def test_list_skips_a_service_that_is_down_but_not_all(train_jobs_server, client_for, cli):
    ids = _submit(train_jobs_server, 2)
    client = client_for(trainer=train_jobs_server.address)  # compiler at 127.0.0.1:1: nothing listens
    assert [j.id for j in client.list_jobs()] == ids[::-1]
    with pytest.raises(errors.Unavailable):
        client.list_jobs(kind="compile")
    code, _, err = cli("jobs", "list")  # every service down
    assert code == 1 and "UNAVAILABLE" in err


def _stepper(steps: int, gate: threading.Event | None = None):
    def handler(ctx):
        for step in range(1, steps + 1):
            ctx.report(step / steps, f"step {step}", {"step": step, "loss": 1.0 / step})
            if gate is not None:
                gate.wait(10)
            ctx.check()
        return {"adapter_name": "a1", "adapter_uri": "file:///tmp/a1", "metrics": {"train_loss": 0.5}}
    return handler


def test_wait_follows_events_to_success(train_jobs_server, run_worker, client_for):
    run_worker(train_jobs_server.queue, _stepper(3))
    job_id = train_jobs_server.queue.submit({}).id
    seen: list[jobs_pb2.JobEvent] = []
    job = client_for(trainer=train_jobs_server.address).wait(job_id, on_event=seen.append, timeout=30)
    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert job.train_result.adapter_name == "a1" and job.train_result.metrics["train_loss"] == 0.5
    steps = [e.metrics["step"] for e in seen if "step" in e.metrics]
    assert steps == [1.0, 2.0, 3.0]
    assert [e.seq for e in seen] == sorted(e.seq for e in seen)
    assert seen[-1].state == jobs_pb2.JOB_STATE_SUCCEEDED


def test_wait_raises_job_failed_with_the_error(train_jobs_server, run_worker, client_for):
    def broken(ctx):
        raise errors.InvalidArgument("dataset line 3 is not JSON", field="dataset_uri", value="x.jsonl")

    run_worker(train_jobs_server.queue, broken)
    job_id = train_jobs_server.queue.submit({}).id
    with pytest.raises(JobFailed) as info:
        client_for(trainer=train_jobs_server.address).wait(job_id, timeout=30)
    assert info.value.job.state == jobs_pb2.JOB_STATE_FAILED
    assert "dataset line 3 is not JSON" in str(info.value)
    assert info.value.reason == "JOB_FAILED"


def test_watch_json_lines_and_cancel_while_running(train_jobs_server, run_worker, cli, cli_json):
    gate = threading.Event()
    run_worker(train_jobs_server.queue, _stepper(50, gate))
    job_id = train_jobs_server.queue.submit({}).id
    # Let the worker take it, then cancel through the CLI while it runs.
    for event in train_jobs_server.queue.watch(job_id):
        if event.state == "RUNNING":
            break
    assert cli_json("jobs", "cancel", job_id, trainer=train_jobs_server.address)["state"] == "JOB_STATE_CANCELLED"
    gate.set()
    code, out, err = cli("jobs", "watch", job_id, "-o", "json", trainer=train_jobs_server.address)
    events = [json.loads(line) for line in out.splitlines()]
    assert events[0]["seq"] == 1 and events[-1]["state"] == "JOB_STATE_CANCELLED"
    assert code == 3 and json.loads(err)["error"]["reason"] == "JOB_CANCELLED"
    assert train_jobs_server.queue.get(job_id).result is None  # a cancelled job publishes nothing
