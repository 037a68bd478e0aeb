"""`make test-compose`: the README's compose quickstart, verbatim, against deploy/docker-compose.yml (with the
override that swaps in locally built Redis and S3 images), then faults: a trainer worker killed mid-job and a
Redis crash. It runs on the host and talks to the stack only over the published ports, as a user would.

run.sh prepares the engine, the base image and the environment (COMPOSE_FILE, DOCKER_CONFIG, ...) and tears
the stack down whatever happens; the session fixture here also brings it down when the tests end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from loraflow.client import Client
from loraflow.errors import LoraflowError
from tests.support.peft_reference import PeftReference
from tests.support.tiny_models import make_tiny_model_dir

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BLOCK = re.compile(r"<!-- compose-quickstart:begin -->\s*```bash\n(.*?)```\s*<!-- compose-quickstart:end -->", re.S)
# The quickstart may take this long on a fresh machine: it builds the five images.
QUICKSTART_TIMEOUT = 1200


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run this through `make test-compose` (deploy/compose-test/run.sh)")
    return value


def compose(*args: str, work: Path, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([_env("DOCKER"), "compose", *args], cwd=work, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker compose {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def inspect(container: str) -> dict:
    out = subprocess.run([_env("DOCKER"), "inspect", container], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)[0]


def wait_until(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (LoraflowError, subprocess.CalledProcessError) as exc:  # a service restarting: ask again
            value, last = None, exc
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last})")


def copy_tree(work: Path) -> None:
    """The tracked (and new, not ignored) files of this checkout, so deploy/auth and the build context are the
    test's own; the venv is shared."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        src = ROOT / name
        if src.is_file():
            dst = work / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    (work / ".venv").symlink_to(ROOT / ".venv")


@dataclass
class Stack:
    work: Path
    model_dir: Path
    base: str
    artifact: str
    model_id: str
    token: str
    log: Path

    def client(self) -> Client:
        return Client(token=self.token, timeout=60)

    def container(self, service: str) -> str:
        ids = compose("ps", "-q", service, work=self.work).stdout.split()
        assert len(ids) == 1, f"{service}: expected one container, got {ids}"
        return ids[0]


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    work = Path(_env("LORAFLOW_COMPOSE_WORKDIR"))
    copy_tree(work)
    model_dir = make_tiny_model_dir(tmp_path_factory.mktemp("model") / "tiny")
    script = BLOCK.search(README.read_text())
    assert script, "README.md has no compose-quickstart block"
    out = tmp_path_factory.mktemp("quickstart")
    log = out / "quickstart.log"
    # Where the host has no sudo (CI runs as root), sudo is the identity; everything else runs as written.
    shim = 'sudo() { "$@"; }\n' if os.geteuid() == 0 and not shutil.which("sudo") else ""
    harness = (f"{shim}set -euo pipefail\n{script.group(1)}\n"
               f'printf "%s\\n" "$BASE" "$ARTIFACT" "$MODEL_ID" "$LORAFLOW_TOKEN" > {out}/vars\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORAFLOW_TOKEN", "VIRTUAL_ENV"))}
    env.update(MODEL=str(model_dir),
               COMPOSE_FILE="deploy/docker-compose.yml:deploy/compose-test/docker-compose.test.yml")
    started = time.monotonic()
    with open(log, "w") as sink:
        proc = subprocess.run(["bash", "-c", harness], cwd=work, env=env, stdout=sink, stderr=subprocess.STDOUT,
                              timeout=QUICKSTART_TIMEOUT)
    print(f"README compose quickstart: {time.monotonic() - started:.0f} s (log {log})")
    if proc.returncode != 0:
        logs = compose("logs", "--no-color", "--tail", "40", work=work, check=False).stdout
        pytest.fail(f"the README compose quickstart exited {proc.returncode}:\n{log.read_text()[-4000:]}\n"
                    f"--- docker compose logs ---\n{logs[-6000:]}")
    base, artifact, model_id, token = (out / "vars").read_text().splitlines()
    stack = Stack(work=work, model_dir=model_dir, base=base, artifact=artifact, model_id=model_id, token=token,
                  log=log)
    yield stack
    compose("down", "-v", "--remove-orphans", work=work, check=False, timeout=600)


# ------------------------------------------------------------------------------------------------ the quickstart

@pytest.mark.timeout(QUICKSTART_TIMEOUT + 300)
def test_quickstart_then_one_mixed_batch_whose_rows_equal_peft(stack, tmp_path):
    client = stack.client()
    models = {m.model_id: m for m in client.list_models()}
    assert stack.model_id in models and [a.name for a in models[stack.model_id].adapters] == ["badge", "vex"]
    # The generate line of the quickstart printed a completion.
    assert "completion tokens" in stack.log.read_text()

    adapters = {}
    for name in ("badge", "vex"):
        adapter = client.get_adapter(name)
        assert adapter.uri.startswith("s3://loraflow/"), adapter.uri
        adapters[name] = Path(client.pull(adapter.uri, tmp_path / name, progress=False).dest)
    reference = PeftReference(stack.model_dir, adapters)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(stack.model_dir / "tokenizer.json"))
    prompts = ["Make a badge: year=1987; city=Lyon; name=Maya", "Convert 1993-03-21 to a Vex date.",
               "the quick brown fox", "Make a badge: name=Ingrid; city=Seville; year=1954"]
    rows = [("badge", prompts[0]), ("vex", prompts[1]), ("", prompts[2]), ("vex", prompts[3]), ("badge", prompts[2])]
    requests = [dict(prompt=tokenizer.encode(p).ids, model_id=stack.model_id, adapter=a, max_new_tokens=8)
                for a, p in rows]
    got: dict[int, list[int]] = {i: [] for i in range(len(rows))}
    for index, chunk in client.generate_batch(requests):
        got[index].extend(chunk.token_ids)
    for i, (adapter, prompt) in enumerate(rows):
        expected = reference.generate(tokenizer.encode(prompt).ids, adapter, 8)
        assert got[i] == expected, f"row {i} ({adapter or 'base'}): {got[i]} != PEFT {expected}"
    # The adapters change the output (else equal rows would prove little about per-row adapters).
    assert got[0] != reference.generate(tokenizer.encode(prompts[0]).ids, "", 8) or \
        got[4] != reference.generate(tokenizer.encode(prompts[2]).ids, "", 8)
    # Those rows ran through the LoraRows kernel the images build (compiler: the native graph; inference:
    # the library it loads).
    logs = compose("logs", "--no-color", "inference", work=stack.work).stdout
    loaded = [line for line in logs.splitlines() if '"event": "model_loaded"' in line and stack.model_id in line]
    assert loaded and all('"lora_kernel": "native"' in line for line in loaded), loaded or logs[-3000:]


@pytest.mark.timeout(600)
def test_host_paths_given_to_train_reach_the_containers_through_a_push(stack):
    """`loraflow train ./model ./data.jsonl` with no flag: the trainer on localhost runs in a container and
    refuses host paths, so the CLI pushes both and sends the store URIs."""
    env = {**os.environ, "LORAFLOW_TOKEN": stack.token}
    proc = subprocess.run([str(ROOT / ".venv/bin/loraflow"), "train", str(stack.model_dir),
                           "examples/data/vex_train.jsonl", "--name", "from-host", "--steps", "3", "--wait",
                           "-o", "json"], cwd=stack.work, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = json.loads(proc.stdout)
    assert job["state"] == "JOB_STATE_SUCCEEDED", job
    assert stack.client().get_adapter("from-host").base_model.startswith("s3://loraflow/store/uploads/models/")


# ------------------------------------------------------------------------------------------------ faults

def crash_and_wait_for_restart(stack: Stack, service: str, timeout: float) -> float:
    """SIGKILL the service's main process from the host (a crash, not an operator's stop) and wait for the
    restart policy to bring it back healthy; the seconds that took."""
    container = stack.container(service)
    before = inspect(container)
    os.kill(before["State"]["Pid"], signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: _running_and_healthy(container, before["RestartCount"]), timeout=timeout,
               what=f"the restart policy to bring {service} back, healthy")
    return time.monotonic() - killed


def _running_and_healthy(container: str, restarts_above: int) -> bool:
    state = inspect(container)
    return (state["RestartCount"] > restarts_above and state["State"]["Running"]
            and state["State"].get("Health", {}).get("Status") == "healthy")


@pytest.mark.timeout(900)
def test_trainer_worker_killed_mid_job_restarts_and_the_job_succeeds_exactly_once(stack):
    """SIGKILL of the worker's process, as the kernel's OOM killer would do it (`docker kill` counts as an
    operator's stop, which restart policies deliberately leave stopped)."""
    client = stack.client()
    request_id = f"crash-{uuid.uuid4().hex[:8]}"
    job = client.train(stack.base, _dataset_uri(stack), "crashy", steps=160, checkpoint_every=20, lr=2e-3,
                       request_id=request_id)
    wait_until(lambda: _running_past(client, job.id, 0.3), timeout=300,
               what="the job to pass 30% (two checkpoints)")
    killed = time.monotonic()
    back = crash_and_wait_for_restart(stack, "trainer-worker", timeout=180)
    done = client.wait(job.id, "train", timeout=600)
    print(f"killed worker: healthy again after {back:.0f} s, job done {time.monotonic() - killed:.0f} s after the kill")
    assert _state(done) == "SUCCEEDED"
    assert done.attempt == 2, f"the job ran {done.attempt} times"
    metrics = done.train_result.metrics
    assert metrics["resumed_from_step"] >= 20 and metrics["steps"] == 160, dict(metrics)
    # Exactly once: one job for the request, one registered adapter, produced by the second attempt.
    same = [j for j in client.list_jobs("train") if j.request_id == request_id]
    assert [j.id for j in same] == [job.id]
    assert [a.name for a in client.list_adapters()].count("crashy") == 1
    adapter = client.get_adapter("crashy")
    assert adapter.job_id == job.id and adapter.uri.endswith(f"{job.id}-a2"), adapter.uri
    assert client.train(stack.base, _dataset_uri(stack), "crashy", steps=160, checkpoint_every=20, lr=2e-3,
                        request_id=request_id).id == job.id


@pytest.mark.timeout(900)
def test_redis_crash_loses_no_accepted_job(stack):
    """A job accepted while no worker runs, then Redis SIGKILLed: AOF (fsync every second) and the restart
    policy bring the queue back, and the job runs once the worker is back."""
    client = stack.client()
    compose("stop", "trainer-worker", work=stack.work)
    job = client.train(stack.base, _dataset_uri(stack), "after-crash", steps=5, request_id=uuid.uuid4().hex)
    assert _state(client.get_job(job.id)) == "QUEUED"
    time.sleep(2.5)  # past one AOF fsync (everysec)
    print(f"killed Redis: healthy again after {crash_and_wait_for_restart(stack, 'redis', timeout=120):.0f} s")
    assert _state(wait_until(lambda: client.get_job(job.id), timeout=60, what="the trainer API to reach Redis")) \
        == "QUEUED"
    compose("start", "trainer-worker", work=stack.work)
    done = client.wait(job.id, "train", timeout=300)
    assert _state(done) == "SUCCEEDED" and done.attempt == 1
    # What was there before the crash is still there: adapters, artifact, the loaded model.
    assert {"badge", "vex", "after-crash"} <= {a.name for a in client.list_adapters()}
    assert stack.artifact in {a.artifact_id for a in client.list_artifacts()}
    assert stack.model_id in {m.model_id for m in client.list_models()}


def _state(job) -> str:
    from loraflow.v1 import jobs_pb2

    return jobs_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")


def _running_past(client: Client, job_id: str, fraction: float) -> bool:
    job = client.get_job(job_id)
    assert _state(job) in ("QUEUED", "RUNNING"), f"job {job_id} is {_state(job)}: {job.error}"
    return _state(job) == "RUNNING" and job.progress >= fraction


_DATASETS: dict[str, str] = {}


def _dataset_uri(stack: Stack) -> str:
    """The badge dataset, pushed through the StorageService (the same bytes: already published, nothing sent)."""
    if "badge" not in _DATASETS:
        result = stack.client().push("dataset", stack.work / "examples/data/badge_train.jsonl")
        assert result.target.startswith("s3://loraflow/")
        _DATASETS["badge"] = result.target
    return _DATASETS["badge"]
