"""The process shape shared by the queue-backed services (trainer, compiler).

`python -m services.<name> [all|api|worker]`: `api` serves the service's gRPC API plus JobService,
health and reflection; `worker` runs the job loop; `all` (default) does both in one process.
Without a Redis URL an embedded redis-server is started. SIGTERM/SIGINT: health NOT_SERVING,
in-flight RPCs drain, a running job is released for another worker.

Readiness follows Redis: a monitor pings it every second. With the API (`all`, `api`), gRPC health
is SERVING only while Redis answers (and, in `all`, the worker's consumer group exists); RPCs that
need Redis answer UNAVAILABLE meanwhile. For `worker` (no gRPC port) the signals are the
`loraflow_worker_ready{queue=...}` gauge on the metrics endpoint and `--ready-file PATH`, a file that
exists exactly while ready (a Kubernetes exec probe: `test -f PATH`). The metrics port also answers
`/readyz` (200 while ready, else 503) and `/healthz` (503 once the process has been unable to work for
`--liveness-grace` seconds, or its loop died): httpGet probes. A worker started before Redis keeps
retrying with backoff; if its loop ever dies the process exits 1 rather than staying up idle.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import redis

from loraflow.jobs.queue import HandlerFn, JobQueue, JobWorker
from loraflow.jobs.registry import Registry
from loraflow.options.budget import ResourceBudget, add_budget_arguments, configure_process_budget
from loraflow.options.config import (
    LIVENESS_REDIS_CONNECTIONS,
    WORKER_REDIS_CONNECTIONS,
    Settings,
    api_redis_connections,
    connect_redis,
    mask_redis_url,
    seconds_arg,
)
from loraflow.options.settings import CACHE_DIR, LIVENESS_GRACE, READY_FILE, REDIS_URL, STORE_URL
from loraflow.security.settings import SecuritySettings, add_security_arguments
from loraflow.server.redis_health import (
    DEFAULT_LIVENESS_GRACE_S,
    HEALTH,
    MAX_LIVENESS_GRACE_S,
    WORKER_READY,
    ReadinessGate,
    ReadyFile,
    RedisMonitor,
)
from loraflow.storage.store import ObjectStore, open_store

# Threads serving unary RPCs (GetJob, Submit..., StorageService); streams have --max-concurrent-streams more.
API_UNARY_THREADS = 16


@dataclass(frozen=True)
class ServiceRedis:
    """The Redis clients of one process, each with a pool sized for who uses it (loraflow.options.config):

    api: the servicers (a connection for every stream and unary thread the server may run, plus headroom);
    worker: the job loop, its handler and distributed-training threads; liveness: lease renewals only.
    A role the process does not run has no client (None)."""

    api: redis.Redis | None
    worker: redis.Redis | None
    liveness: redis.Redis | None

    @classmethod
    def connect(cls, url: str, *, api: bool, worker: bool, max_concurrent_streams: int,
                unary_threads: int = API_UNARY_THREADS) -> ServiceRedis:
        return cls(
            api=connect_redis(url, max_connections=api_redis_connections(max_concurrent_streams, unary_threads))
            if api else None,
            worker=connect_redis(url, max_connections=WORKER_REDIS_CONNECTIONS) if worker else None,
            liveness=connect_redis(url, max_connections=LIVENESS_REDIS_CONNECTIONS) if worker else None)

    @property
    def any(self) -> redis.Redis:
        return next(c for c in (self.api, self.worker, self.liveness) if c is not None)

    def close(self) -> None:
        for client in (self.api, self.worker, self.liveness):
            if client is not None:
                client.close()


@dataclass(frozen=True)
class ServiceContext:
    """What servicers and handlers are built from."""

    settings: Settings
    redis: redis.Redis
    queue: JobQueue
    registry: Registry
    store: ObjectStore
    security: SecuritySettings
    args: argparse.Namespace


@dataclass(frozen=True)
class QueueServiceSpec:
    """How one queue-backed service differs from the others."""

    name: str  # "trainer"
    kind: str  # job kind / queue name: "train"
    default_port: int
    grpc_service_name: str  # full name, for health
    add_servicer: Callable[[object, object], None]  # generated add_XServicer_to_server
    make_servicer: Callable[[ServiceContext], object]
    make_handler: Callable[[ServiceContext], HandlerFn]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    serve_metrics: Callable[[int, SecuritySettings], None] | None = None  # (port, metrics host and limits)
    # Work beside the job loop (the trainer's --join-distributed follower): (ctx, handler, stop) -> join.
    start_companion: Callable[[ServiceContext, HandlerFn, threading.Event], Callable[[], None] | None] | None = None


def parse_args(spec: QueueServiceSpec, argv: list[str] | None = None) -> argparse.Namespace:
    listen = f"127.0.0.1:{spec.default_port}"  # loopback unless told otherwise: secure by default
    p = argparse.ArgumentParser(prog=f"python -m services.{spec.name}",
                                description=f"loraflow {spec.name}: API, worker, or both")
    p.add_argument("mode", nargs="?", default="all", choices=("all", "api", "worker"))
    p.add_argument("--listen", default=listen, help=f"HOST:PORT to serve on (default {listen})")
    for setting in (REDIS_URL, STORE_URL, CACHE_DIR):
        p.add_argument(setting.flag, default=None, help=setting.described())
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0 = off)")
    p.add_argument("--lease-seconds", type=float, default=30.0,
                   help="job lease; a dead worker's job is taken over after 3 leases")
    p.add_argument("--max-deliveries", type=int, default=3, help="lost runs before a job is dead-lettered")
    p.add_argument("--grace", type=float, default=10.0, help="seconds in-flight RPCs get on shutdown")
    p.add_argument("--ready-file", default=READY_FILE.raw(), metavar="PATH",
                   help=READY_FILE.described())
    p.add_argument("--liveness-grace", type=_liveness_grace,
                   default=LIVENESS_GRACE.raw() or DEFAULT_LIVENESS_GRACE_S, metavar="SECONDS",
                   help=LIVENESS_GRACE.described())
    p.add_argument("--log-level", default="INFO")
    add_security_arguments(p)
    add_budget_arguments(p)
    from loraflow.storage.storage_service import add_storage_arguments

    add_storage_arguments(p)
    if spec.add_arguments is not None:
        spec.add_arguments(p)
    return p.parse_args(argv)


def _liveness_grace(text: str) -> float:
    return seconds_arg(text, MAX_LIVENESS_GRACE_S)


def main(spec: QueueServiceSpec, argv: list[str] | None = None) -> int:
    args = parse_args(spec, argv)
    HEALTH.configure(args.liveness_grace)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s",
                        stream=sys.stderr)
    log = logging.getLogger(f"loraflow.{spec.name}")
    settings = Settings.from_env(redis_url=args.redis_url, store_url=args.store_url, cache_dir=args.cache_dir)
    security = SecuritySettings.from_args(args)
    # What servicers and handlers compare a job's estimated memory with (loraflow.options.budget).
    configure_process_budget(ResourceBudget.from_args(args))
    shutdown: list[Callable[[], None]] = []
    redis_url = settings.redis_url
    if redis_url is None:
        from loraflow.jobs.embedded_redis import EmbeddedRedis

        embedded = EmbeddedRedis()
        redis_url = embedded.url
        log.info("no redis URL given: started an embedded redis-server at %s", mask_redis_url(redis_url))
    else:
        embedded = None
    has_api, has_worker = args.mode != "worker", args.mode in ("all", "worker")
    clients = ServiceRedis.connect(redis_url, api=has_api, worker=has_worker,
                                   max_concurrent_streams=security.max_concurrent_streams)
    log.info("redis connections: %s", ", ".join(
        f"{role} {client.connection_pool.max_connections}" for role, client in
        (("api", clients.api), ("worker", clients.worker), ("lease renewals", clients.liveness)) if client))
    store = open_store(settings.store_url)

    def context(client: redis.Redis, liveness: redis.Redis | None = None) -> ServiceContext:
        queue = JobQueue(client, spec.kind, lease_seconds=args.lease_seconds, max_deliveries=args.max_deliveries,
                         liveness_redis=liveness)
        return ServiceContext(settings=settings, redis=client, queue=queue, registry=Registry(client), store=store,
                              security=security, args=args)

    # The API's servicers and the worker never share a pool: no client load can starve the worker.
    ctx = context(clients.api) if has_api else None
    worker_ctx = context(clients.worker, clients.liveness) if has_worker else None
    if args.metrics_port and spec.serve_metrics is not None:
        spec.serve_metrics(args.metrics_port, security)
        log.info("metrics on %s:%d/metrics", security.metrics_host, args.metrics_port)

    server = None
    serve_stop = threading.Event()  # set by SIGTERM/SIGINT (run_until_signal) or a dead worker thread
    if has_api:
        from loraflow.jobs.job_service import SERVICE_NAME as JOB_SERVICE_NAME
        from loraflow.server.grpc_server import GrpcServer
        from loraflow.storage.storage_service import SERVICE_NAME as STORAGE_SERVICE_NAME

        server = GrpcServer(listen=args.listen,
                            service_names=[spec.grpc_service_name, JOB_SERVICE_NAME, STORAGE_SERVICE_NAME],
                            security=security, max_workers=API_UNARY_THREADS)
    ready_file = ReadyFile(args.ready_file)

    def on_readiness(ready: bool) -> None:
        # One place decides what "ready" means: Redis answers and, with a worker, its group exists.
        ready_file(ready and not serve_stop.is_set())
        HEALTH.set_ready(ready and not serve_stop.is_set())
        HEALTH.set_working(ready)
        if has_worker:
            WORKER_READY.labels(queue=spec.kind).set(1 if ready else 0)
        if server is not None and not serve_stop.is_set():
            server.set_serving(ready)

    gate = ReadinessGate(on_readiness, redis=False, worker=not has_worker)
    monitor = RedisMonitor(clients.any, gate).start()
    shutdown.append(monitor.stop)

    stop = threading.Event()
    exit_code = 0
    if has_worker:
        handler = spec.make_handler(worker_ctx)
        worker = JobWorker(worker_ctx.queue, handler, stop_event=stop,
                           on_ready=lambda ready: gate.set("worker", ready))

        def run_worker() -> None:
            nonlocal exit_code
            try:
                worker.run()
            except BaseException:  # noqa: BLE001 - a dead loop must end the process, not leave it "up"
                log.exception("%s worker loop died; stopping the process", spec.name)
                exit_code = 1
                HEALTH.mark_dead(f"the {spec.kind} worker loop died")
                gate.set("worker", False)
                serve_stop.set()
                stop.set()

        worker_thread = threading.Thread(target=run_worker, name=f"{spec.kind}-worker")
        worker_thread.start()
        log.info("%s worker %s started (store %s)", spec.name, worker.consumer, store.uri())

        def stop_worker() -> None:
            stop.set()
            worker_thread.join()

        shutdown.append(stop_worker)
        join_companion = spec.start_companion(worker_ctx, handler, stop) if spec.start_companion else None
        if join_companion is not None:
            shutdown.append(join_companion)
    shutdown.append(lambda: ready_file(False))
    shutdown.append(clients.close)  # after the worker released its job
    if embedded is not None:
        shutdown.append(embedded.stop)

    if server is None:
        _wait_for_signal(stop, log)
        for callback in shutdown:
            callback()
        return exit_code

    from loraflow.jobs.job_service import add_job_service
    from loraflow.server.grpc_server import run_until_signal

    server.add(spec.add_servicer, spec.make_servicer(ctx))
    add_job_service(server, {spec.kind: ctx.queue})
    # Clients push models, adapters and datasets through the API they already talk to (loraflow models push).
    from loraflow.storage.storage_service import add_storage_service, limits_from_args

    add_storage_service(server, store, settings.cache_dir, limits_from_args(args))
    from loraflow.storage.upload_sweeper import BlobSweeper

    shutdown.append(BlobSweeper(store, args.upload_blob_ttl).start().stop)
    port = server.start(serving=False)
    gate.publish()  # health as of now (the monitor may have flipped it before the port was bound)
    log.info("%s %s listening on port %d", spec.name, args.mode, port)
    run_until_signal(server, on_shutdown=shutdown, grace=args.grace, stop_event=serve_stop)
    return exit_code


def _wait_for_signal(stop: threading.Event, log: logging.Logger) -> None:
    def on_signal(signum, _frame):
        log.info("signal %s: stopping the worker", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    while not stop.wait(0.5):
        pass
