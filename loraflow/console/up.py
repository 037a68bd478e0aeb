"""`loraflow up`: Redis, the file store and the services as supervised child processes on one machine.

The supervisor owns every child: each runs in its own session (so a terminal ^C reaches only the
supervisor, which then stops the services *before* Redis, letting a training worker checkpoint), gets
SIGTERM when the supervisor dies (Linux PR_SET_PDEATHSIG, so a killed supervisor leaves no orphans),
and is restarted with exponential backoff when it crashes.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console

from loraflow import errors
from loraflow.client import ADDRESS_SETTINGS, DEFAULT_ADDRESSES, UP_CLIENT_TOKEN_FILE, UP_TOKENS_FILE
from loraflow.console import formatting as fmt
from loraflow.jobs.embedded_redis import free_port, redis_server_args
from loraflow.options import settings
from loraflow.options.config import mask_redis_url, validate_redis_url
from loraflow.security.private_files import write_private

SERVICES = ("trainer", "compiler", "inference")


def default_home() -> Path:
    return Path(os.path.expanduser("~")) / ".loraflow"


def service_available(name: str) -> bool:
    """True when `python -m services.<name>` can run here (its package has a __main__)."""
    try:
        return importlib.util.find_spec(f"services.{name}.__main__") is not None
    except ModuleNotFoundError:
        return False


@dataclass(frozen=True)
class UpConfig:
    services: tuple[str, ...]
    redis_url: str | None
    store_url: str
    home: Path
    addresses: dict[str, str]
    ready_timeout: float = 180.0
    grace: float = 30.0
    json_output: bool = False
    explicit_services: bool = False

    def __post_init__(self) -> None:
        for name in self.services:
            if name not in SERVICES:
                raise errors.InvalidArgument(f"services: unknown service {name!r}; known: {list(SERVICES)}",
                                             field="services", value=name)
        if self.ready_timeout <= 0:
            raise errors.InvalidArgument(f"ready_timeout must be > 0, got {self.ready_timeout}",
                                         field="ready_timeout", value=self.ready_timeout)
        if self.grace < 0:
            raise errors.InvalidArgument(f"grace must be >= 0, got {self.grace}", field="grace", value=self.grace)
        if self.redis_url:
            validate_redis_url(self.redis_url)

    @classmethod
    def build(cls, *, services: list[str], redis_url: str | None, store_url: str | None, home: str | None,
              addresses: dict[str, str | None], ready_timeout: float = 180.0, grace: float = 30.0,
              json_output: bool = False) -> UpConfig:
        home_path = Path(os.path.expanduser(home)) if home else default_home()
        explicit = tuple(services) != SERVICES
        resolved = {name: addresses.get(name) or ADDRESS_SETTINGS[name].raw() or DEFAULT_ADDRESSES[name]
                    for name in SERVICES}
        return cls(services=tuple(services), redis_url=redis_url or None,
                   store_url=store_url or (home_path / "store").as_uri(), home=home_path, addresses=resolved,
                   ready_timeout=ready_timeout, grace=grace, json_output=json_output, explicit_services=explicit)


# ------------------------------------------------------------------------------------------------ children

_PR_SET_PDEATHSIG = 1
try:
    _LIBC = ctypes.CDLL("libc.so.6", use_errno=True) if sys.platform.startswith("linux") else None
except OSError:
    _LIBC = None


def _die_with_parent() -> None:
    # Runs in the forked child before exec: SIGTERM it when the supervisor goes away, however it went.
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass(frozen=True)
class ChildSpec:
    """One supervised process. `ready()` answers None until it is up, then a status word for the table."""

    name: str
    argv: tuple[str, ...]
    address: str
    log_path: Path
    ready: Callable[[], str | None]
    env: tuple[tuple[str, str], ...] = ()


@dataclass
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    next_start: float = 0.0
    backoff: float = 0.0
    status: str = "starting"
    pids: list[int] = field(default_factory=list)


class Supervisor:
    """Starts children, restarts crashed ones with exponential backoff, stops them in reverse order."""

    def __init__(self, specs: list[ChildSpec], *, grace: float = 30.0, backoff_initial: float = 1.0,
                 backoff_max: float = 30.0, stable_after: float = 60.0,
                 log: Callable[[str], None] = lambda line: None):
        self.children = [_Child(spec) for spec in specs]
        self.grace = grace
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stable_after = stable_after
        self.log = log

    def _spawn(self, child: _Child) -> None:
        spec = child.spec
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **dict(spec.env), "PYTHONUNBUFFERED": "1"}
        with open(spec.log_path, "ab") as log_file:
            child.proc = subprocess.Popen(list(spec.argv), stdin=subprocess.DEVNULL, stdout=log_file,
                                          stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                          preexec_fn=_die_with_parent)
        child.started_at = time.monotonic()
        child.pids.append(child.proc.pid)
        child.status = "starting"

    def start(self) -> None:
        for child in self.children:
            self._spawn(child)

    def poll(self) -> None:
        """Restart any child that exited; call this often from the main thread (PDEATHSIG is per thread)."""
        now = time.monotonic()
        for child in self.children:
            proc = child.proc
            if proc is not None and proc.poll() is not None:
                lived = now - child.started_at
                child.backoff = self.backoff_initial if lived >= self.stable_after or child.backoff == 0 \
                    else min(child.backoff * 2, self.backoff_max)
                child.next_start = now + child.backoff
                child.restarts += 1
                child.status = f"exited {proc.returncode}"
                child.proc = None
                self.log(f"{child.spec.name} exited with code {proc.returncode} after {lived:.1f}s; restarting in "
                         f"{child.backoff:.0f}s (log: {child.spec.log_path})")
            elif proc is None and now >= child.next_start:
                self._spawn(child)
            elif proc is not None and child.status in ("starting", "restarting"):
                status = child.spec.ready()
                if status is not None:
                    child.status = status

    def wait_ready(self, timeout: float, stop: threading.Event, max_startup_restarts: int = 3) -> None:
        """Until every child answers its readiness check; raises Unavailable naming the one that did not."""
        deadline = time.monotonic() + timeout
        while not stop.is_set():
            self.poll()
            pending = [c for c in self.children if c.proc is None or c.status == "starting"]
            if not pending:
                return
            for child in pending:
                if child.restarts >= max_startup_restarts:
                    raise errors.Unavailable(f"{child.spec.name} crashed {child.restarts} times while starting; "
                                             f"see {child.spec.log_path}:\n{_tail(child.spec.log_path)}",
                                             metadata={"service": child.spec.name})
            if time.monotonic() > deadline:
                names = ", ".join(c.spec.name for c in pending)
                raise errors.Unavailable(f"not ready after {timeout:.0f}s: {names} (logs in "
                                         f"{pending[0].spec.log_path.parent})", metadata={"service": names})
            stop.wait(0.25)

    def stop(self) -> None:
        """SIGTERM children in reverse start order (services before Redis), SIGKILL their groups after grace."""
        for child in reversed(self.children):
            proc = child.proc
            if proc is None or proc.poll() is not None:
                continue
            self.log(f"stopping {child.spec.name} (pid {proc.pid})")
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(self.grace)
            except subprocess.TimeoutExpired:
                self.log(f"{child.spec.name} did not stop within {self.grace:.0f}s; killing it")
            finally:
                _kill_group(proc)
            child.status = "stopped"

    def table_rows(self) -> list[dict]:
        return [{"name": c.spec.name, "address": c.spec.address, "pid": c.proc.pid if c.proc else None,
                 "status": c.status, "restarts": c.restarts, "log": str(c.spec.log_path)} for c in self.children]


def _kill_group(proc: subprocess.Popen) -> None:
    # The child leads its own session: its group holds it and anything it forked (e.g. a worker process).
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------------ readiness

def grpc_ready(address: str) -> Callable[[], str | None]:
    """Ready once the server answers grpc.health.v1 at all; the answer (SERVING / NOT_SERVING) is the status.

    NOT_SERVING counts as up: the inference service says NOT_SERVING until a model is loaded, and loading
    one is done through that very server.
    """
    channel = grpc.insecure_channel(address)
    stub = health_pb2_grpc.HealthStub(channel)

    def check() -> str | None:
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
        except grpc.RpcError:
            return None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    return check


def redis_ready(url: str) -> Callable[[], str | None]:
    import redis

    def check() -> str | None:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return "SERVING" if client.ping() else None
        except redis.RedisError:
            return None
        finally:
            client.close()

    return check


# ------------------------------------------------------------------------------------------------ token

UP_CALLER_NAME = "loraflow-up"


def write_tokens(home: Path) -> tuple[Path, Path]:
    """A fresh random token for this run of `up`: the services' tokens file and the clients' token file,
    both 0600 in a 0700 directory under the home. Returns (tokens_file, client_token_file)."""
    tokens_file, client_file = home / UP_TOKENS_FILE, home / UP_CLIENT_TOKEN_FILE
    tokens_file.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(tokens_file.parent, 0o700)
    token = secrets.token_urlsafe(32)
    write_private(tokens_file, f"# written by `loraflow up`; a new token every start\n{UP_CALLER_NAME}:{token}\n")
    write_private(client_file, token + "\n")
    return tokens_file, client_file


# ------------------------------------------------------------------------------------------------ plan + run

def plan(config: UpConfig, log: Callable[[str], None]) -> tuple[list[ChildSpec], str]:
    """The child processes `up` runs, in start order, and the Redis URL the services get."""
    logs = config.home / "logs"
    specs: list[ChildSpec] = []
    redis_url = config.redis_url
    if redis_url is None:
        port = free_port()
        data_dir = config.home / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)
        password = secrets.token_urlsafe(24)
        redis_url = f"redis://:{password}@127.0.0.1:{port}/0"
        # AOF persistence so queued jobs and the registries survive a restart of `loraflow up`; loopback
        # and a fresh random password (in a 0600 config file, not on the command line).
        specs.append(ChildSpec(
            name="redis", address=f"127.0.0.1:{port}", log_path=logs / "redis.log", ready=redis_ready(redis_url),
            argv=tuple(redis_server_args(port, data_dir, password))))
    env = ((settings.REDIS_URL.env, redis_url), (settings.STORE_URL.env, config.store_url),
           (settings.CACHE_DIR.env, str(config.home / "cache")))
    tokens_file, _ = write_tokens(config.home)
    for name in config.services:
        if not service_available(name):
            if config.explicit_services:
                raise errors.FailedPrecondition(f"services: {name} is not installed here (no services.{name}"
                                                f".__main__)", field="services", value=name)
            log(f"skipping {name}: services.{name} is not installed here")
            continue
        address = config.addresses[name]
        specs.append(ChildSpec(name=name, address=address, log_path=logs / f"{name}.log", ready=grpc_ready(address),
                               argv=(sys.executable, "-m", f"services.{name}", "all", "--listen", address,
                                     "--auth-tokens-file", str(tokens_file),
                                     # A laptop's services may read the user's own files, nothing else.
                                     "--allow-local-paths", f"{Path.home()},{Path.cwd()}"), env=env))
    return specs, redis_url


def run_up(config: UpConfig, out: Console, err: Console) -> int:
    """Run until SIGINT/SIGTERM; returns the exit code (0 after a clean stop, 1 when startup failed)."""
    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

    def log(line: str) -> None:
        if config.json_output:
            sys.stderr.write(json.dumps({"event": line}) + "\n")
        else:
            err.print(f"[dim]up:[/dim] {line}", highlight=False)

    supervisor: Supervisor | None = None
    try:
        (config.home / "store").mkdir(parents=True, exist_ok=True)
        specs, redis_url = plan(config, log)
        supervisor = Supervisor(specs, grace=config.grace, log=log)
        supervisor.start()
        log(f"starting {', '.join(s.name for s in specs)}; logs in {config.home / 'logs'}")
        supervisor.wait_ready(config.ready_timeout, stop)
        if stop.is_set():
            return 0
        _print_endpoints(config, redis_url, supervisor, out)
        while not stop.is_set():
            supervisor.poll()
            stop.wait(0.25)
        log("shutting down")
        return 0
    except errors.LoraflowError as exc:
        fmt.print_error(exc, "json" if config.json_output else "table", err)
        return 1
    finally:
        if supervisor is not None:
            supervisor.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if config.json_output:
            sys.stdout.write(json.dumps({"stopped": True}) + "\n")
            sys.stdout.flush()


def _print_endpoints(config: UpConfig, redis_url: str, supervisor: Supervisor, out: Console) -> None:
    rows = supervisor.table_rows()
    if config.json_output:
        sys.stdout.write(json.dumps({"ready": True, "redis_url": redis_url, "store_url": config.store_url,
                                     "home": str(config.home), "services": rows,
                                     "token_file": str(config.home / UP_CLIENT_TOKEN_FILE)}, sort_keys=True) + "\n")
        sys.stdout.flush()
        return
    table = fmt.table(f"loraflow up — store {config.store_url}", ["service", "address", "pid", "health", "log"],
                      [(r["name"], r["address"], r["pid"], r["status"], r["log"]) for r in rows])
    out.print(table)
    out.print(f"redis {mask_redis_url(redis_url)} · client token in {config.home / UP_CLIENT_TOKEN_FILE} (found by the CLI "
              f"when the home is ~/.loraflow, else set LORAFLOW_TOKEN_FILE) · Ctrl-C stops everything",
              highlight=False)
