"""A tiny JobWorker process for the multi-process tests: `python -m tests.backbone.toy_worker URL NAME [opts]`.

Modes:
  steps     report + check every step (cancellable, stoppable), then publish
  sleep     sleep through the steps without checking (a worker that only notices at publish time)
  crash     os._exit(3) in the middle of the job (a worker that dies every time)

Publishing increments `toy:published:{job_id}` in the same transaction as the result, so a test can
count how many results landed; a fenced publish pushes the consumer name to `toy:fenced:{job_id}`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time

import redis

from loraflow.errors import LeaseLost
from loraflow.jobs.queue import JobQueue, JobWorker


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("redis_url")
    parser.add_argument("consumer")
    parser.add_argument("--mode", choices=["steps", "sleep", "crash"], default="steps")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--step-seconds", type=float, default=0.2)
    parser.add_argument("--lease", type=float, default=1.0)
    parser.add_argument("--max-deliveries", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.consumer} %(levelname)s %(message)s")

    client = redis.Redis.from_url(args.redis_url)
    queue = JobQueue(client, "train", lease_seconds=args.lease, max_deliveries=args.max_deliveries)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def handler(ctx):
        client.rpush(f"toy:started:{ctx.job_id}", f"{args.consumer}:{ctx.attempt}")
        for step in range(args.steps):
            if args.mode == "crash" and step == args.steps // 2:
                os._exit(3)
            if args.mode == "steps":
                ctx.check()
                ctx.report((step + 1) / args.steps, f"step {step + 1}/{args.steps}", {"step": step + 1})
            time.sleep(args.step_seconds)
        result = {"adapter_name": f"toy-{ctx.job_id}", "adapter_uri": f"mem://{args.consumer}",
                  "metrics": {"steps": float(args.steps)}}
        try:
            ctx.succeed(result, commit=lambda pipe: pipe.incr(f"toy:published:{ctx.job_id}"))
        except LeaseLost:
            client.rpush(f"toy:fenced:{ctx.job_id}", args.consumer)
            raise
        return result

    JobWorker(queue, handler, consumer=args.consumer, stop_event=stop, poll_ms=200).run()


if __name__ == "__main__":
    main()
