"""The trainer process of one Kubernetes Indexed Job pod: ``--one-job`` and/or ``--role follower``.

    python -m services.trainer worker --one-job --allow-distributed-training --rdzv-host train-0.train ...
        node 0: take exactly one job from the queue, run it (world_size > 1: its ranks as node 0, rendezvous
        store on --rdzv-port), exit with the job's outcome
    python -m services.trainer worker --role follower --node-rank 1 --rdzv-host train-0.train [--one-job] ...
        node k > 0: take nothing from the queue; host node rank k of the runs node 0 opens at
        --rdzv-host:--rdzv-port (one of them with --one-job), then exit with the job's outcome

Exit status (EXIT_*): 0 the job succeeded in this attempt; 1 it failed; 3 it was cancelled; 4 this attempt
ended without an outcome and the job is (or will be) redelivered: a stop signal (SIGTERM checkpoints and
releases, as the normal worker's graceful shutdown does), a crashed rank, a lost lease; 5 stopped before
any job (or run) came. So a Job's pod failure policy can tell a failed training job (1, 3) from a
disruption (4, 5). A follower without --one-job runs until SIGTERM and exits 0.

What is the same as the plain worker: the handler (TrainingHandler), the lease, fencing, checkpoints,
the readiness file, /readyz and /healthz on the metrics port. What is not: no gRPC API, and a Redis URL is
required (an embedded Redis would share no queue with anybody).
"""

from __future__ import annotations

import argparse
import logging
import random
import signal
import sys
import threading
import time

import redis

from loraflow.jobs.queue import REDIS_UNREACHABLE, JobQueue, JobRecord, JobWorker
from loraflow.jobs.registry import Registry
from loraflow.options.budget import ResourceBudget, configure_process_budget
from loraflow.options.config import LIVENESS_REDIS_CONNECTIONS, Settings, connect_redis, mask_redis_url
from loraflow.security.settings import SecuritySettings
from loraflow.server.redis_health import HEALTH, WORKER_READY, ReadinessGate, ReadyFile, RedisMonitor
from loraflow.storage.store import open_store
from services.trainer.node_flags import NodeMode

log = logging.getLogger("loraflow.trainer.node")

EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
EXIT_CANCELLED = 3
EXIT_REDELIVERED = 4
EXIT_STOPPED = 5

POLL_MS = 1000
MAX_BACKOFF_S = 2.0


def exit_code(record: JobRecord | None, attempt: int) -> int:
    """The process exit status for attempt ``attempt`` of the job as Redis now holds it."""
    if record is None or record.attempt != attempt:
        return EXIT_REDELIVERED  # another attempt owns it (or it is gone): not this attempt's outcome
    return {"SUCCEEDED": EXIT_SUCCEEDED, "FAILED": EXIT_FAILED, "CANCELLED": EXIT_CANCELLED}.get(record.state,
                                                                                               EXIT_REDELIVERED)


def run_one_job(queue: JobQueue, handler, stop: threading.Event, *, poll_ms: int = POLL_MS,
                on_ready=None) -> int:
    """Take jobs until the handler ran once (skipped or dead-lettered deliveries do not count); its exit status."""
    taken: list[tuple[str, int]] = []

    def once(ctx):
        taken.append((ctx.job_id, ctx.attempt))
        return handler(ctx)

    worker = JobWorker(queue, once, stop_event=stop, poll_ms=poll_ms, on_ready=on_ready)
    backoff = 0.1
    while not taken and not stop.is_set():
        try:
            queue.ensure_group()
            if on_ready is not None:
                on_ready(True)
            worker.run_once(timeout_ms=poll_ms)
            backoff = 0.1
        except REDIS_UNREACHABLE as exc:
            if on_ready is not None:
                on_ready(False)
            log.warning("redis unreachable (%s); retrying", type(exc).__name__)
            stop.wait(random.uniform(0.5, 1.0) * backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)
    if not taken:
        log.info("stopped before a job came")
        return EXIT_STOPPED
    job_id, attempt = taken[0]
    code = exit_code(_find(queue, job_id, stop), attempt)
    log.info("job %s attempt %d done: exit status %d", job_id, attempt, code)
    return code


def follow_one_run(follower, queue: JobQueue, stop: threading.Event, *, settle_seconds: float | None = None) -> int:
    """Host one run (of the pinned node 0, at the pinned node rank), then wait for node 0 to end the job's
    attempt; the exit status of that outcome. A pinned run that needs fewer nodes than ours: 0 at once."""
    while not stop.is_set():
        try:
            if follower.run_once():
                break
        except redis.RedisError as exc:
            log.warning("run board unreachable (%s); retrying", type(exc).__name__)
            stop.wait(1.0)
            continue
        if follower.not_needed is not None:
            run = follower.not_needed
            log.info("job %s needs %d nodes; node rank %d has nothing to do", run.job_id, run.nnodes,
                     follower.node_rank)
            return EXIT_SUCCEEDED
        stop.wait(0.2)
    if follower.last is None:
        log.info("stopped before a run came")
        return EXIT_STOPPED
    run, node, rc = follower.last
    # Node 0 publishes (or fails, or re-queues) after the ranks end; a node 0 that died leaves the job RUNNING
    # until the reaper takes it over (3 leases): give up waiting well before that matters to the pod.
    deadline = time.monotonic() + (settle_seconds if settle_seconds is not None else max(60.0, 3 * queue.lease_seconds))
    while True:
        record = _find(queue, run.job_id, None)
        if record is None or record.attempt != run.attempt or record.state != "RUNNING":
            break
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    code = exit_code(record, run.attempt)
    log.info("node %d of job %s attempt %d done (ranks' status %s): exit status %d", node, run.job_id,
             run.attempt, rc, code)
    return code


def _find(queue: JobQueue, job_id: str, stop: threading.Event | None) -> JobRecord | None:
    from loraflow.jobs.queue import retry_redis

    return retry_redis(lambda: queue.find(job_id), budget=queue.outage_seconds, what=f"job {job_id} outcome",
                       stop=stop)


def main(args: argparse.Namespace, mode: NodeMode, make_handler) -> int:
    """Run this process as ``mode`` says (args as services.trainer's parser made them)."""
    from loraflow.jobs.queue_service import ServiceContext

    HEALTH.configure(args.liveness_grace)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s",
                        stream=sys.stderr)
    settings = Settings.from_env(redis_url=args.redis_url, store_url=args.store_url, cache_dir=args.cache_dir)
    if settings.redis_url is None:
        what = "--one-job" if mode.one_job else "--role follower"
        raise SystemExit(f"{what} needs --redis-url (or LORAFLOW_REDIS_URL): an embedded Redis shares its queue "
                         "with nobody")
    security = SecuritySettings.from_args(args)
    configure_process_budget(ResourceBudget.from_args(args))  # --memory-budget: what a job may take here
    client = connect_redis(settings.redis_url)
    # Lease renewals on connections of their own (loraflow.options.config.LIVENESS_REDIS_CONNECTIONS).
    liveness = connect_redis(settings.redis_url, max_connections=LIVENESS_REDIS_CONNECTIONS)
    queue = JobQueue(client, "train", lease_seconds=args.lease_seconds, max_deliveries=args.max_deliveries,
                     liveness_redis=liveness)
    ctx = ServiceContext(settings=settings, redis=client, queue=queue, registry=Registry(client),
                         store=open_store(settings.store_url), security=security, args=args)
    if args.metrics_port:
        from services.trainer.metrics import serve_metrics

        serve_metrics(args.metrics_port, security.metrics_host, limits=security.limits)
    stop = threading.Event()
    ready_file = ReadyFile(args.ready_file)

    def on_readiness(ready: bool) -> None:
        ready_file(ready and not stop.is_set())
        HEALTH.set_ready(ready and not stop.is_set())
        HEALTH.set_working(ready)
        WORKER_READY.labels(queue="train").set(1 if ready else 0)

    gate = ReadinessGate(on_readiness, redis=False, worker=mode.role == "follower")
    monitor = RedisMonitor(client, gate).start()
    handler = make_handler(ctx)
    log.info("trainer %s%s (node rank %s, rendezvous %s:%d, redis %s, store %s)", mode.role,
             " --one-job" if mode.one_job else "", mode.node_rank, handler.rdzv_host, mode.rdzv_port,
             mask_redis_url(settings.redis_url), ctx.store.uri())
    result: list[int] = []

    def work() -> None:
        try:
            if mode.role == "worker":
                result.append(run_one_job(queue, handler, stop, on_ready=lambda r: gate.set("worker", r)))
                return
            from services.trainer.follower import RunFollower

            follower = RunFollower(handler, queue, stop, node_rank=mode.node_rank, endpoint=mode.follower_endpoint)
            if mode.one_job:
                result.append(follow_one_run(follower, queue, stop))
            else:
                follower.run()
                result.append(EXIT_SUCCEEDED)
        except BaseException:  # noqa: BLE001 - the process must end with a status, not hang
            log.exception("the trainer %s loop died", mode.role)
            HEALTH.mark_dead(f"the trainer {mode.role} loop died")
            result.append(EXIT_FAILED)
        finally:
            done.set()

    done = threading.Event()
    thread = threading.Thread(target=work, name=f"train-{mode.role}")

    def on_signal(signum, _frame):
        log.info("signal %s: stopping (a running job checkpoints and is released)", signal.Signals(signum).name)
        stop.set()
        ready_file(False)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    thread.start()
    while not done.wait(0.5):
        pass
    thread.join()
    monitor.stop()
    ready_file(False)
    return result[0] if result else EXIT_FAILED
