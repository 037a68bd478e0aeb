"""python -m services.trainer [all|api|worker] [--listen HOST:PORT] [--redis-url URL] [--store-url URL]
[--cache-dir DIR] [--metrics-port N] [--report-every-steps N] [--allow-distributed-training] [--max-ranks N]
[--join-distributed] [--rdzv-host HOST] [--rdzv-port PORT] [--role worker|follower|auto] [--node-rank K]
[--one-job]

`api` serves TrainerService + JobService (+ health and reflection); `worker` trains queued jobs;
`all` (default) does both in one process. Default port 50051. SIGTERM/SIGINT: health NOT_SERVING,
in-flight RPCs drain, a running job checkpoints and is released. `--one-job` and `--role follower` (a
Kubernetes Indexed Job's pods) run services.trainer.node_main instead: flags in services.trainer.node_flags.
"""

from __future__ import annotations

import argparse
import sys

from loraflow.jobs.queue_service import QueueServiceSpec, ServiceContext, main
from loraflow.options.settings import ALLOW_DISTRIBUTED_TRAINING, JOIN_DISTRIBUTED, RDZV_HOST
from loraflow.v1 import trainer_pb2, trainer_pb2_grpc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--report-every-steps", type=int, default=5, help="progress event every N steps")
    parser.add_argument(
        "--allow-distributed-training", action="store_true",
        default=bool(ALLOW_DISTRIBUTED_TRAINING.from_env()),
        help=ALLOW_DISTRIBUTED_TRAINING.described())
    parser.add_argument("--max-ranks", type=int, default=0,
                        help="most ranks one job may start on this machine (0 = 2 x CPU cores, at least 2)")
    parser.add_argument(
        "--join-distributed", action="store_true",
        default=bool(JOIN_DISTRIBUTED.from_env()),
        help=JOIN_DISTRIBUTED.described())
    parser.add_argument("--rdzv-host", default="",
                        help=RDZV_HOST.described())
    from services.trainer.node_flags import add_node_arguments

    add_node_arguments(parser)


def make_servicer(ctx: ServiceContext):
    from loraflow.storage.model_source import InputPolicy
    from services.trainer.server import TrainerServiceServicer

    return TrainerServiceServicer(ctx.queue, ctx.registry, ctx.store, inputs=InputPolicy.from_settings(ctx.security))


def make_handler(ctx: ServiceContext):
    from loraflow.storage.model_source import InputPolicy
    from services.trainer.metrics import TrainerMetrics
    from services.trainer.worker import TrainingHandler

    if ctx.args.max_ranks < 0:
        raise SystemExit(f"--max-ranks must be >= 0, got {ctx.args.max_ranks}")
    return TrainingHandler(ctx.store, ctx.registry, ctx.settings.cache_dir,
                           report_every_steps=ctx.args.report_every_steps, metrics=TrainerMetrics(),
                           inputs=InputPolicy.from_settings(ctx.security),
                           allow_distributed=ctx.args.allow_distributed_training or ctx.args.join_distributed,
                           max_local_ranks=ctx.args.max_ranks or None, rdzv_host=ctx.args.rdzv_host or None,
                           rdzv_port=ctx.args.rdzv_port, join_timeout=ctx.args.join_timeout)


def start_follower(ctx: ServiceContext, handler, stop):
    """--join-distributed: a RunFollower thread beside the job loop; returns its join for shutdown."""
    if not ctx.args.join_distributed:
        return None
    import threading

    from services.trainer.follower import RunFollower

    follower = RunFollower(handler, ctx.queue, stop)
    thread = threading.Thread(target=follower.run, name="train-follower")
    thread.start()
    return thread.join


def serve_metrics(port: int, security) -> None:
    from services.trainer.metrics import serve_metrics as serve

    serve(port, security.metrics_host, limits=security.limits)


SPEC = QueueServiceSpec(
    name="trainer", kind="train", default_port=50051,
    grpc_service_name=trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name,
    add_servicer=trainer_pb2_grpc.add_TrainerServiceServicer_to_server,
    make_servicer=make_servicer, make_handler=make_handler, add_arguments=add_arguments,
    serve_metrics=serve_metrics, start_companion=start_follower)


def run(argv: list[str] | None = None) -> int:
    """The plain API/worker process, or (--one-job, --role follower/auto) one Indexed Job pod's."""
    from loraflow.jobs.queue_service import parse_args
    from services.trainer.node_flags import NodeMode

    args = parse_args(SPEC, argv)
    mode = NodeMode.from_args(args)
    if mode.plain:
        return main(SPEC, argv)
    from services.trainer.node_main import main as node_main

    return node_main(args, mode, make_handler)


if __name__ == "__main__":
    sys.exit(run())
