"""Bearer-token authentication of gRPC callers: the tokens file, the table read from it, the interceptor.

The tokens file holds one `name:token` per line (`#` comments and blank lines allowed). Callers send
`authorization: Bearer <token>`; every RPC but `grpc.health.v1.Health/*` (open for probes) needs one,
reflection included. A missing or unknown token is UNAUTHENTICATED before any handler runs.

Tokens are compared as SHA-256 digests with `hmac.compare_digest` against every entry, so neither the
length of a guess nor which entry it was close to shows in the timing. Logs and errors name the caller
(or the file and line), never a token. SIGHUP re-reads the file (`Authenticator.reload`); a file that
fails to parse on reload keeps the previous table and logs why.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from loraflow.errors import InvalidArgument, Unauthenticated
from loraflow.security.private_files import write_private
from loraflow.server.error_status import status_for

log = logging.getLogger(__name__)

# Probes must work without a token; nothing else is open.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
MAX_TOKENS_FILE_BYTES = 1 << 20
MIN_TOKEN_CHARS = 16
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_TOKEN = re.compile(r"[\x21-\x7e]+")  # printable ASCII without spaces: what an HTTP header carries unchanged

# The authenticated caller of the RPC running in this thread ("" outside an authenticated RPC).
_current_caller: contextvars.ContextVar[str] = contextvars.ContextVar("loraflow_caller", default="")


def current_caller() -> str:
    """Name of the caller of the RPC being served (from the tokens file), "" when auth is off."""
    return _current_caller.get()


def bind_caller(name: str) -> None:
    """Make `name` the current_caller() of the request served in this context (a gRPC RPC, an HTTP request)."""
    _current_caller.set(name)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class TokenTable:
    """Caller names and the SHA-256 digests of their tokens, in file order."""

    entries: tuple[tuple[str, bytes], ...]

    def identify(self, token: str) -> str | None:
        """The name whose token this is, or None; looks at every entry whatever matches (constant time)."""
        presented = _digest(token)
        found = None
        for name, digest in self.entries:
            if hmac.compare_digest(presented, digest):
                found = name
        return found

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.entries)


def _bad(path: Path, message: str) -> InvalidArgument:
    return InvalidArgument(f"auth_tokens_file {str(path)!r}: {message}", field="auth_tokens_file", value=str(path))


def load_tokens(path: str | os.PathLike) -> TokenTable:
    """Parse a tokens file; InvalidArgument names the file and the line, never its content."""
    path = Path(path)
    try:
        info = os.stat(path)
    except OSError as exc:
        raise _bad(path, f"cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise _bad(path, "is not a regular file")
    # Anyone who can write the file can mint a token: refuse that outright. Readable by others is a leak
    # the operator may have chosen (a mounted secret), so it is only warned about.
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise _bad(path, f"is writable by group or others (mode {stat.S_IMODE(info.st_mode):o}); chmod 600 it")
    if info.st_mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("auth tokens file %s is readable by group or others (mode %o); chmod 600 it", path,
                    stat.S_IMODE(info.st_mode))
    if info.st_size > MAX_TOKENS_FILE_BYTES:
        raise _bad(path, f"is {info.st_size} bytes; at most {MAX_TOKENS_FILE_BYTES} are read")
    with open(path, "rb") as f:
        raw = f.read(MAX_TOKENS_FILE_BYTES + 1)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise _bad(path, f"line {line} is not UTF-8 text") from None
    entries: list[tuple[str, bytes]] = []
    seen_names: set[str] = set()
    seen_digests: set[bytes] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.partition(":")
        name, token = name.strip(), token.strip()
        if not sep:
            raise _bad(path, f"line {number} is not name:token")
        if not _NAME.fullmatch(name):
            raise _bad(path, f"line {number}: the name must be 1-64 letters, digits or _.@- "
                             f"(starting with a letter or digit)")
        if not _TOKEN.fullmatch(token or " "):
            raise _bad(path, f"line {number} ({name}): the token must be printable ASCII without spaces")
        if len(token) < MIN_TOKEN_CHARS:
            raise _bad(path, f"line {number} ({name}): the token is shorter than {MIN_TOKEN_CHARS} characters")
        if name in seen_names:
            raise _bad(path, f"line {number}: the name {name!r} appears twice")
        digest = _digest(token)
        if digest in seen_digests:
            raise _bad(path, f"line {number} ({name}): the same token is given to another name")
        seen_names.add(name)
        seen_digests.add(digest)
        entries.append((name, digest))
    if not entries:
        raise _bad(path, "holds no name:token line")
    return TokenTable(tuple(entries))


def add_token(path: str | os.PathLike, name: str) -> str:
    """Append a fresh random token for caller `name` to the tokens file (created 0600 if missing); returns it.

    The result is parsed again before it replaces the file, so a name that exists already, or a name the
    file format refuses, leaves the file as it was.
    """
    path = Path(path)
    if not _NAME.fullmatch(name or ""):
        raise InvalidArgument(f"name must be 1-64 letters, digits or _.@- (starting with a letter or digit), got "
                              f"{name!r}", field="name", value=name)
    existing = ""
    if path.exists():
        table = load_tokens(path)
        if name in table.names:
            raise InvalidArgument(f"{str(path)!r} already has a token for {name!r}; remove its line to replace it",
                                  field="name", value=name)
        existing = path.read_text()
        if existing and not existing.endswith("\n"):
            existing += "\n"
    token = secrets.token_urlsafe(32)
    write_private(path, f"{existing}{name}:{token}\n")
    return token


class Authenticator:
    """The tokens of one server, re-readable while it runs (SIGHUP)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._table = load_tokens(self.path)
        self._lock = threading.Lock()
        log.info("auth: %d caller(s) from %s: %s", len(self._table.entries), self.path,
                 ", ".join(self._table.names))

    def identify(self, token: str) -> str | None:
        return self._table.identify(token)

    @property
    def names(self) -> tuple[str, ...]:
        return self._table.names

    def reload(self) -> bool:
        """Re-read the file; on any problem keep the current table, log why and return False."""
        with self._lock:
            try:
                table = load_tokens(self.path)
            except InvalidArgument as exc:
                log.error("auth: reload failed, keeping the previous %d caller(s): %s", len(self._table.entries),
                          exc.message)
                return False
            self._table = table  # one reference swap: RPCs see the old table or the new one, never a mix
        log.info("auth: reloaded %s: %d caller(s): %s", self.path, len(table.entries), ", ".join(table.names))
        return True


def bearer_token(metadata) -> str | None:
    """The token of an `authorization: Bearer <token>` header, or None."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            if isinstance(value, bytes):
                return None
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def _rejecting(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that aborts at once (a stream request is never read)."""
    status = status_for(Unauthenticated(message, reason="UNAUTHENTICATED"))

    def abort(_request, context):
        context.abort_with_status(status)

    def abort_stream(_request, context):
        context.abort_with_status(status)
        yield  # pragma: no cover - abort raises first; the yield makes this a response stream

    # Marked so the concurrency interceptor runs it on its refusal threads, outside every stream slot.
    abort.loraflow_refusal = True
    abort_stream.loraflow_refusal = True
    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(abort, des, ser)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort_stream, des, ser)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort, des, ser)
    return grpc.stream_stream_rpc_method_handler(abort_stream, des, ser)


def _as_caller(handler: grpc.RpcMethodHandler, caller: str, method: str) -> grpc.RpcMethodHandler:
    """The same handler with the caller's name in `current_caller()` while it runs."""
    # grpc runs each RPC (a stream's every step included) in a Context of its own, so a plain set() is
    # scoped to this RPC.
    def unary(behavior: Callable):
        def wrapped(request, context):
            bind_caller(caller)
            log.debug("%s called by %s", method, caller)
            return behavior(request, context)
        return wrapped

    def streaming(behavior: Callable):
        def wrapped(request, context):
            bind_caller(caller)
            log.debug("%s called by %s", method, caller)
            yield from behavior(request, context)
        return wrapped

    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), des, ser)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), des, ser)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), des, ser)
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), des, ser)


class AuthInterceptor(grpc.ServerInterceptor):
    """UNAUTHENTICATED for every RPC without a known bearer token, except health (see module docstring)."""

    def __init__(self, authenticator: Authenticator):
        self.authenticator = authenticator

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is None:
            log.info("%s -> UNAUTHENTICATED: no bearer token", method)
            return _rejecting(handler, "this service needs 'authorization: Bearer <token>' metadata "
                                       "(set LORAFLOW_TOKEN)")
        caller = self.authenticator.identify(token)
        if caller is None:
            log.info("%s -> UNAUTHENTICATED: unknown token", method)
            return _rejecting(handler, "the bearer token is not valid for this service")
        return _as_caller(handler, caller, method)
