"""`loraflow up` as a user runs it: a subprocess with embedded Redis and the services present here, stopped
with SIGINT in bounded time and leaving no process behind."""

from __future__ import annotations

import json
import os
import queue
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from loraflow import errors
from loraflow.client import Client
from loraflow.console.up import SERVICES, service_available
from loraflow.jobs.embedded_redis import free_port
from tests.cli.procs import group_members, wait_gone

ROOT = Path(__file__).resolve().parents[2]


def _lines(stream) -> queue.Queue:
    q: queue.Queue = queue.Queue()

    def pump():
        for line in stream:
            q.put(line)
        q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return q


def _next_json(q: queue.Queue, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = q.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            raise AssertionError("loraflow up exited early")
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line within {timeout}s")


@pytest.mark.slow
def test_up_starts_services_and_stops_cleanly_on_sigint(tmp_path):
    ports = {name: free_port() for name in SERVICES}
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLOW_")}
    env.update(HOME=str(tmp_path), OMP_NUM_THREADS="1")
    home = tmp_path / "lf"
    argv = [sys.executable, "-m", "loraflow.cli",
            *[f"--{name}={'127.0.0.1'}:{port}" for name, port in ports.items()],
            "up", "--home", str(home), "-o", "json", "--ready-timeout", "240", "--grace", "20"]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr_lines = _lines(proc.stderr)
    try:
        ready = _next_json(_stdout := _lines(proc.stdout), 300)
        assert ready["ready"] is True
        running = {row["name"]: row for row in ready["services"]}
        expected = {"redis", *(name for name in SERVICES if service_available(name))}
        assert set(running) == expected
        assert ready["store_url"] == (home / "store").as_uri() and (home / "store").is_dir()
        pids = [row["pid"] for row in running.values()]
        assert all(pids)

        addresses = {name: f"127.0.0.1:{port}" for name, port in ports.items()}
        token_file = Path(ready["token_file"])
        assert token_file == home / "auth" / "token"
        for secret in (token_file, home / "auth" / "tokens"):  # the token up generated, readable by us only
            assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert stat.S_IMODE((home / "auth").stat().st_mode) == 0o700
        if "trainer" in running:  # the services demand the token: a client without it is turned away
            with Client(**addresses, token="not-the-token-0123456789", timeout=10) as stranger, \
                    pytest.raises(errors.Unauthenticated):
                stranger.list_jobs(kind="train")
        with Client(**addresses, token_file=str(token_file), timeout=10) as client:
            if "trainer" in running:
                assert running["trainer"]["status"] == "SERVING"
                assert client.health("trainer") == "SERVING"
                assert client.list_jobs(kind="train") == []  # the trainer really talks to the embedded Redis
            if "inference" in running:
                assert client.health("inference") in ("SERVING", "NOT_SERVING")
                assert client.list_models() == []

        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert time.monotonic() - started < 60
        assert _next_json(_stdout, 5) == {"stopped": True}
        assert wait_gone(pids, 5) == [], "a child outlived loraflow up"
        assert all(group_members(pid) == [] for pid in pids), "a grandchild outlived loraflow up"
        assert any((home / "redis").iterdir()), "embedded Redis keeps its data under the home"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        lines = []
        while not stderr_lines.empty():
            lines.append(stderr_lines.get() or "")
        print("".join(lines)[-4000:])


def test_up_refuses_an_unknown_service_naming_the_field(cli, tmp_path):
    code, out, err = cli("up", "--services", "trainer,gpu", "--home", str(tmp_path), "-o", "json")
    assert code == 1 and out == ""
    detail = json.loads(err)["error"]
    assert detail["code"] == "INVALID_ARGUMENT" and detail["field"] == "services" and detail["value"] == "gpu"
