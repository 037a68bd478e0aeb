"""python -m services.trainer [all|api|worker] [--listen HOST:PORT] [--redis-url URL] [--store-url URL]
[--cache-dir DIR] [--metrics-port N]

`api` serves TrainerService + JobService (+ health and reflection); `worker` trains queued jobs;
`all` (default) does both in one process. Without a Redis URL an embedded redis-server is started.
SIGTERM/SIGINT: health NOT_SERVING, in-flight RPCs drain, a running job checkpoints and is released.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading

from loraflow.config import Settings, connect_redis
from loraflow.jobs import JobQueue, JobWorker
from loraflow.registry import Registry
from loraflow.store import open_store

DEFAULT_LISTEN = "0.0.0.0:50051"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.trainer", description=__doc__.splitlines()[0])
    p.add_argument("mode", nargs="?", default="all", choices=("all", "api", "worker"))
    p.add_argument("--listen", default=DEFAULT_LISTEN, help=f"HOST:PORT to serve on (default {DEFAULT_LISTEN})")
    p.add_argument("--redis-url", default=None, help="Redis URL (env LORAFLOW_REDIS_URL; unset = embedded)")
    p.add_argument("--store-url", default=None, help="object store (env LORAFLOW_STORE_URL)")
    p.add_argument("--cache-dir", default=None, help="local cache (env LORAFLOW_CACHE_DIR)")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0 = off)")
    p.add_argument("--lease-seconds", type=float, default=30.0,
                   help="job lease; a dead worker's job is taken over after 3 leases")
    p.add_argument("--max-deliveries", type=int, default=3, help="lost runs before a job is dead-lettered")
    p.add_argument("--report-every-steps", type=int, default=5, help="progress event every N steps")
    p.add_argument("--grace", type=float, default=10.0, help="seconds in-flight RPCs get on shutdown")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s",
                        stream=sys.stderr)
    log = logging.getLogger("loraflow.trainer")
    settings = Settings.from_env(redis_url=args.redis_url, store_url=args.store_url, cache_dir=args.cache_dir)
    embedded = None
    redis_url = settings.redis_url
    if redis_url is None:
        from loraflow.embedded_redis import EmbeddedRedis

        embedded = EmbeddedRedis()
        redis_url = embedded.url
        log.info("no redis URL given: started an embedded redis-server at %s", redis_url)
    client = connect_redis(redis_url)
    queue = JobQueue(client, "train", lease_seconds=args.lease_seconds, max_deliveries=args.max_deliveries)
    registry = Registry(client)
    store = open_store(settings.store_url)
    if args.metrics_port:
        from services.trainer.metrics import serve_metrics

        serve_metrics(args.metrics_port)
        log.info("metrics on :%d/metrics", args.metrics_port)

    stop = threading.Event()
    worker_thread = None
    if args.mode in ("all", "worker"):
        from services.trainer.metrics import TrainerMetrics
        from services.trainer.worker import TrainingHandler

        handler = TrainingHandler(store, registry, settings.cache_dir, report_every_steps=args.report_every_steps,
                                  metrics=TrainerMetrics())
        worker = JobWorker(queue, handler, stop_event=stop)
        worker_thread = threading.Thread(target=worker.run, name="train-worker")
        worker_thread.start()
        log.info("training worker %s started (store %s)", worker.consumer, store.uri())

    def stop_worker() -> None:
        stop.set()
        if worker_thread is not None:
            worker_thread.join()

    shutdown = [stop_worker]
    if embedded is not None:
        shutdown.append(embedded.stop)

    if args.mode == "worker":
        _wait_for_signal(stop)
        for callback in shutdown:
            callback()
        return 0

    from loraflow.grpc_server import GrpcServer, run_until_signal
    from loraflow.job_service import SERVICE_NAME as JOB_SERVICE_NAME
    from loraflow.job_service import add_job_service
    from loraflow.v1 import trainer_pb2_grpc
    from services.trainer.server import SERVICE_NAME, TrainerServiceServicer

    server = GrpcServer(listen=args.listen, service_names=[SERVICE_NAME, JOB_SERVICE_NAME])
    server.add(trainer_pb2_grpc.add_TrainerServiceServicer_to_server, TrainerServiceServicer(queue, registry, store))
    add_job_service(server, {"train": queue})
    port = server.start()
    log.info("trainer %s listening on port %d", args.mode, port)
    run_until_signal(server, on_shutdown=shutdown, grace=args.grace)
    return 0


def _wait_for_signal(stop: threading.Event) -> None:
    import signal

    def on_signal(signum, _frame):
        logging.getLogger("loraflow.trainer").info("signal %s: stopping the worker", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    while not stop.wait(0.5):
        pass


if __name__ == "__main__":
    sys.exit(main())
