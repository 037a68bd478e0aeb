"""python -m services.inference [--listen HOST:PORT] [--redis-url ...] [--store-url ...] [--cache-dir ...]
[--metrics-port N] [--load ARTIFACT_ID[@device]] [--http-listen HOST:PORT] ...

Serves InferenceService (plus health and reflection), and with --http-listen the OpenAI-compatible
/v1 API on the same engines, tokens and TLS. Health says NOT_SERVING until a model is loaded.
SIGTERM/SIGINT: NOT_SERVING, drain the RPCs and HTTP requests, stop every engine.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading

from loraflow.errors import LoraflowError
from loraflow.jobs.queue import RedisOutage, retry_redis
from loraflow.jobs.registry import Registry
from loraflow.options.budget import ResourceBudget, add_budget_arguments, configure_process_budget
from loraflow.options.config import Settings, connect_redis, seconds_arg
from loraflow.options.settings import (
    ADAPTER_CACHE_BYTES,
    ADAPTER_SLOTS,
    DEPLOYMENT,
    HTTP_LISTEN,
    ORT_SPINNING,
)
from loraflow.security.settings import SecuritySettings, add_security_arguments
from loraflow.server.redis_health import HEALTH, ReadinessGate, RedisMonitor
from loraflow.storage.model_source import InputPolicy
from loraflow.storage.store import open_store
from loraflow.v1 import inference_pb2_grpc
from services.inference.metrics import serve_metrics
from services.inference.model_manager import ModelManager
from services.inference.on_demand_adapters import DEFAULT_ADAPTER_WAIT_S, MAX_ADAPTER_WAIT_S
from services.inference.runtime import MAX_NUM_THREADS
from services.inference.server import SERVICE_NAME, InferenceServicer

DEFAULT_LISTEN = "127.0.0.1:50053"  # loopback unless told otherwise: secure by default
ADAPTER_CACHE_ENV = ADAPTER_CACHE_BYTES.env
# Each waiting request holds its prompt and sampler; beyond this a queue only hides overload.
MAX_WAITING_LIMIT = 100_000


def _bounded_int(text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be in {low}..{high}, got {value}")
    return value


def _num_threads(text: str) -> int:
    return _bounded_int(text, 0, MAX_NUM_THREADS)


def _max_waiting(text: str) -> int:
    return _bounded_int(text, 1, MAX_WAITING_LIMIT)


def _adapter_wait_s(text: str) -> float:
    return seconds_arg(text, MAX_ADAPTER_WAIT_S)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.inference", description=__doc__.splitlines()[0])
    p.add_argument("mode", nargs="?", default="all", choices=("all", "api"),
                   help="the inference service has no worker: 'all' and 'api' both serve the API")
    p.add_argument("--listen", default=DEFAULT_LISTEN, help=f"HOST:PORT to serve on (default {DEFAULT_LISTEN})")
    p.add_argument("--redis-url", default=None, help="registry Redis (env LORAFLOW_REDIS_URL; unset = embedded)")
    p.add_argument("--store-url", default=None, help="object store (env LORAFLOW_STORE_URL)")
    p.add_argument("--cache-dir", default=None, help="local artifact cache (env LORAFLOW_CACHE_DIR)")
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics port (0 = off)")
    p.add_argument("--load", action="append", default=[], metavar="ARTIFACT_ID[@device]",
                   help="load an artifact at start (repeatable)")
    p.add_argument("--num-threads", type=_num_threads, default=0,
                   help=f"ONNX Runtime intra-op threads, 0..{MAX_NUM_THREADS} (0 = default)")
    ORT_SPINNING.add_to(p)
    p.add_argument("--max-waiting", type=_max_waiting, default=64,
                   help=f"waiting-queue bound per model, 1..{MAX_WAITING_LIMIT} (a GenerateBatch larger than it "
                        "queues its requests as room frees)")
    p.add_argument("--adapter-wait-s", type=_adapter_wait_s, default=DEFAULT_ADAPTER_WAIT_S,
                   help="how long a request for an adapter not in a slot waits for an idle slot before "
                        f"RESOURCE_EXHAUSTED, 0..{MAX_ADAPTER_WAIT_S:g} s (default {DEFAULT_ADAPTER_WAIT_S:g})")
    ADAPTER_CACHE_BYTES.add_to(p)
    ADAPTER_SLOTS.add_to(p)
    p.add_argument("--http-listen", default=None, metavar="HOST:PORT",
                   help="also serve the OpenAI-compatible /v1 API here (env LORAFLOW_HTTP_LISTEN; off unless set)")
    p.add_argument("--deployment", default=DEPLOYMENT.raw(), metavar="NAME",
                   help="keep the served models as desired state in Redis under NAME, shared by every replica "
                        "started with it: LoadArtifact/LoadAdapter/UnloadModel through any replica reach all, and "
                        "a replica is SERVING once it holds every desired model (env LORAFLOW_DEPLOYMENT; unset = "
                        "models are local to this process)")
    p.add_argument("--log-level", default="INFO")
    add_security_arguments(p)
    add_budget_arguments(p)  # --memory-budget: every loaded model's estimate together
    args = p.parse_args(argv)
    from loraflow.errors import InvalidArgument

    for setting in (ADAPTER_CACHE_BYTES, ADAPTER_SLOTS, ORT_SPINNING):  # the flag, else the variable, else the default
        try:
            setattr(args, setting.name, setting.value(args))
        except InvalidArgument as err:
            p.error(err.message)
    if args.deployment is not None:
        from loraflow.errors import InvalidArgument
        from loraflow.options.names import validate_name

        try:
            validate_name("deployment", args.deployment)
        except InvalidArgument as err:
            p.error(f"--deployment: {err}")
    return args


def main(argv: list[str] | None = None) -> int:
    from loraflow.server.grpc_server import GrpcServer, run_until_signal

    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s",
                        stream=sys.stderr)
    log = logging.getLogger("loraflow.inference")
    settings = Settings.from_env(redis_url=args.redis_url, store_url=args.store_url, cache_dir=args.cache_dir)
    security = SecuritySettings.from_args(args)
    configure_process_budget(ResourceBudget.from_args(args))
    embedded = None
    if settings.redis_url is None:
        from loraflow.jobs.embedded_redis import EmbeddedRedis

        embedded = EmbeddedRedis()
        redis_url = embedded.url
    else:
        redis_url = settings.redis_url
    redis_client = connect_redis(redis_url)
    registry = Registry(redis_client)
    store = open_store(settings.store_url)

    server = GrpcServer(listen=args.listen, service_names=[SERVICE_NAME], security=security)
    serve_stop = threading.Event()
    # Serving = Redis answers AND a model is loaded; both conditions meet here only.
    def on_readiness(ready: bool) -> None:
        HEALTH.set_ready(ready and not serve_stop.is_set())  # /readyz on the metrics port
        if not serve_stop.is_set():
            server.set_serving(ready)

    gate = ReadinessGate(on_readiness, redis=False, model=False)
    http_listen = args.http_listen or HTTP_LISTEN.raw()
    http = None
    if http_listen:
        from services.inference.openai_api.serve import HttpServer

        try:  # refuses an exposed address without tokens and a busy port before anything starts
            http = HttpServer(http_listen, security=security, authenticated=server.authenticator is not None)
        except (LoraflowError, OSError) as err:
            log.error("cannot serve the HTTP API on %s: %s", http_listen, err)
            if embedded is not None:
                embedded.stop()
            return 2
    # /healthz fails once Redis has been unreachable past the liveness grace (the registry is needed to load).
    monitor = RedisMonitor(redis_client, gate, on_result=HEALTH.set_working).start()
    manager = ModelManager(store=store, registry=registry, cache_dir=settings.cache_dir,
                           max_waiting=args.max_waiting,
                           on_change=None if args.deployment else (lambda n: gate.set("model", n > 0)),
                           spinning=args.ort_spinning, inputs=InputPolicy.from_settings(security),
                           adapter_wait_s=args.adapter_wait_s, adapter_cache_bytes=args.adapter_cache_bytes,
                           adapter_slots=args.adapter_slots)
    reconciler = None
    if args.deployment:
        from services.inference.desired_state import DesiredState
        from services.inference.reconciler import Reconciler

        # Ready = every desired model is loaded here (a deployment with none: ready at once).
        reconciler = Reconciler(DesiredState(redis_client, args.deployment), manager,
                                on_converged=lambda ok: gate.set("model", ok))
    server.add(inference_pb2_grpc.add_InferenceServiceServicer_to_server, InferenceServicer(manager, reconciler))
    if args.metrics_port:
        serve_metrics(args.metrics_port, security.metrics_host, limits=security.limits)
        log.info("metrics on %s:%d/metrics", security.metrics_host, args.metrics_port)
    port = server.start(serving=False)
    gate.publish()
    log.info("inference service listening on port %d", port)
    shutdown = [monitor.stop, manager.close]
    if reconciler is not None:
        reconciler.start()
        shutdown.insert(0, reconciler.stop)  # no loads behind the engines' backs while they stop
    if http is not None:
        from services.inference.openai_api.app import ApiLimits, OpenAIApi

        # The gRPC server's Authenticator itself: a SIGHUP reload applies to both front doors.
        api = OpenAIApi(manager, authenticator=server.authenticator,
                        ready=lambda: gate.ready and not serve_stop.is_set(),
                        limits=ApiLimits.from_settings(security))
        http.start(api.app)
        shutdown.insert(0, http.stop)  # in-flight HTTP requests get the grace, then the engines stop

    for spec in args.load:
        artifact_id, _, device = spec.partition("@")
        try:
            # Redis away at start (the registry, the desired state): wait for it with backoff, NOT_SERVING
            # meanwhile, rather than die; RedisOutage after an hour ends the process.
            model = retry_redis(lambda a=artifact_id, d=device: (reconciler or manager).load_artifact(
                a, d or "cpu", num_threads=args.num_threads), budget=3600.0, what=f"--load {spec}")
            log.info("loaded %s as %s on %s", artifact_id, model.model_id, model.device)
        except (LoraflowError, RedisOutage) as err:
            log.error("cannot load %s: %s", spec, err)
            serve_stop.set()
            for stop in shutdown:
                stop()
            server.stop(grace=0)
            return 2

    if embedded is not None:
        shutdown.append(embedded.stop)
    run_until_signal(server, on_shutdown=shutdown, stop_event=serve_stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
