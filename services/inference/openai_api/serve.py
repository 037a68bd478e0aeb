"""uvicorn on a thread of its own: bind in the caller's thread (so a busy port fails at start), TLS
or mTLS from the service's security settings, graceful stop that lets requests in flight finish.
Connections are bounded by ``security.limits`` (request-head deadline, keep-alive, head size, the
connection table of ``connections.py``) instead of uvicorn's ``limit_concurrency``, which counted idle
connections and answered 503 to everyone once a flood held them.

uvicorn installs signal handlers only on the main thread, so the process's SIGTERM/SIGINT/SIGHUP
handling (loraflow.server.grpc_server.run_until_signal) stays the one in charge.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time

import uvicorn

from loraflow.security.settings import SecuritySettings
from loraflow.security.tls import read_pem
from loraflow.server.grpc_server import check_exposure, parse_listen
from loraflow.server.server_concurrency import ConnectionTable
from services.inference.openai_api.connections import protocol_class

log = logging.getLogger(__name__)

START_TIMEOUT_S = 15.0


class HttpServer:
    """Bind ``listen`` (HOST:PORT, port 0 = a free one) at construction; serve an ASGI app from start(app)
    until stop()."""

    def __init__(self, listen: str, *, security: SecuritySettings, authenticated: bool, grace_s: float = 10.0):
        self.host, requested_port = parse_listen(listen, field="http_listen")
        check_exposure(self.host, requested_port, authenticated=authenticated, security=security,
                       field="http_listen")
        if security.tls:  # the same checks and errors as gRPC's credentials, before uvicorn reads them
            read_pem(security.tls_cert, "tls_cert")
            read_pem(security.tls_key, "tls_key")
            if security.tls_client_ca:
                read_pem(security.tls_client_ca, "tls_client_ca")
        self.tls = security.tls
        self._security = security
        limits = security.limits
        self.connections = ConnectionTable(limits.http_max_connections, limits.http_max_waiting_connections_per_client)
        self.grace_s = grace_s
        self._socket = self._bind(self.host, requested_port)
        self.port: int = self._socket.getsockname()[1]
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def _config(self, app) -> uvicorn.Config:
        security, limits = self._security, self._security.limits
        return uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off", http=protocol_class(self.connections, limits),
            ws="none", timeout_graceful_shutdown=self.grace_s, limit_concurrency=None,
            timeout_keep_alive=limits.http_keepalive_timeout_s,
            h11_max_incomplete_event_size=limits.http_max_header_bytes,
            ssl_certfile=security.tls_cert, ssl_keyfile=security.tls_key,
            ssl_ca_certs=security.tls_client_ca,
            ssl_cert_reqs=ssl.CERT_REQUIRED if security.tls_client_ca else ssl.CERT_NONE)

    @staticmethod
    def _bind(host: str, port: int) -> socket.socket:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError:
            sock.close()
            raise
        sock.listen(2048)
        return sock

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def start(self, app) -> HttpServer:
        self._server = uvicorn.Server(self._config(app))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="http-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._server.should_exit = True
                self._socket.close()
                raise RuntimeError(f"the HTTP API did not start on {self.url} (see the log above)")
            time.sleep(0.01)
        log.info("OpenAI-compatible HTTP API on %s/v1", self.url)
        return self

    def stop(self) -> None:
        """Stop accepting; requests in flight get ``grace_s`` seconds, then they are cancelled."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(self.grace_s + 5)
        self._socket.close()
