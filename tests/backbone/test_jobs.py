"""The job queue in one process: lifecycle, events, idempotency, listing, cancellation, validation."""

from __future__ import annotations

import random
import threading
import time

import pytest
import redis

from loraflow.errors import FailedPrecondition, InvalidArgument, NotFound
from loraflow.jobs.queue import JobQueue, JobWorker, list_jobs_merged


@pytest.fixture
def client(redis_url):
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def queue(client):
    return JobQueue(client, "train", lease_seconds=1.0, max_deliveries=3)


class RunningWorker:
    """A JobWorker on a thread, stopped at teardown."""

    def __init__(self, queue, handler):
        self.worker = JobWorker(queue, handler, consumer="t-worker", poll_ms=50, reaper_interval=0.5)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.thread.start()

    def stop(self):
        self.worker.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()


def wait_terminal(queue, job_id, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = queue.get(job_id)
        if job.terminal:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} not terminal after {timeout}s: {queue.get(job_id)}")


def test_lifecycle_queued_running_succeeded_with_events(queue):
    job = queue.submit({"steps": 3}, labels={"team": "a"})
    assert job.state == "QUEUED" and job.attempt == 0 and job.start_time is None
    assert job.id.startswith("train-")

    seen = {}

    def handler(ctx):
        seen["running"] = queue.get(ctx.job_id)
        for i in range(3):
            ctx.check()
            ctx.report((i + 1) / 3, f"step {i + 1}", {"step": i + 1, "loss": 2.0 / (i + 1)})
        return {"adapter_name": "a1", "adapter_uri": "file:///x"}

    w = RunningWorker(queue, handler)
    try:
        done = wait_terminal(queue, job.id)
    finally:
        w.stop()
    assert seen["running"].state == "RUNNING" and seen["running"].attempt == 1
    assert done.state == "SUCCEEDED" and done.progress == 1.0
    assert done.result == {"adapter_name": "a1", "adapter_uri": "file:///x"}
    assert done.create_time <= done.start_time <= done.end_time
    assert done.labels == {"team": "a"}
    events = queue.events(job.id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [e.state for e in events] == ["QUEUED", "RUNNING", "RUNNING", "RUNNING", "RUNNING", "SUCCEEDED"]
    assert events[3].metrics == {"step": 2.0, "loss": 1.0}
    assert [e.seq for e in queue.events(job.id, after_seq=4)] == [5, 6]
    assert list(queue.watch(job.id, after_seq=5)) == events[5:]


def test_handler_exception_fails_the_job_with_reason(queue):
    job = queue.submit({})

    def handler(ctx):
        raise ValueError("dataset line 3 is not JSON")

    w = RunningWorker(queue, handler)
    try:
        done = wait_terminal(queue, job.id)
    finally:
        w.stop()
    assert done.state == "FAILED"
    assert done.error == "ValueError: dataset line 3 is not JSON"
    assert done.result is None


def test_request_id_is_idempotent(queue, client):
    first = queue.submit({"a": 1}, request_id="req-1")
    again = queue.submit({"a": 2}, request_id="req-1")
    other = queue.submit({"a": 1}, request_id="req-2")
    assert again.id == first.id and again.payload == {"a": 1}
    assert other.id != first.id
    assert client.xlen(queue.stream_key) == 2  # the duplicate was not queued
    # Another kind has its own request ids.
    compile_queue = JobQueue(client, "compile")
    assert compile_queue.submit({}, request_id="req-1").id != first.id


def test_submit_succeeded_is_born_terminal(queue, client):
    job = queue.submit_succeeded({"k": 1}, {"artifact_id": "abc"}, request_id="hit")
    assert job.state == "SUCCEEDED" and job.result == {"artifact_id": "abc"} and job.end_time is not None
    assert client.xlen(queue.stream_key) == 0
    assert [e.state for e in queue.events(job.id)] == ["SUCCEEDED"]
    assert queue.submit_succeeded({}, {}, request_id="hit").id == job.id


def test_list_filters_and_pages_newest_first(queue, client):
    ids = [queue.submit({"i": i}).id for i in range(7)]
    queue.cancel(ids[1])
    queue.cancel(ids[4])
    seen, token = [], ""
    while True:
        page, token = queue.list(page_size=3, page_token=token)
        assert len(page) <= 3
        seen.extend(r.id for r in page)
        if not token:
            break
    assert seen == ids[::-1]
    cancelled, token = queue.list(state="CANCELLED", page_size=1)
    assert [r.id for r in cancelled] == [ids[4]] and token
    rest, token2 = queue.list(state="CANCELLED", page_size=1, page_token=token)
    assert [r.id for r in rest] == [ids[1]] and token2 == ""
    queued, _ = queue.list(state="QUEUED", page_size=100)
    assert {r.id for r in queued} == set(ids) - {ids[1], ids[4]}
    # Paging across two queues keeps one newest-first order.
    compile_queue = JobQueue(client, "compile")
    cid = compile_queue.submit({}).id
    merged, token = list_jobs_merged([queue, compile_queue], page_size=2)
    assert [r.id for r in merged] == [cid, ids[6]] and token
    merged2, _ = list_jobs_merged([queue, compile_queue], page_size=2, page_token=token)
    assert [r.id for r in merged2] == [ids[5], ids[4]]


@pytest.mark.parametrize("kwargs, field", [
    ({"page_size": 0}, "page_size"), ({"page_size": 1001}, "page_size"), ({"page_token": "garbage!"}, "page_token"),
    ({"page_token": "W10"}, "page_token"), ({"state": "DONE"}, "state"),
])
def test_list_rejects_bad_arguments(queue, kwargs, field):
    with pytest.raises(InvalidArgument) as info:
        queue.list(**kwargs)
    assert info.value.field == field


def test_bad_ids_and_unknown_jobs(queue):
    with pytest.raises(NotFound) as info:
        queue.get("train-doesnotexist")
    assert info.value.field == "job_id"
    for bad in ["", "../x", "a" * 65]:
        with pytest.raises(InvalidArgument):
            queue.get(bad)
        with pytest.raises(InvalidArgument):
            queue.cancel(bad)
    with pytest.raises(NotFound):
        queue.cancel("train-nope")
    with pytest.raises(InvalidArgument):
        queue.submit({}, request_id="x" * 1000)
    with pytest.raises(InvalidArgument):
        queue.submit({}, labels={"../bad": "v"})
    with pytest.raises(InvalidArgument):
        JobQueue(queue.redis, "bake")


def test_cancel_queued_job_never_runs(queue, client):
    job = queue.submit({})
    cancelled = queue.cancel(job.id)
    assert cancelled.state == "CANCELLED" and cancelled.end_time is not None
    ran = []
    w = RunningWorker(queue, lambda ctx: ran.append(ctx.job_id) or {})
    try:
        deadline = time.monotonic() + 5
        while client.xlen(queue.stream_key) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        w.stop()
    assert ran == [] and client.xlen(queue.stream_key) == 0
    with pytest.raises(FailedPrecondition):
        queue.cancel(job.id)


def test_cancel_reaches_a_running_handler_quickly(queue):
    job = queue.submit({})
    started = threading.Event()
    stopped_at = {}

    def handler(ctx):
        started.set()
        from loraflow.errors import JobCancelled
        try:
            while True:
                ctx.check()
                time.sleep(0.05)
        except JobCancelled:
            stopped_at["t"] = time.monotonic()
            raise

    w = RunningWorker(queue, handler)
    try:
        assert started.wait(5)
        t0 = time.monotonic()
        queue.cancel(job.id)
        deadline = time.monotonic() + 5
        while "t" not in stopped_at and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        w.stop()
    assert stopped_at["t"] - t0 < 1.0
    final = queue.get(job.id)
    assert final.state == "CANCELLED" and final.result is None


@pytest.mark.parametrize("seed", range(6))
def test_cancel_at_random_points_never_publishes(queue, client, seed):
    """Whatever the moment of the cancel, a cancelled job has no result, and a refused cancel means success."""
    rng = random.Random(seed)
    job = queue.submit({})

    def handler(ctx):
        for _ in range(4):
            ctx.report(0.5, "working")
            time.sleep(0.03)
        ctx.succeed({"adapter_name": "x"}, commit=lambda pipe: pipe.incr(f"published:{ctx.job_id}"))

    w = RunningWorker(queue, handler)
    try:
        time.sleep(rng.uniform(0.0, 0.4))
        try:
            queue.cancel(job.id)
            cancelled = True
        except FailedPrecondition:
            cancelled = False
        final = wait_terminal(queue, job.id)
        deadline = time.monotonic() + 5
        while client.xlen(queue.stream_key) and time.monotonic() < deadline:
            time.sleep(0.02)  # let the worker finish with the entry
    finally:
        w.stop()
    published = int(client.get(f"published:{job.id}") or 0)
    if cancelled:
        assert final.state == "CANCELLED" and final.result is None and published == 0
        assert [e.state for e in queue.events(job.id)][-1] == "CANCELLED"
    else:
        assert final.state == "SUCCEEDED" and published == 1


def test_late_write_of_an_old_attempt_is_rejected(queue):
    """Fencing without processes: a second delivery bumps the attempt; the first context loses every write."""
    from loraflow.errors import LeaseLost
    from loraflow.jobs.queue import JobContext

    job = queue.submit({})
    queue.ensure_group()
    msg_id = queue.redis.xreadgroup("workers", "w1", {queue.stream_key: ">"}, count=1)[0][1][0][0].decode()
    status, attempt = queue._start(job.id, "w1", msg_id)
    assert (status, attempt) == ("STARTED", 1)
    old = JobContext(queue, queue.get(job.id), 1, msg_id, threading.Event())
    status, attempt = queue._start(job.id, "w2", msg_id)  # what the reaper does after a takeover
    assert (status, attempt) == ("STARTED", 2)
    with pytest.raises(LeaseLost):
        old.report(0.9, "late")
    with pytest.raises(LeaseLost):
        old.check()
    with pytest.raises(LeaseLost):
        old.succeed({"x": 1})
    new = JobContext(queue, queue.get(job.id), 2, msg_id, threading.Event())
    new.succeed({"x": 2})
    assert queue.get(job.id).result == {"x": 2}
