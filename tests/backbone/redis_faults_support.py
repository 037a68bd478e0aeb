"""Helpers of the Redis-fault tests: a Redis that can be SIGKILLed and restarted on its append-only file,
and service processes started the way a deployment starts them."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraflow.jobs.embedded_redis import EmbeddedRedis, free_port
from tests.support.polling import wait_for

ROOT = Path(__file__).resolve().parents[2]


class RestartableRedis:
    """A redis-server with a fixed port, password and data dir, so a restart replays the same AOF."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.port = free_port()
        self.password = secrets.token_urlsafe(12)
        self.url = f"redis://:{self.password}@127.0.0.1:{self.port}/0"
        self.server: EmbeddedRedis | None = None

    def start(self) -> RestartableRedis:
        self.server = EmbeddedRedis(data_dir=self.data_dir, port=self.port, password=self.password)
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown save, only what the append-only file already holds survives."""
        assert self.server is not None
        os.kill(self.server.pid, signal.SIGKILL)
        self.server._proc.wait()
        self.server = None

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None




class ServiceProcess:
    """`python -m services.NAME MODE ...` on a loopback port, logging to a file."""

    def __init__(self, name: str, mode: str, redis_url: str, tmp_path: Path, *extra: str):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"{name}-{mode}-{self.port}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "LORAFLOW_REDIS_URL": redis_url,
               "LORAFLOW_STORE_URL": (tmp_path / "store").as_uri(), "LORAFLOW_CACHE_DIR": str(tmp_path / "cache")}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", f"services.{name}", mode, "--listen", self.address,
                                          *extra], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.channel = grpc.insecure_channel(self.address)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health_status(self) -> int | None:
        try:
            return self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
        except grpc.RpcError:
            return None

    def wait_health(self, status: int, timeout: float = 60.0) -> None:
        def reached():
            assert self.proc.poll() is None, f"service exited with {self.proc.returncode}:\n{self.log()[-3000:]}"
            return self.health_status() == status
        wait_for(reached, timeout, f"health {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
