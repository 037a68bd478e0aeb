"""python -m services.compiler [all|api|worker] [--listen HOST:PORT] [--redis-url URL] [--store-url URL]
[--cache-dir DIR] [--metrics-port N]

`api` serves CompilerService + JobService (+ health and reflection); `worker` compiles queued jobs;
`all` (default) does both. Default port 50052.
"""

from __future__ import annotations

import sys

from loraflow.jobs.queue_service import QueueServiceSpec, ServiceContext, main
from loraflow.v1 import compiler_pb2_grpc
from services.compiler.huge_pages import prefer_huge_pages


def _inputs(ctx: ServiceContext):
    from loraflow.storage.model_source import InputPolicy
    from services.compiler.inputs import CompileInputs

    return CompileInputs(ctx.store, ctx.registry, ctx.settings.cache_dir, policy=InputPolicy.from_settings(ctx.security))


def make_servicer(ctx: ServiceContext):
    from services.compiler.server import CompilerServiceServicer

    return CompilerServiceServicer(ctx.queue, ctx.registry, ctx.store, _inputs(ctx))


def make_handler(ctx: ServiceContext):
    from services.compiler.worker import CompileHandler

    return CompileHandler(ctx.store, ctx.registry, _inputs(ctx), ctx.settings.cache_dir)


def serve_metrics(port: int, security) -> None:
    from services.compiler.metrics import serve_metrics as serve

    serve(port, security.metrics_host, limits=security.limits)


def _service_name() -> str:
    from loraflow.v1 import compiler_pb2

    return compiler_pb2.DESCRIPTOR.services_by_name["CompilerService"].full_name


SPEC = QueueServiceSpec(
    name="compiler", kind="compile", default_port=50052, grpc_service_name=_service_name(),
    add_servicer=compiler_pb2_grpc.add_CompilerServiceServicer_to_server,
    make_servicer=make_servicer, make_handler=make_handler, serve_metrics=serve_metrics)

if __name__ == "__main__":
    prefer_huge_pages()  # before the worker imports torch (PyTorch reads it once, at its first allocation)
    sys.exit(main(SPEC))
