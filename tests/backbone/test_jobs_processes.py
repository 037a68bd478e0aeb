"""Workers in separate processes: crash takeover, zombie fencing, dead letters, graceful SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from loraflow.jobs.queue import JobQueue
from tests.support.polling import wait_for

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


class Workers:
    def __init__(self, redis_url: str, tmp_path: Path):
        self.redis_url, self.tmp_path = redis_url, tmp_path
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.tmp_path / f"{name}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "tests.backbone.toy_worker", self.redis_url, name, *args],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text()

    def stop_all(self):
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                proc.wait()


@pytest.fixture
def workers(redis_url, tmp_path):
    w = Workers(redis_url, tmp_path)
    yield w
    w.stop_all()




def _setup(redis_url, **kw):
    client = redis.Redis.from_url(redis_url)
    return client, JobQueue(client, "train", lease_seconds=kw.get("lease", 1.0),
                            max_deliveries=kw.get("max_deliveries", 3))


def test_sigkilled_worker_job_is_taken_over_and_succeeds_once(redis_url, workers):
    client, queue = _setup(redis_url)
    job = queue.submit({"task": "toy"})
    a = workers.start("worker-a", "--steps", "10", "--step-seconds", "0.2")
    wait_for(lambda: queue.get(job.id).progress >= 0.2, 20, "worker-a to make progress")
    b = workers.start("worker-b", "--steps", "10", "--step-seconds", "0.1")
    a.kill()
    a.wait()
    done = wait_for(lambda: (j := queue.get(job.id)).terminal and j, 20, "the job to finish on worker-b")
    assert done.state == "SUCCEEDED", done
    assert done.attempt == 2
    assert done.result["adapter_uri"] == "mem://worker-b"
    assert int(client.get(f"toy:published:{job.id}")) == 1
    assert [s.decode() for s in client.lrange(f"toy:started:{job.id}", 0, -1)] == ["worker-a:1", "worker-b:2"]
    states = [(e.state, e.message) for e in queue.events(job.id)]
    assert ("RUNNING", "running (attempt 2)") in states
    assert [s for s, _ in states].count("SUCCEEDED") == 1
    assert "reclaimed job" in workers.log("worker-b")
    assert b.poll() is None  # the live worker keeps serving


def test_stopped_worker_cannot_publish_after_takeover(redis_url, workers):
    client, queue = _setup(redis_url)
    job = queue.submit({"task": "toy"})
    zombie = workers.start("zombie", "--mode", "sleep", "--steps", "10", "--step-seconds", "0.2")
    wait_for(lambda: queue.get(job.id).state == "RUNNING", 20, "the zombie to start")
    os.kill(zombie.pid, signal.SIGSTOP)
    workers.start("live", "--mode", "sleep", "--steps", "5", "--step-seconds", "0.1")
    done = wait_for(lambda: (j := queue.get(job.id)).terminal and j, 20, "the live worker to finish")
    assert done.state == "SUCCEEDED" and done.attempt == 2
    os.kill(zombie.pid, signal.SIGCONT)
    fenced = wait_for(lambda: client.lrange(f"toy:fenced:{job.id}", 0, -1), 10, "the zombie's publish attempt")
    assert fenced == [b"zombie"]
    after = queue.get(job.id)
    assert after.result["adapter_uri"] == "mem://live"
    assert after.attempt == 2
    assert int(client.get(f"toy:published:{job.id}")) == 1
    assert "fenced" in workers.log("zombie")


def test_always_crashing_job_is_dead_lettered_after_max_deliveries(redis_url, workers):
    client, queue = _setup(redis_url, lease=0.4, max_deliveries=3)
    job = queue.submit({"task": "toy"})
    runs = 0
    deadline = time.monotonic() + 40
    current = None
    while not queue.get(job.id).terminal:
        assert time.monotonic() < deadline, "job never reached a terminal state"
        if current is None or current.poll() is not None:
            if current is not None:
                assert current.returncode == 3
            runs += 1
            current = workers.start(f"crasher-{runs}", "--mode", "crash", "--lease", "0.4",
                                    "--max-deliveries", "3", "--step-seconds", "0.05")
        time.sleep(0.05)
    final = queue.get(job.id)
    assert final.state == "FAILED"
    assert "dead-lettered after 3 deliveries" in final.error
    assert final.attempt == 3
    assert client.llen(f"toy:started:{job.id}") == 3
    dead = queue.dead_letters()
    assert [d["job_id"] for d in dead] == [job.id]
    assert "dead-lettered" in dead[0]["reason"]
    assert client.get(f"toy:published:{job.id}") is None
    # Nothing is left in the work stream's pending list.
    assert client.xpending(queue.stream_key, "workers")["pending"] == 0


def test_sigterm_releases_the_job_to_another_worker_without_failing_it(redis_url, workers):
    client, queue = _setup(redis_url)
    job = queue.submit({"task": "toy"})
    a = workers.start("term-a", "--steps", "20", "--step-seconds", "0.2")
    wait_for(lambda: queue.get(job.id).progress >= 0.1, 20, "term-a to make progress")
    workers.start("term-b", "--steps", "5", "--step-seconds", "0.1")
    # term-b is ready once its loop runs (it then polls the stream every 0.2 s).
    wait_for(lambda: "worker term-b on queue train started" in workers.log("term-b"), 20, "term-b to start")
    a.send_signal(signal.SIGTERM)
    assert a.wait(10) == 0  # the worker exits cleanly after releasing the job
    done = wait_for(lambda: (j := queue.get(job.id)).terminal and j, 20, "term-b to finish the job")
    assert done.state == "SUCCEEDED", done
    assert done.attempt == 2 and done.releases == 1
    assert done.result["adapter_uri"] == "mem://term-b"
    events = queue.events(job.id)
    assert "FAILED" not in [e.state for e in events]
    released = next(e for e in events if e.state == "QUEUED" and "re-queued" in e.message)
    restarted = next(e for e in events if e.message == "running (attempt 2)")
    # Handed over at once through a fresh stream entry, not after the reaper's 3-lease wait.
    assert (restarted.time - released.time).total_seconds() < 2.0
    assert int(client.get(f"toy:published:{job.id}")) == 1
