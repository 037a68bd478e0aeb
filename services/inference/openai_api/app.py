"""The Starlette app of the OpenAI-compatible API: routes, bearer auth, bounded bodies, bounded generations.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /openapi.json``
(the request schemas, from the same pydantic models that validate requests; all need a bearer token when
the server has tokens), ``GET /health`` (alive) and ``GET /ready`` (serving, the same gate as gRPC
health), which probes reach without a token. Generations in flight are capped, per server and per
client (429 beyond); a body over ``max_body_bytes`` is a 413 before it is parsed, one that takes longer
than ``body_timeout_s`` to arrive a 408, and parsing (json_body: every JSON/Unicode edge a 400 naming the
field), validation, tokenizing and submitting run off the event loop.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from loraflow.errors import LoraflowError, ResourceExhausted
from loraflow.security.auth import Authenticator, bearer_token, bind_caller, current_caller
from loraflow.security.limits import ServerLimits
from loraflow.security.settings import DEFAULT_MAX_CONCURRENT_STREAMS, SecuritySettings
from loraflow.server.server_concurrency import ClientCounter, StreamLimiter, too_many_for_client
from services.inference.model_manager import ModelManager
from services.inference.openai_api import errors
from services.inference.openai_api.generation import prepare, servable_adapters
from services.inference.openai_api.json_body import parse_json_body
from services.inference.openai_api.responses import CollectedResponse, event_stream
from services.inference.openai_api.schemas import openapi_description, parse_chat, parse_completion
from services.inference.openai_api.streaming import ChunkStream, EventStreamResponse

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/ready"})
OWNED_BY = "loraflow"
_DEFAULTS = ServerLimits()


@dataclass(frozen=True)
class ApiLimits:
    """max_body_bytes: the largest body (the gRPC request limit too); body_timeout_s: how long it may take
    to arrive; max_concurrent_generations: generations in flight; max_generations_per_client: per caller
    (name with tokens, else address), 0 = no cap but the server's."""

    max_body_bytes: int = _DEFAULTS.max_request_bytes
    max_concurrent_generations: int = DEFAULT_MAX_CONCURRENT_STREAMS
    max_generations_per_client: int = _DEFAULTS.max_streams_per_client
    body_timeout_s: float = _DEFAULTS.http_body_timeout_s

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_concurrent_generations", "body_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_generations_per_client < 0:
            raise ValueError(f"max_generations_per_client must be >= 0, got {self.max_generations_per_client}")

    @classmethod
    def from_settings(cls, security: SecuritySettings) -> ApiLimits:
        limits = security.limits
        return cls(max_body_bytes=limits.max_request_bytes, max_concurrent_generations=security.max_concurrent_streams,
                   max_generations_per_client=limits.max_streams_per_client, body_timeout_s=limits.http_body_timeout_s)


class BearerAuth:
    """ASGI middleware: 401 in OpenAI's shape unless ``Authorization: Bearer`` holds a known token."""

    def __init__(self, app, authenticator: Authenticator | None):
        self.app = app
        self.authenticator = authenticator

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self.authenticator is None or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        token = bearer_token(headers)
        caller = None if token is None else self.authenticator.identify(token)
        if token is None:
            message = "this API needs an 'Authorization: Bearer <token>' header"
        elif caller is None:
            message = "the bearer token is not valid for this service"
        else:
            bind_caller(caller)  # the route runs in this context: logs can name the caller, never the token
            log.debug("%s %s called by %s", scope.get("method"), scope["path"], caller)
            await self.app(scope, receive, send)
            return
        log.info("%s %s -> 401: %s", scope.get("method"), scope["path"], message)
        response = errors.error_response(401, errors.error_body(401, message, None, "invalid_api_key"),
                                         headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _BodyTooLarge(int(length))
    body = bytearray()
    with anyio.fail_after(timeout_s):
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise _BodyTooLarge(len(body))
    return bytes(body)


def _client(request: Request) -> str:
    """Who a generation counts against: the authenticated caller, else the client's address."""
    caller = current_caller()
    if caller:
        return f"caller:{caller}"
    return request.client.host if request.client is not None else "?"


def _unix_seconds(rfc3339: str) -> int:
    """A manifest's RFC 3339 creation time as unix seconds (0 when it does not parse)."""
    try:
        return int(datetime.fromisoformat(rfc3339).timestamp())
    except ValueError:
        return 0


def _submit(manager: ModelManager, parsed, request_id: str):
    """Resolve, tokenize and check the request, and queue it on its model's engine (blocking)."""
    model, generation = prepare(manager, parsed, request_id)
    return model.engine.submit(generation)


class OpenAIApi:
    """The handlers, bound to one ModelManager (and so to the engines gRPC uses)."""

    def __init__(self, manager: ModelManager, *, authenticator: Authenticator | None = None,
                 ready: Callable[[], bool] = lambda: True, limits: ApiLimits = ApiLimits()):
        self.manager = manager
        self.ready = ready
        self.limits = limits
        self.generations = StreamLimiter(limits.max_concurrent_generations)
        self.per_client = ClientCounter(limits.max_generations_per_client) if limits.max_generations_per_client \
            else None
        self.app = Starlette(
            routes=[Route("/health", self.health), Route("/ready", self.is_ready),
                    Route("/openapi.json", self.openapi), Route("/v1/models", self.list_models),
                    Route("/v1/completions", self.completions, methods=["POST"]),
                    Route("/v1/chat/completions", self.chat_completions, methods=["POST"])],
            middleware=[Middleware(BearerAuth, authenticator=authenticator)],
            exception_handlers={HTTPException: self._http_error, Exception: self._internal_error})

    # ---- probes and models -----------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def is_ready(self, request: Request) -> Response:
        if self.ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready"}, status_code=503)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_description())

    async def list_models(self, request: Request) -> Response:
        models = self.manager.list()
        adapters = await anyio.to_thread.run_sync(servable_adapters, self.manager, models)  # Redis: off the loop
        data = []
        for model in models:
            created = _unix_seconds(model.manifest.created)
            data.append({"id": model.model_id, "object": "model", "created": created, "owned_by": OWNED_BY,
                         "root": model.artifact_id, "parent": None})
            for name in adapters[model.model_id]:
                data.append({"id": name, "object": "model", "created": created, "owned_by": OWNED_BY,
                             "root": model.artifact_id, "parent": model.model_id})
        return JSONResponse({"object": "list", "data": data})

    # ---- generation ------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, parse_completion, "text_completion", "cmpl")

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, parse_chat, "chat.completion", "chatcmpl")

    async def _generate(self, request: Request, parse, kind: str, id_prefix: str):
        where = f"POST {request.url.path}"
        try:
            raw = await _read_body(request, self.limits.max_body_bytes, self.limits.body_timeout_s)
            # Parsing and validating a body of up to max_body_bytes is CPU work: not on the event loop.
            parsed = await anyio.to_thread.run_sync(lambda: parse(parse_json_body(raw)))
        except _BodyTooLarge as err:
            return errors.error_response(413, errors.error_body(
                413, f"the request body is {err.args[0]} bytes; at most {self.limits.max_body_bytes} are accepted "
                     f"(--max-request-bytes)", "body", "request_too_large"))
        except TimeoutError:
            return errors.error_response(408, errors.error_body(
                408, f"the request body did not arrive within {self.limits.body_timeout_s:g}s "
                     f"(--http-body-timeout-s)", "body", "request_timeout"), headers={"Connection": "close"})
        except LoraflowError as err:
            return errors.error_response(*errors.from_loraflow(err))
        client = _client(request)
        if self.per_client is not None and not self.per_client.acquire(client):
            return errors.error_response(*errors.from_loraflow(too_many_for_client(client, self.per_client.cap)))
        if not self.generations.acquire():
            if self.per_client is not None:
                self.per_client.release(client)
            err = ResourceExhausted(f"{self.limits.max_concurrent_generations} generations are in progress on "
                                    f"this server already (--max-concurrent-streams); retry later",
                                    reason="TOO_MANY_STREAMS")
            return errors.error_response(*errors.from_loraflow(err))
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.generations.release()
                if self.per_client is not None:
                    self.per_client.release(client)

        request_id = f"{id_prefix}-{uuid.uuid4().hex}"
        try:
            # Off the event loop, in one worker-thread hop: the registry may be Redis, tokenizing is CPU, submit
            # may wait for an adapter.
            handle = await anyio.to_thread.run_sync(_submit, self.manager, parsed, request_id)
        except Exception as exc:  # noqa: BLE001 - mapped to OpenAI's error shape
            release()
            return errors.error_response(*errors.from_exception(exc, where))
        chunks = ChunkStream(handle)
        if parsed.stream:
            events = event_stream(chunks, parsed, request_id, where)
            return EventStreamResponse(events, on_disconnect=chunks.cancel, on_close=lambda: (chunks.cancel(),
                                                                                             release()))
        return CollectedResponse(chunks, parsed, request_id, kind, where, release)

    # ---- errors ----------------------------------------------------------------------------
    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"
                   }.get(exc.status_code, str(exc.detail))
        return errors.error_response(exc.status_code, errors.error_body(exc.status_code, message))

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        return errors.error_response(*errors.from_exception(exc, f"{request.method} {request.url.path}"))
